"""``vlmfast eval shapes``: VQA, POPE and CHAIR on ShapesWorld with any model and policy.

Prints a metrics table and (optionally) writes JSON:
``{"model", "policy", "split", "n", "vqa": {"overall", <type>...}, "pope": {<split>: {"accuracy", "f1",
"yes_ratio", ...}}, "chair": {"chair_s", "chair_i", "recall"}, "grounding": {"miou", "pointing",
"peak_point_miou", "upper_bound_miou", "pruned_miou", "time", ...}, "cost": {...}}``; sections not evaluated
are absent (``grounding`` only when asked for: see :mod:`.grounding_eval`). ``blank=True`` replaces every
image by a uniform gray one (the "does it look?" control).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Iterable

from PIL import Image
from tqdm.auto import tqdm

from ..datasets.shapes import (
    CAPTION_PROMPT,
    POPE_SPLITS,
    caption_objects,
    chair,
    iter_scenes,
    pope_items,
    pope_metrics,
    vqa_accuracy,
    vqa_items,
)

TASKS = ("vqa", "pope", "chair", "grounding")
DEFAULT_TASKS = ("vqa", "pope", "chair")


def _batched(acc, jobs: list[tuple[Image.Image, str]], max_new_tokens: int, batch: int, desc: str, progress: bool):
    texts, stats = [], []
    for i in tqdm(range(0, len(jobs), batch), desc=desc, disable=not progress, leave=False):
        chunk = jobs[i:i + batch]
        outs = acc.generate(images=[[im] for im, _ in chunk], prompt=[p for _, p in chunk],
                            max_new_tokens=max_new_tokens)
        texts += [o.text for o in outs]
        stats += [o.stats for o in outs]
    return texts, stats


def evaluate(acc, split: str = "test", limit: int = 200, tasks: Iterable[str] = DEFAULT_TASKS, blank: bool = False,
             batch: int = 16, progress: bool = True, start: int = 0) -> dict:
    """The metrics of ``acc`` on scenes ``start .. start + limit - 1`` of ``split`` (module docstring)."""
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        from ..errors import InputError

        raise InputError(f"unknown task(s) {unknown}; expected a subset of {list(TASKS)}")
    scenes = list(iter_scenes(split, limit, start=start))
    gray = Image.new("RGB", (scenes[0].size, scenes[0].size), (128, 128, 128)) if scenes else None

    def image(scene) -> Image.Image:
        return gray if blank and gray is not None else scene.image  # gray: made whenever there are scenes

    result: dict = {"split": split, "n": len(scenes), "start": start, "blank_image": blank}
    all_stats = []
    task_stats: dict[str, list] = {}  # per task, for decode ms/token by answer length
    if "vqa" in tasks:
        items = [(s, it) for s in scenes for it in vqa_items(s, max_per_type=1)]
        preds, st = _batched(acc, [(image(s), it.question) for s, it in items], 4, batch, "vqa", progress)
        result["vqa"] = vqa_accuracy(preds, [it for _, it in items])
        all_stats += st
        task_stats["vqa"] = st
    if "pope" in tasks:
        result["pope"] = {}
        for sp in POPE_SPLITS:
            pope = [(s, it) for s in scenes for it in pope_items(s, sp)]
            preds, st = _batched(acc, [(image(s), it.question) for s, it in pope], 2, batch, f"pope {sp}", progress)
            result["pope"][sp] = {**pope_metrics(preds, [it.answer for _, it in pope]), "n": len(pope)}
            all_stats += st
            task_stats.setdefault("pope", []).extend(st)
    if "chair" in tasks:
        caps, st = _batched(acc, [(image(s), CAPTION_PROMPT) for s in scenes], 48, batch, "captions", progress)
        result["chair"] = {**chair(caps, [caption_objects(s) for s in scenes]), "n": len(caps)}
        result["captions_sample"] = caps[:3]
        all_stats += st
        task_stats["chair"] = st
    if "grounding" in tasks:  # referring-expression masks from attention + SAM (eval/grounding_eval.py)
        from .grounding import evaluate_grounding

        result["grounding"] = evaluate_grounding(acc, scenes, image, batch=batch, progress=progress)
    if all_stats:
        dec = [s.decode_ms_per_token for s in all_stats if s.decode_ms_per_token is not None]
        result["cost"] = {
            "visual_tokens_in": statistics.mean(s.visual_tokens_in for s in all_stats),
            "visual_tokens_kept": statistics.mean(s.visual_tokens_kept for s in all_stats),
            "layer_avg_visual_tokens": statistics.mean(s.layer_avg_visual_tokens for s in all_stats),
            "prefill_s_per_batch": statistics.median(s.prefill_s for s in all_stats),
            "decode_ms_per_token": statistics.median(dec) if dec else None,
            "decode_ms_per_token_by_task": {t: _median_decode(st) for t, st in task_stats.items()},
            "batch": batch,
        }
    return result


def _median_decode(stats: list) -> float | None:
    dec = [s.decode_ms_per_token for s in stats if s.decode_ms_per_token is not None]
    return round(statistics.median(dec), 3) if dec else None


def table(res: dict) -> str:
    rows = [("model", res.get("model", "")), ("policy", res.get("policy", "")),
            ("split / scenes", f"{res['split']} / {res['n']}" + ("  (blank images)" if res.get("blank_image") else ""))]
    if "vqa" in res:
        v = res["vqa"]
        rows.append(("VQA overall", f"{v['overall']:.3f}  (n={v['n']})"))
        rows += [(f"  {k}", f"{x:.3f}") for k, x in v.items() if k not in ("overall", "n")]
    if "pope" in res:
        for sp, m in res["pope"].items():
            rows.append((f"POPE {sp}",
                         f"acc {m['accuracy']:.3f}  F1 {m['f1']:.3f}  yes {m['yes_ratio']:.3f}  (n={m['n']})"))
    if "chair" in res:
        c = res["chair"]
        rows.append(("CHAIR", f"CHAIR_s {c['chair_s']:.3f}  CHAIR_i {c['chair_i']:.3f}  recall {c['recall']:.3f}"))
    if "grounding" in res and res["grounding"].get("n"):
        g = res["grounding"]
        rows.append(("grounding mIoU", f"{g['miou']:.3f}  pointing {g['pointing']:.3f}  (n={g['n']})"))
        rows.append(("  peak point / VL-SAM map", f"{g['peak_point_miou']:.3f} / {g['vlsam_map_miou']:.3f}"))
        rows.append(("  upper bound (GT centre)",
                     f"{g['upper_bound_miou']:.3f}  (a / c = {g['ratio_to_upper_bound']:.3f})"))
        rows.append((f"  FoPru {g['pruned_keep']:.0%}", f"{g['pruned_miou']:.3f}  pointing {g['pruned_pointing']:.3f}"))
        if "time" in g:
            t = g["time"]
            rows.append(("  grounding time overhead", f"{100 * t['overhead']:+.1f}% (new image), "
                                                      f"{100 * t['overhead_warm']:+.1f}% (image seen); captions "
                                                      f"{100 * t['caption_overhead']:+.1f}% / "
                                                      f"{100 * t['caption_overhead_warm']:+.1f}%"))
    if "cost" in res:
        c = res["cost"]
        rows.append(("visual tokens", f"{c['visual_tokens_in']:.0f} in, {c['visual_tokens_kept']:.0f} kept, "
                                      f"{c['layer_avg_visual_tokens']:.1f} layer avg"))
        by_task = c.get("decode_ms_per_token_by_task") or {}
        if by_task:
            rows.append(("decode ms/token", "  ".join(f"{t} {v:.2f}" for t, v in by_task.items() if v is not None)
                         + f"  (median per batch of {c.get('batch', '?')})"))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def run(model: str, policy, split: str, limit: int, tasks, json_path: str | None, blank: bool = False,
        batch: int = 16) -> dict:
    from ..accelerator import VLMAccelerator

    acc = VLMAccelerator.from_pretrained(model, policy=policy)
    shown = not acc.policy.is_empty or acc.policy.grounding is not None
    res = {"model": model, "policy": acc.policy.to_dict() if shown else "none",
           **evaluate(acc, split=split, limit=limit, tasks=tasks, blank=blank, batch=batch)}
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(res, indent=2))
    return res
