"""Metrics for ShapesWorld tasks: VQA accuracy, POPE, CHAIR, mask IoU and pointing. Pure functions."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .vocab import COLORS, NUMBER_WORDS, SHAPE_PLURALS, SHAPES

_DIGITS = {str(i): w for i, w in enumerate(NUMBER_WORDS + ("nine", "ten"))}
_SYNONYMS = {"centre": "center", "grey": "gray", "colour": "color"}
_ARTICLES = {"a", "an", "the"}
_YES_NO_TYPES = {"left_of", "pope"}
_SINGULAR = {**{s: s for s in SHAPES}, **{p: s for s, p in SHAPE_PLURALS.items()}}


def _field(item: Any, name: str) -> Any:
    return item[name] if isinstance(item, Mapping) else getattr(item, name)


def normalize_answer(text: str, yes_no: bool = False) -> str:
    """Canonical form of a free-text answer, for exact-match scoring.

    Lowercases; turns punctuation (hyphens included) into spaces; maps digits 0-10 to number words
    (``"3"`` -> ``"three"``) and ``centre`` / ``grey`` / ``colour`` to ``center`` / ``gray`` /
    ``color``; drops the articles a / an / the; joins the words with single spaces. With
    ``yes_no=True`` (yes/no questions) only the first remaining word is kept (``"Yes, it is."`` ->
    ``"yes"``).

    >>> normalize_answer("Top-Left.")
    'top left'
    >>> normalize_answer(" 3 ")
    'three'
    """
    words = re.sub(r"[^\w\s]|_", " ", text.lower()).split()
    words = [_DIGITS.get(w, w) for w in words]
    words = [_SYNONYMS.get(w, w) for w in words]
    words = [w for w in words if w not in _ARTICLES]
    if yes_no:
        return words[0] if words else ""
    return " ".join(words)


def vqa_accuracy(preds: Sequence[str], items: Sequence[Any]) -> dict[str, float]:
    """Exact-match accuracy after :func:`normalize_answer`, overall and per question type.

    ``items`` are :class:`~.tasks.VQAItem` (or :class:`~.tasks.PopeItem`) objects or dicts with
    ``answer`` and ``type``, aligned with ``preds``. ``left_of`` and ``pope`` items are scored as
    yes/no questions (first word of the prediction). Returns ``{"overall": acc, "n": count,
    "<type>": acc, ...}`` with one key per type present (accuracies in [0, 1]).
    """
    if len(preds) != len(items):
        raise ValueError(f"{len(preds)} predictions for {len(items)} items")
    hits: dict[str, list[bool]] = {}
    for pred, item in zip(preds, items):
        qtype = _field(item, "type")
        yn = qtype in _YES_NO_TYPES
        hit = normalize_answer(pred, yes_no=yn) == normalize_answer(_field(item, "answer"), yes_no=yn)
        hits.setdefault(qtype, []).append(hit)
    all_hits = [h for v in hits.values() for h in v]
    out: dict[str, float] = {"overall": float(np.mean(all_hits)) if all_hits else 0.0, "n": len(all_hits)}
    out.update({t: float(np.mean(v)) for t, v in sorted(hits.items())})
    return out


def _is_yes(answer: str | bool) -> bool:
    if isinstance(answer, (bool, np.bool_)):
        return bool(answer)
    return normalize_answer(answer, yes_no=True) == "yes"


def pope_metrics(preds: Sequence[str | bool], labels: Sequence[str | bool]) -> dict[str, float]:
    """POPE scores with ``yes`` as the positive class.

    A prediction counts as ``yes`` when its first word (after :func:`normalize_answer`) is ``yes``
    (or it is ``True``); anything else counts as ``no``. Labels are ``"yes"`` / ``"no"`` or bools.
    Returns ``accuracy``, ``precision`` (TP / predicted yes; 0 when nothing is predicted yes),
    ``recall`` (TP / labelled yes), ``f1`` and ``yes_ratio``: the fraction of *predictions* that
    are yes (not of labels).
    """
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions for {len(labels)} labels")
    if not preds:
        raise ValueError("no predictions")
    for lab in labels:
        if not isinstance(lab, (bool, np.bool_)) and normalize_answer(lab) not in ("yes", "no"):
            raise ValueError(f"POPE label must be yes/no, got {lab!r}")
    p = np.array([_is_yes(x) for x in preds])
    y = np.array([_is_yes(x) for x in labels])
    tp, fp, fn = int((p & y).sum()), int((p & ~y).sum()), int((~p & y).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": float((p == y).mean()), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": float(p.mean())}


def parse_mentions(caption: str) -> list[tuple[str | None, str]]:
    """Object mentions in a caption: ``(colour, shape)`` for "<colour> <shape(s)>", ``(None, shape)``
    for a bare shape; plurals and number words are handled ("two green squares" -> green square).
    Each mention appears once (first-occurrence order), as in CHAIR's per-caption object sets.
    Colours not directly before a shape word ("a red object", "red and blue stars") only count
    for the shape they precede.
    """
    words = re.findall(r"[a-z]+", caption.lower())
    mentions: list[tuple[str | None, str]] = []
    for j, w in enumerate(words):
        shape = _SINGULAR.get(w)
        if shape is None:
            continue
        color = words[j - 1] if j > 0 and words[j - 1] in COLORS else None
        if (color, shape) not in mentions:
            mentions.append((color, shape))
    return mentions


def _as_pairs(objects: Iterable[Any]) -> set[tuple[str, str]]:
    """``(colour, shape)`` set from tuples, ``"red circle"`` strings or objects with color/shape."""
    out = set()
    for o in objects:
        if isinstance(o, str):
            c, s = o.split()
        elif isinstance(o, tuple):
            c, s = o
        else:
            c, s = o.color, o.shape
        out.add((c, s))
    return out


def chair(captions: Sequence[str], gt_objects: Sequence[Iterable[Any]]) -> dict[str, float]:
    """CHAIR hallucination scores of generated captions against each scene's ground truth.

    ``gt_objects[k]`` lists the objects of caption ``k``'s scene: ``(colour, shape)`` tuples,
    ``"colour shape"`` strings or :class:`~.scene.ShapeObject` s (e.g. ``scene.objects``).
    Mentions come from :func:`parse_mentions`. A mention ``(colour, shape)`` is hallucinated when
    no object has that colour and shape; a bare ``shape`` when no object has that shape.

    - ``chair_i`` = hallucinated mentions / all mentions (0 when there are none);
    - ``chair_s`` = captions with at least one hallucinated mention / all captions;
    - ``recall`` = ground-truth ``(colour, shape)`` kinds mentioned with both attributes / all
      ground-truth kinds (summed over captions; several objects of one kind count once).

    Existence only: counts ("two stars" for one star) are not scored.
    """
    if len(captions) != len(gt_objects):
        raise ValueError(f"{len(captions)} captions for {len(gt_objects)} ground truths")
    n_mentions = n_halluc = n_bad_captions = n_gt = n_recalled = 0
    for cap, gt in zip(captions, gt_objects):
        gt_pairs = _as_pairs(gt)
        gt_shapes = {s for _, s in gt_pairs}
        mentions = parse_mentions(cap)
        bad = [m for m in mentions if (m not in gt_pairs if m[0] is not None else m[1] not in gt_shapes)]
        n_mentions += len(mentions)
        n_halluc += len(bad)
        n_bad_captions += bool(bad)
        n_gt += len(gt_pairs)
        n_recalled += len(gt_pairs & set(mentions))
    return {
        "chair_s": n_bad_captions / len(captions) if captions else 0.0,
        "chair_i": n_halluc / n_mentions if n_mentions else 0.0,
        "recall": n_recalled / n_gt if n_gt else 0.0,
    }


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union of two boolean masks of the same shape (1.0 when both are empty)."""
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {gt.shape}")
    union = int((pred | gt).sum())
    return int((pred & gt).sum()) / union if union else 1.0


def miou(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray]) -> float:
    """Mean of :func:`mask_iou` over aligned pairs of masks."""
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predicted masks for {len(gts)} ground truths")
    if not preds:
        raise ValueError("no masks")
    return float(np.mean([mask_iou(p, g) for p, g in zip(preds, gts)]))


def pointing_accuracy(points: Sequence[tuple[float, float] | None], gt_masks: Sequence[np.ndarray]) -> float:
    """Fraction of points ``(x, y)`` (pixel coordinates; pixel ``(i, j)`` covers ``[j, j+1) x
    [i, i+1)``) that fall inside their target's mask. ``None`` or out-of-image points are misses."""
    if len(points) != len(gt_masks):
        raise ValueError(f"{len(points)} points for {len(gt_masks)} masks")
    if not points:
        raise ValueError("no points")
    hits = 0
    for pt, mask in zip(points, gt_masks):
        if pt is None:
            continue
        x, y = int(np.floor(pt[0])), int(np.floor(pt[1]))
        h, w = mask.shape
        hits += bool(0 <= x < w and 0 <= y < h and mask[y, x])
    return hits / len(points)
