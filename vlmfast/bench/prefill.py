"""``vlmfast bench prefill``: full vs. FoPru and FastV, side by side in one process, on a LLaVA-1.5-shaped proxy.

The proxy has LLaVA-1.5's layout (CLIP tower at 336 px / patch 14 -> 576 visual tokens + CLS, features from
layer -2, a 2-layer projector, a Llama decoder with multi-head attention) at a width and depth that make one
prefill take about a second on 2 CPU cores. Weights are random: this measures speed, not accuracy.

Every configuration runs in the same process, interleaved round-robin over repeats (the machine is shared and
noisy), and each row reports the median. ``speedup`` = full prefill time / this prefill time, measured in
this run; ``ideal_speedup`` = FLOPs of the full prefill / FLOPs of this one (the vision layers that run included in
both, pruning's own scoring included in the pruned one), so ``speedup / ideal_speedup`` is the efficiency.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..accelerator import VLMAccelerator
from ..adapters import adapter_for
from ..adapters.llava import LlavaAdapter
from ..policy import Policy
from ..pruners import FastV, FoPru
from ..zoo.tiny import TinySpec, tiny_llava

PROMPT = (
    "describe this picture in detail : what objects do you see , what colour and shape is each object , "
    "where is each object in the scene , left or right , top or bottom , how many objects are there , "
    "and is there a red circle next to a blue square ? please answer briefly"
)

#: LLaVA-1.5 layout at CPU-sized width/depth (see module docstring): a Llama of width 1536 (MLP 4096, 8 layers,
#: 12 heads) and a CLIP tower (336 px / patch 14, width 384, 5 layers) sized so the tower's share of the
#: prefill FLOPs (~4.2%) matches LLaVA-1.5-7B's (CLIP ViT-L/14-336 ~0.38 TFLOP vs Vicuna-7B ~8.5 TFLOP on
#: ~650 tokens: ~4.3%), since that fixed cost bounds every pre-LLM pruner's speed-up.
PROXY = TinySpec(hidden=1536, layers=8, heads=12, kv_heads=12, intermediate=4096,
                 vision_hidden=384, vision_layers=5, vision_heads=6, image_size=336, patch=14, seed=0)
QUICK = TinySpec(hidden=64, layers=4, heads=4, kv_heads=4, intermediate=128,
                 vision_hidden=32, vision_layers=3, vision_heads=4, image_size=112, patch=14, seed=0)


@dataclass
class Config:
    method: str
    keep: float | None
    """None: filled in from the measured visual-token share (``bench prune``'s policy rows)"""
    policy: Policy


def configs(keeps=(0.5, 0.25, 0.1), fastv_layer: int = 2) -> list[Config]:
    out = [Config("full", 1.0, Policy(source="<full>"))]
    out += [Config("fopru", k, Policy([FoPru(keep=k)], source=f"fopru@{k}")) for k in keeps]
    out += [Config("fastv", k, Policy([FastV(layer=fastv_layer, keep=k)], source=f"fastv@{k}")) for k in keeps]
    return out


# -- FLOPs (multiply-add = 2) -------------------------------------------------------------------------------
def vision_flops(model, attention_layer: int | None = None) -> float:
    """The tower's layers that run (up to the feature layer, or the scored layer if later) and the projector."""
    adapter = adapter_for(model)
    assert isinstance(adapter, LlavaAdapter), "the FLOPs count is a LLaVA (CLIP tower) one"
    return tower_flops(model.config.vision_config, model.config.text_config.hidden_size,
                       adapter.layers_run(attention_layer))


def tower_flops(vc, text_hidden: int, layers: int) -> float:
    """``layers`` CLIP layers over the patches + CLS of vision config ``vc``, and the 2-layer projector into a
    decoder of width ``text_hidden``."""
    n = (vc.image_size // vc.patch_size) ** 2 + 1
    d, ff = vc.hidden_size, vc.intermediate_size
    per_layer = 2 * n * (4 * d * d + 2 * d * ff) + 4 * n * n * d
    projector = 2 * (n - 1) * (d * text_hidden + text_hidden * text_hidden)
    return layers * per_layer + projector


def llm_layer_flops(model, n: int) -> float:
    tc = model.config.text_config
    d, ff = tc.hidden_size, tc.intermediate_size
    hd = d // tc.num_attention_heads
    q, kv = tc.num_attention_heads * hd, tc.num_key_value_heads * hd
    linear = 2 * n * (d * q + 2 * d * kv + q * d + 3 * d * ff)
    return linear + attention_flops(model, n)  # QK^T and AV over the causal half: 2 * (2 * n^2/2 * q)


def scoring_flops(model) -> float:
    """FoPru reads one vision layer's attention: softmax(qk^T) over N+1 tokens (q, k come from the tower)."""
    vc = model.config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2 + 1
    return 2 * n * n * vc.hidden_size


def prefill_flops(model, stats, policy: Policy) -> float:
    """FLOPs of one prefill as this run did it: the vision tower, the pruner's scoring (when it reads the
    vision attention), and every decoder layer at the length it actually had (text + that layer's visual
    tokens); ZipVL's attention restricted to its important share."""
    vp = policy.vision_pruners
    scored = bool(vp) and vp[0].needs_attention
    flops = vision_flops(model, vp[0].attention_layer() if scored else None)
    if scored:
        flops += scoring_flops(model)
    share = next((st["important_share"] for st in stats.stages if "important_share" in st), 1.0)
    for v in stats.visual_tokens_per_layer:  # ZipVL: all tokens through the linear layers, attention among
        n = stats.text_tokens + v               # its important share only (share = 1 otherwise)
        flops += llm_layer_flops(model, n) - attention_flops(model, n) + attention_flops(model, share * n)
    return flops


def attention_flops(model, n: float) -> float:
    tc = model.config.text_config
    return 2 * n * n * tc.num_attention_heads * (tc.hidden_size // tc.num_attention_heads)


def build_proxy(spec: TinySpec = PROXY):
    model, processor = tiny_llava(spec)
    model.generation_config.eos_token_id = None  # random weights: never stop early, decode a fixed length
    return model, processor


def time_configs(model, processor, image, cfgs: list[Config], repeats: int, decode_tokens: int,
                 progress: bool = True, desc: str = "bench") -> list[dict]:
    """Run every configuration round-robin ``repeats`` times in this process; one row per configuration,
    with medians and speed-ups against the first configuration (which must be the full model)."""
    accs = [VLMAccelerator(model, processor, policy=c.policy) for c in cfgs]
    results: list[list] = [[] for _ in cfgs]
    for a in accs:  # warm-up
        a.generate(images=[image], prompt=PROMPT, max_new_tokens=2)
    with tqdm(total=repeats * len(cfgs), desc=desc, disable=not progress) as bar:
        for _ in range(repeats):
            for i, a in enumerate(accs):
                results[i].append(a.generate(images=[image], prompt=PROMPT, max_new_tokens=decode_tokens + 1).stats)
                bar.update(1)
    full_prefill = statistics.median(s.prefill_s for s in results[0])
    f_full = prefill_flops(model, results[0][0], cfgs[0].policy)
    rows = []
    for c, st in zip(cfgs, results):
        prefill = statistics.median(s.prefill_s for s in st)
        overhead = statistics.median(s.scoring_s for s in st)
        row = {
            "method": c.method, "keep": c.keep, "visual_tokens_in": st[0].visual_tokens_in,
            "visual_tokens_kept": st[0].visual_tokens_final,
            "layer_avg_visual_tokens": round(st[0].layer_avg_visual_tokens, 1),
            "prefill_s": round(prefill, 4), "speedup": round(full_prefill / prefill, 3),
            "ideal_speedup": round(f_full / prefill_flops(model, st[0], c.policy), 3),
            "overhead_s": round(overhead, 4), "overhead_pct_of_full": round(100 * overhead / full_prefill, 2),
            "decode_ms_per_token": round(statistics.median(s.decode_ms_per_token for s in st), 2),
            "kv_bytes": st[0].kv_bytes, "seq_len": st[0].text_tokens + st[0].visual_tokens_in, "repeats": repeats,
        }
        row["efficiency"] = round(row["speedup"] / row["ideal_speedup"], 3)
        rows.append(row)
    return rows


def random_image(size: int) -> Image.Image:
    return Image.fromarray((np.random.default_rng(0).random((size, size, 3)) * 255).astype("uint8"))


def write_json(rows: list[dict], json_path) -> None:
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(rows, indent=2))


def run(json_path: str | Path | None = None, *, spec: TinySpec = PROXY, repeats: int = 5, decode_tokens: int = 8,
        keeps=(0.5, 0.25, 0.1), threads: int | None = None, progress: bool = True) -> list[dict]:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, processor = build_proxy(spec)
    rows = time_configs(model, processor, random_image(spec.image_size), configs(keeps), repeats, decode_tokens,
                        progress, desc="bench prefill")
    write_json(rows, json_path)
    return rows


COLUMNS = [("method", "method"), ("keep", "keep"), ("visual_tokens_kept", "vis kept"),
           ("prefill_s", "prefill s"), ("speedup", "speedup"), ("ideal_speedup", "ideal"), ("efficiency", "eff"),
           ("overhead_pct_of_full", "overhead %"), ("decode_ms_per_token", "decode ms/tok"), ("kv_bytes", "KV bytes")]


def table(rows: list[dict], markdown: bool = False) -> str:
    head = [h for _, h in COLUMNS]
    body = [[f"{r[k]:,}" if k == "kv_bytes" else str(r[k]) for k, _ in COLUMNS] for r in rows]
    return format_table(head, body, markdown)


def format_table(head: list[str], body: list[list[str]], markdown: bool = False) -> str:
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])

