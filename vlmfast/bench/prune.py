"""``vlmfast bench prune``: every pruner at keep 50/25/10/5%, accuracy and speed in one table.

Accuracy: ShapesWorld ``final`` by default (``--split``: the split kept for reported numbers, never used to
choose anything; VQA overall, POPE F1 averaged over the three POPE splits) on the trained embedded model
(``tiny-llava-shapes`` by default), and the fraction of the full model's VQA score. Speed: the same
configurations on the LLaVA-1.5-shaped random-weight proxy of ``bench prefill`` (speed-up vs. full measured
in one run, ideal speed-up from FLOPs, decode ms/token, KV bytes). Layer choices scale with each model's
depth (FastV K=2; PyramidDrop at 1/4, 1/2, 3/4 of the depth with ratio keep^(1/3)).

``--policy NAME_OR_PATH`` (repeatable) adds one row per policy file, e.g. the VFlowOpt settings that
``vlmfast search`` found for the model (``tiny-llava-shapes-vflowopt-25``); its ``keep`` is the layer-averaged
share of visual tokens the policy spent on ShapesWorld, and its speed row runs the same methods on the proxy.
"""

from __future__ import annotations

import statistics
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..accelerator import VLMAccelerator
from ..errors import InputError
from ..eval import shapes as shapes_eval
from ..policy import Policy, load_policy
from ..pruners import (
    CDPruner,
    DivPrune,
    Downsample,
    FasterVLM,
    FastV,
    FoPru,
    PyramidDrop,
    RandomPruner,
    VFlowOpt,
    VisionZip,
    ZipVL,
)
from . import prefill as bench_prefill
from .prefill import Config

KEEPS = (0.5, 0.25, 0.1, 0.05)
FIELDS = ["method", "keep", "vqa", "pope_f1", "fraction_of_full", "speedup", "ideal_speedup", "efficiency",
          "decode_ms_per_token", "kv_bytes"]


ROWS = ("fopru", "vflowopt", "fastervlm", "visionzip", "divprune", "cdpruner", "downsample", "random", "fastv",
        "pyramiddrop", "zipvl-quant", "zipvl-evict")


def method_configs(n_layers: int, keeps=KEEPS, methods: Sequence[str] | None = None) -> list[Config]:
    """The full model, then every method of ``ROWS`` (or of ``methods``) at each of ``keeps``, then ZipVL's rows."""
    unknown = sorted(set(methods or ()) - set(ROWS))
    if unknown:
        raise InputError(f"--methods: unknown row(s) {', '.join(unknown)}; expected some of: {', '.join(ROWS)}")
    wanted = set(methods or ROWS)
    thirds = sorted({max(1, round(n_layers * f)) for f in (0.25, 0.5, 0.75)})
    out = [Config("full", 1.0, Policy(source="full"))]
    for k in keeps:
        for name, m in [
            ("fopru", FoPru(keep=k)), ("vflowopt", VFlowOpt(keep=k)), ("fastervlm", FasterVLM(keep=k)),
            ("visionzip", VisionZip(keep=k)), ("divprune", DivPrune(keep=k)), ("cdpruner", CDPruner(keep=k)),
            ("downsample", Downsample(keep=k)), ("random", RandomPruner(keep=k)),
            ("fastv", FastV(layer=2, keep=k)),
            ("pyramiddrop", PyramidDrop(layers=thirds, ratio=round(k ** (1 / len(thirds)), 4))),
        ]:
            if name in wanted:
                out.append(Config(name, k, Policy([m], source=f"{name}@{k}")))
    for kv in ("quantize", "evict"):
        name = "zipvl-quant" if kv == "quantize" else "zipvl-evict"
        if name in wanted:
            out.append(Config(name, None, Policy([ZipVL(kv=kv)], source=name)))
    return out


def policy_configs(specs) -> list[Config]:
    """One row per policy file (name or path); ``keep`` is filled in from the measured share."""
    out = []
    for spec in specs:
        p = load_policy(spec)
        out.append(Config(p.name or str(spec), None, p))
    return out


def accuracy_rows(model_name: str, limit: int, keeps=KEEPS, progress: bool = True,
                  extra: Sequence[Config] = (), methods: Sequence[str] | None = None,
                  split: str = "final") -> list[dict]:
    """ShapesWorld rows (``limit`` scenes of ``split``) for every method at ``keeps`` (``methods``: only those
    rows; the full model always runs), then the ``extra`` (``policy_configs``) rows."""
    base = VLMAccelerator.from_pretrained(model_name, policy=None)
    cfgs = method_configs(len(base.adapter.decoder_layers), keeps, methods) + list(extra)
    rows = []
    for i, c in enumerate(tqdm(cfgs, desc="accuracy", disable=not progress)):
        acc = VLMAccelerator(base.model, base.processor, policy=c.policy)
        res = shapes_eval.evaluate(acc, split=split, limit=limit, tasks=("vqa", "pope"), progress=False)
        rows.append({"method": c.method, "keep": c.keep, "split": split, "scenes": res["n"],
                     "vqa": round(res["vqa"]["overall"], 4),
                     "pope_f1": round(statistics.mean(m["f1"] for m in res["pope"].values()), 4),
                     "visual_tokens_kept_shapes": round(res["cost"]["visual_tokens_kept"], 1)})
        if i >= len(cfgs) - len(extra):  # a --policy row: its budget is what it spent
            rows[-1]["keep"] = round(res["cost"]["layer_avg_visual_tokens"] / res["cost"]["visual_tokens_in"], 3)
    full = rows[0]["vqa"] or 1.0
    for r in rows:
        r["fraction_of_full"] = round(r["vqa"] / full, 4)
    return rows


def run(json_path=None, *, model: str = "tiny-llava-shapes", limit: int = 100, repeats: int = 3,
        decode_tokens: int = 8, keeps=KEEPS, progress: bool = True, spec=bench_prefill.PROXY,
        policies=(), methods: Sequence[str] | None = None, split: str = "final") -> list[dict]:
    torch.manual_seed(0)
    extra = policy_configs(policies)
    acc_rows = accuracy_rows(model, limit, keeps, progress, extra, methods, split)
    proxy, processor = bench_prefill.build_proxy(spec)
    cfgs = method_configs(proxy.config.text_config.num_hidden_layers, keeps, methods) + extra
    speed = bench_prefill.time_configs(proxy, processor, bench_prefill.random_image(spec.image_size), cfgs, repeats,
                                       decode_tokens, progress, desc="speed (proxy)")
    rows = [{**a, **{k: s[k] for k in ("speedup", "ideal_speedup", "efficiency", "decode_ms_per_token", "kv_bytes",
                                       "visual_tokens_kept", "layer_avg_visual_tokens")}}
            for a, s in zip(acc_rows, speed)]
    bench_prefill.write_json(rows, json_path)
    return rows


def table(rows: list[dict], markdown: bool = False) -> str:
    head = ["method", "keep", "VQA", "POPE F1", "of full", "speedup", "ideal", "eff", "decode ms/tok", "KV bytes"]
    body = [[r["method"], "dyn" if r["keep"] is None else str(r["keep"]), f"{r['vqa']:.3f}", f"{r['pope_f1']:.3f}",
             f"{r['fraction_of_full']:.3f}", str(r["speedup"]), str(r["ideal_speedup"]), str(r["efficiency"]),
             str(r["decode_ms_per_token"]), f"{r['kv_bytes']:,}"] for r in rows]
    return bench_prefill.format_table(head, body, markdown)
