"""How well a CLIP-style image-text matcher (``vlmfast.zoo.clip``, AGLA's matcher) sees ShapesWorld: caption
retrieval, a pointing game on its dense patch-text maps, and object-presence AUC. Used by the trainer
(``training/train_clip.py``) and by ``vlmfast eval hallucination``'s AGLA diagnostics."""

from __future__ import annotations

import math

import numpy as np

from ..datasets.shapes import caption, iter_scenes


def evaluate(matcher, n_scenes: int, split: str = "dev") -> dict:
    """On the first ``n_scenes`` scenes of ``split``:

    * ``retrieval_i2t`` / ``retrieval_t2i``: top-1 caption retrieval among the ``n_scenes`` captions (a hit when
      the retrieved caption / image has the query's caption text: single-object scenes can share one);
    * ``pointing``: for every distinct object ``"<colour> <shape>"`` of a scene, does the argmax cell of its dense
      patch-text map contain a pixel of that object (pointing game with one cell of tolerance);
    * ``object_auc``: how well the global similarity of ``"<colour> <shape>"`` separates objects present in the
      image from absent ones (ROC AUC over all scene x object-name pairs; 0.5 = chance).
    """
    import torch

    from ..datasets.shapes import COLOR_NAMES, SHAPES

    scenes = list(iter_scenes(split, n_scenes))
    caps = [caption(s) for s in scenes]
    with torch.inference_mode():
        img = matcher.encode_image(matcher.preprocess([s.image for s in scenes]))
        txt = matcher.encode_text(caps)
        sim = img @ txt.T
        i2t = float(np.mean([caps[int(j)] == caps[i] for i, j in enumerate(sim.argmax(1))]))
        t2i = float(np.mean([caps[int(i)] == caps[j] for j, i in enumerate(sim.argmax(0))]))
        names = [f"{c} {s}" for c in COLOR_NAMES for s in SHAPES]
        obj_sim = img @ matcher.encode_text(names).T  # (n, 48)
    present = torch.tensor([[(c, sh) in {(o.color, o.shape) for o in s.objects} for c in COLOR_NAMES for sh in SHAPES]
                            for s in scenes])
    auc = _auc(obj_sim[present].tolist(), obj_sim[~present].tolist())
    hits = []
    for s in scenes:
        objs = sorted({(o.color, o.shape) for o in s.objects})
        _, maps = matcher.match([s.image] * len(objs), [f"{c} {sh}" for c, sh in objs])
        g = maps.shape[-1]
        cell = s.size / g
        for (c, sh), m in zip(objs, maps):
            r, k = divmod(int(m.argmax()), g)
            mask = np.zeros((s.size, s.size), dtype=bool)
            for o in s.objects:
                if (o.color, o.shape) == (c, sh):
                    mask |= o.mask
            hits.append(bool(mask[int(r * cell):int(math.ceil((r + 1) * cell)),
                                  int(k * cell):int(math.ceil((k + 1) * cell))].any()))
    return {"retrieval_i2t": i2t, "retrieval_t2i": t2i, "pointing": float(np.mean(hits)), "object_auc": auc,
            "n_scenes": n_scenes, "n_objects": len(hits), "split": split}


def _auc(pos: list[float], neg: list[float]) -> float:
    """ROC AUC by ranks (ties count half)."""
    scores = np.array(pos + neg)
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for v in np.unique(scores):  # average ranks of ties
        idx = scores == v
        ranks[idx] = ranks[idx].mean()
    n_pos, n_neg = len(pos), len(neg)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# --------------------------------------------------------------------------- training
