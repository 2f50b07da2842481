"""``vlmfast eval shapes --task grounding``: attention-as-prompt grounding on ShapesWorld referring expressions.

Every unambiguous referring expression of a scene (``referring_expressions``: "the red star", "the circle on
the left", ...) is asked about with ``"where is <expression> ?"`` and grounded with
``generate(..., ground=True, ground_phrases=[<expression without "the">])``. Scored against the target's exact
visible mask:

* ``miou`` / ``pointing``: (a) VL-SAM style, the map's positive + negative points and refinement (the policy's
  ``grounding`` config); pointing = the first positive point lands in the target;
* ``peak_point_miou`` / ``peak_pointing``: (b) one positive point at the same map's peak, one SAM call;
* ``vlsam_map_miou`` / ``vlsam_map_pointing``: (a) with VL-SAM's own map (mean-max head weights and the
  regularised attention flow over all layers) instead of the policy's;
* ``peak_positive_miou``: (a) with VL-SAM's positive point (the map's peak in the positive region) instead of
  the config's ``positive_point`` (same maps, negative point and SAM; compare with ``miou``);
* ``upper_bound_miou``: (c) one positive point at the ground-truth centre (``center_point``), one SAM call;
* ``pruned_miou`` / ``pruned_pointing``: (d) (a) with FoPru keeping 25% of the visual tokens;
* ``time``: what grounding adds to a generate call (:data:`TIME_PROTOCOL`; :func:`time_overhead`), on the first
  referring expression of each of the first 30 scenes and on captions of the same images. Alone, on any split:
  ``python -m vlmfast.eval.grounding --split test --limit 30``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..argtypes import positive_int
from ..datasets.shapes import SPLITS, mask_iou, pointing_accuracy, referring_expressions

PROMPT = "where is {expression} ?"
MAX_NEW_TOKENS = 4


def phrase_of(expression: str) -> str:
    return expression[4:] if expression.startswith("the ") else expression


def _siblings(acc, cfg, methods=()):
    """An accelerator on the same model and processor with another policy, sharing the SAM predictor."""
    from ..accelerator import VLMAccelerator
    from ..policy import Policy

    other = VLMAccelerator(acc.model, acc.processor, policy=Policy(list(methods), grounding=cfg))
    other.grounder.predictor = acc.grounder.predictor
    return other


def _run_grounding(acc, jobs, batch: int, desc: str, progress: bool) -> list:
    out = []
    for i in tqdm(range(0, len(jobs), batch), desc=desc, disable=not progress, leave=False):
        chunk = jobs[i:i + batch]
        res = acc.generate(images=[[img] for img, _, _ in chunk], prompt=[p for _, p, _ in chunk],
                           max_new_tokens=MAX_NEW_TOKENS, ground=True, ground_phrases=[[ph] for _, _, ph in chunk])
        for (_, _, ph), o in zip(chunk, res):
            g = o.grounding[0]
            assert g.phrase == ph, (g.phrase, ph)
            out.append(g)
    return out


def _first_positive(g) -> tuple[float, float] | None:
    pos = np.flatnonzero(g.point_labels == 1)
    return tuple(g.points[pos[0]]) if len(pos) else None


def _peak(heat: np.ndarray) -> tuple[float, float]:
    i = int(np.argmax(heat))
    return i % heat.shape[1] + 0.5, i // heat.shape[1] + 0.5


def evaluate_grounding(acc, scenes, image, batch: int = 16, progress: bool = True, timing: int = 30,
                       pruned_keep: float = 0.25) -> dict:
    """The ``grounding`` section of the ShapesWorld evaluation (see the module docstring)."""
    import torch

    from ..grounding import GroundingConfig
    from ..grounding.segmenter import segment, segment_points
    from ..pruners import FoPru
    from ..zoo.sam import center_point

    cfg = acc.policy.grounding or GroundingConfig()
    items = [(s, r) for s in scenes for r in referring_expressions(s)]
    if not items:
        return {"n": 0}
    jobs = [(image(s), PROMPT.format(expression=r.expression), phrase_of(r.expression)) for s, r in items]
    gts = [r.mask for _, r in items]
    main = _run_grounding(acc, jobs, batch, "grounding", progress)
    vlsam_cfg = replace(cfg, head_weights="mean-max", flow="regularised", layers=None)
    vlsam = _run_grounding(_siblings(acc, vlsam_cfg), jobs, batch, "grounding vl-sam map", progress)
    pruned = _run_grounding(_siblings(acc, cfg, [FoPru(keep=pruned_keep)]), jobs, batch, "grounding fopru", progress)

    predictor, emb = acc.grounder.predictor, acc.grounder.embeddings
    peak_masks, upper_masks, peaks, peak_positive = [], [], [], []
    peak_cfg = replace(cfg, positive_point="peak")
    for (img, _, _), g, gt in zip(jobs, main, gts):
        emb.set(np.asarray(img))
        p = _peak(g.heatmap)
        peaks.append(p)
        peak_masks.append(segment_points(predictor, [p], [1])[0])
        upper_masks.append(segment_points(predictor, [center_point(gt)], [1])[0])
        peak_positive.append(segment(predictor, torch.from_numpy(g.heatmap), peak_cfg).mask)

    def miou(masks):
        return float(np.mean([mask_iou(m, t) for m, t in zip(masks, gts)]))

    res = {
        "n": len(items), "prompt": PROMPT, "config": asdict(cfg),
        "miou": miou([g.mask for g in main]),
        "pointing": pointing_accuracy([_first_positive(g) for g in main], gts),
        "map_pointing": pointing_accuracy(peaks, gts),
        "peak_point_miou": miou(peak_masks),
        "peak_positive_miou": miou(peak_positive),
        "vlsam_map_miou": miou([g.mask for g in vlsam]),
        "vlsam_map_pointing": pointing_accuracy([_first_positive(g) for g in vlsam], gts),
        "upper_bound_miou": miou(upper_masks),
        "pruned_miou": miou([g.mask for g in pruned]),
        "pruned_pointing": pointing_accuracy([_first_positive(g) for g in pruned], gts),
        "pruned_keep": pruned_keep,
    }
    res["ratio_to_upper_bound"] = res["miou"] / res["upper_bound_miou"] if res["upper_bound_miou"] else None
    kinds: dict[str, list[int]] = {}
    for k, (_, r) in enumerate(items):
        kinds.setdefault(r.kind, []).append(k)
    res["by_kind"] = {kind: {"n": len(ix), "miou": float(np.mean([mask_iou(main[k].mask, gts[k]) for k in ix])),
                             "upper_bound_miou": float(np.mean([mask_iou(upper_masks[k], gts[k]) for k in ix]))}
                      for kind, ix in sorted(kinds.items())}
    if timing:
        res["time"] = time_overhead(acc, timing_jobs(scenes, image)[:timing])
    return res


def timing_jobs(scenes, image) -> list[tuple]:
    """The requests :func:`time_overhead` times: (image, question, phrase) for the first referring expression of
    each scene that has one."""
    out = []
    for s in scenes:
        refs = referring_expressions(s)
        if refs:
            out.append((image(s), PROMPT.format(expression=refs[0].expression), phrase_of(refs[0].expression)))
    return out


TIME_PROTOCOL = (
    "one request at a time in a warmed-up process; per scene, back to back: a plain generate call, the same call "
    "with ground=True after SAM's image embeddings are cleared (a new image: SAM encodes it, in a background thread "
    "during the VLM call when `overlap` is on), and the same call with ground=True again (SAM already holds the "
    "image); each time is the median over the scenes, and overhead = median(ground=True) / median(plain) - 1 "
    "(`overhead`: new image, `overhead_warm`: image already encoded). Referring: 'where is <expression> ?', at "
    "most 4 answer tokens, the expression grounded (ground_phrases) plus any object word of the answer; caption_*: "
    "the caption prompt of the same images, up to 48 tokens, every object word of the answer grounded. "
    "grounding_stage_s: the median time after decoding of the second ground=True call (maps, points, SAM's "
    "prompt decoder). Wall-clock medians of interleaved calls, because the machine may be shared (load_average: "
    "os.getloadavg() before and after); `cpu`: the same ratios of the process's CPU time (time.process_time, all "
    "threads: the work grounding adds, less sensitive to other jobs)."
)


def interleaved_times(acc, requests, name: str = "") -> dict:
    """Per request, back to back: a plain generate call, the call with ``ground=True`` after SAM's embeddings are
    cleared (a new image), and the call with ``ground=True`` again (SAM holds the image). ``requests``: (images,
    generate kwargs, kwargs only the ground=True calls get). Wall-clock and process-CPU medians, keys prefixed
    with ``name`` (:data:`TIME_PROTOCOL`)."""
    emb = acc.grounder.embeddings
    plain, cold, warm, stage, phrases, cpu = [], [], [], [], [], []
    for images, kw, extra in requests:
        emb.forget()
        c0, t0 = time.process_time(), time.perf_counter()
        acc.generate(images=images, **kw)
        c1, t1 = time.process_time(), time.perf_counter()
        acc.generate(images=images, ground=True, **kw, **extra)  # SAM encodes the image within the call
        c2, t2 = time.process_time(), time.perf_counter()
        out = acc.generate(images=images, ground=True, **kw, **extra)
        c3, t3 = time.process_time(), time.perf_counter()
        cpu.append((c1 - c0, c2 - c1, c3 - c2))
        plain.append(t1 - t0)
        cold.append(t2 - t1)
        warm.append(t3 - t2)
        stage.append(out.stats.grounding_s)
        phrases.append(len(out.grounding))
    p, c, w = statistics.median(plain), statistics.median(cold), statistics.median(warm)
    cp, cc, cw = (statistics.median(x[k] for x in cpu) for k in range(3))
    return {"cpu": {f"{name}generate_s": cp, f"{name}overhead": cc / cp - 1, f"{name}overhead_warm": cw / cp - 1},
            f"{name}generate_s": p, f"{name}generate_ground_s": c, f"{name}generate_ground_warm_s": w,
            f"{name}grounding_stage_s": statistics.median(stage), f"{name}overhead": c / p - 1,
            f"{name}overhead_warm": w / p - 1, f"{name}phrases": statistics.mean(phrases)}


def time_overhead(acc, jobs) -> dict:
    """What ``ground=True`` adds to a generate call (:data:`TIME_PROTOCOL`). ``jobs``: (image, referring
    question, phrase), one per scene."""
    import torch

    from ..datasets.shapes import CAPTION_PROMPT

    for img, prompt, phrase in jobs[:2]:  # warm-up
        acc.generate(images=[img], prompt=prompt, max_new_tokens=MAX_NEW_TOKENS)
        acc.generate(images=[img], prompt=prompt, max_new_tokens=MAX_NEW_TOKENS, ground=True, ground_phrases=[phrase])
    res: dict = {"protocol": TIME_PROTOCOL, "load_average": [os.getloadavg()[0]],
                 "torch_threads": torch.get_num_threads(), "cpu": {}}
    referring = [([img], dict(prompt=prompt, max_new_tokens=MAX_NEW_TOKENS), dict(ground_phrases=[phrase]))
                 for img, prompt, phrase in jobs]
    caption: list[tuple[list, dict, dict]] = [([img], dict(prompt=CAPTION_PROMPT, max_new_tokens=48), {})
                                              for img, _, _ in jobs]
    for name, requests in (("", referring), ("caption_", caption)):
        times = interleaved_times(acc, requests, name)
        res["cpu"].update(times.pop("cpu"))
        res.update(times)
    res["load_average"].append(os.getloadavg()[0])
    return {"n": len(jobs), **res}


def main(argv=None) -> int:
    """Only the ``time`` section: ``python -m vlmfast.eval.grounding --split test --limit 30``."""
    from ..accelerator import VLMAccelerator
    from ..datasets.shapes import iter_scenes

    p = argparse.ArgumentParser(description="what grounding adds to a generate call (" + TIME_PROTOCOL + ")")
    p.add_argument("--model", default="tiny-llava-shapes")
    p.add_argument("--policy", default="none", help="shipped name, YAML path or 'none' (default)")
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--limit", type=positive_int, default=30,
                   help="scenes (one referring question and one caption each)")
    p.add_argument("--json", help="write the time section here")
    a = p.parse_args(argv)
    acc = VLMAccelerator.from_pretrained(a.model, policy=a.policy)
    text = json.dumps(time_overhead(acc, timing_jobs(iter_scenes(a.split, a.limit), lambda s: s.image)), indent=2)
    print(text)
    if a.json:
        Path(a.json).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
