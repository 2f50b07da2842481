"""``vlmfast bench prefill``: full vs. pruned prefill, side by side in one process, on a random-weight proxy of a
real model's layout (``--family``: one proxy per model family, :data:`PROXIES`).

* ``llava`` (the default): LLaVA-1.5's layout (CLIP tower at 336 px / patch 14 -> 576 visual tokens + CLS, features
  from layer -2, a 2-layer projector, a Llama decoder with multi-head attention), full vs. FoPru and FastV.
* ``qwen2.5-vl``: Qwen2.5-VL-7B's layout (a windowed tower with a few full-attention blocks, the 2x2 merger, a
  Qwen2 decoder with grouped-query attention) on one 1,008 px image (1,296 LLM tokens), full vs. FoPru, DivPrune
  and FastV. See :func:`qwen2_5_vl_proxy`.
* ``qwen3-vl``: Qwen3-VL-8B's layout (a tower with full attention in every block, DeepStack mergers feeding the
  first decoder layers, a Qwen3 decoder with grouped-query attention) on one 1,024 px image (1,024 LLM tokens).
  See :func:`qwen3_vl_proxy`.
* ``llava-next``: LLaVA-v1.6-7B's layout (anyres: a 336 px base crop and 2 x 2 tiles of a 672 px image through a CLIP
  tower, 2,880 visual tokens + 48 newlines, a Llama decoder). See :func:`llava_next_proxy`.

Each proxy has the real model's layout at a width and depth that make one prefill take a second or two on 2 CPU
cores, with the tower's share of the prefill FLOPs kept at the real model's (that fixed cost bounds every pre-LLM
pruner's speed-up). Weights are random: this measures speed, not accuracy.

Every configuration runs in the same process, interleaved round-robin over repeats (the machine is shared and
noisy), and each row reports the median. ``speedup`` = full prefill time / this prefill time, measured in
this run; ``ideal_speedup`` = FLOPs of the full prefill / FLOPs of this one (the vision layers that run included in
both, pruning's own scoring included in the pruned one), so ``speedup / ideal_speedup`` is the efficiency.
``overhead_pct_of_full`` / ``overhead_pct_of_prefill``: the pruner's own time (``Stats.scoring_s``: reading the
vision attention, scoring, selecting) as a share of the full prefill / of this row's prefill.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace as NS
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..accelerator import VLMAccelerator
from ..adapters import adapter_for
from ..policy import Policy
from ..pruners import DivPrune, FastV, FoPru
from ..zoo.tiny import TinySpec, _qwen_model_and_processor, _qwen_text, tiny_llava, tiny_llava_next, tiny_qwen3_vl

PROMPT = (
    "describe this picture in detail : what objects do you see , what colour and shape is each object , "
    "where is each object in the scene , left or right , top or bottom , how many objects are there , "
    "and is there a red circle next to a blue square ? please answer briefly"
)

Grid = tuple[int, int, int]
"""one image's (t, h, w) in the tower's patches"""

#: LLaVA-1.5 layout at CPU-sized width/depth (see module docstring): a Llama of width 1536 (MLP 4096, 8 layers,
#: 12 heads) and a CLIP tower (336 px / patch 14, width 384, 5 layers) sized so the tower's share of the
#: prefill FLOPs (~4.2%) matches LLaVA-1.5-7B's (CLIP ViT-L/14-336 ~0.38 TFLOP vs Vicuna-7B ~8.5 TFLOP on
#: ~650 tokens: ~4.3%), since that fixed cost bounds every pre-LLM pruner's speed-up.
PROXY = TinySpec(hidden=1536, layers=8, heads=12, kv_heads=12, intermediate=4096,
                 vision_hidden=384, vision_layers=5, vision_heads=6, image_size=336, patch=14, seed=0)
QUICK = TinySpec(hidden=64, layers=4, heads=4, kv_heads=4, intermediate=128,
                 vision_hidden=32, vision_layers=3, vision_heads=4, image_size=112, patch=14, seed=0)

#: Qwen2.5-VL-7B (its config.json): the tower and the Qwen2-7B decoder, for the real tower share of the FLOPs
QWEN2_5_VL_7B: dict[str, dict[str, Any]] = dict(
    vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3, patch_size=14,
                temporal_patch_size=2, spatial_merge_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                out_hidden_size=3584),
    text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
              num_key_value_heads=4),
)
#: Qwen2.5-VL-7B's layout at CPU-sized width/depth (see :func:`qwen2_5_vl_proxy` for the numbers)
QWEN2_5_VL_PROXY = TinySpec(hidden=896, layers=4, heads=7, kv_heads=1, intermediate=4736,
                            vision_hidden=128, vision_layers=16, vision_heads=2, image_size=1008, patch=14, seed=0)
QWEN2_5_VL_QUICK = TinySpec(hidden=64, layers=4, heads=4, kv_heads=2, intermediate=128,
                            vision_hidden=32, vision_layers=4, vision_heads=2, image_size=224, patch=14, seed=0)


def qwen2_5_vl_config(spec: TinySpec = QWEN2_5_VL_PROXY, full_every: int = 8):
    """Qwen2.5-VL-7B's layout at ``spec``'s width and depth: patch 14, temporal patch 2, 2x2 merger, a SwiGLU MLP at
    7B's ratio (3420 / 1280), window attention in 112 px windows (4 x 4 merged tokens, 8 x 8 patches) except every
    ``full_every``-th block counted back from the last (7B: blocks 7, 15, 23, 31 of 32), which attends over the whole
    image; a Qwen2 decoder with grouped-query attention. Returns (config, tokenizer, vocabulary)."""
    from transformers import Qwen2_5_VLConfig

    tok, vocab, text, ids = _qwen_text(spec)
    depth = spec.vision_layers
    seven = QWEN2_5_VL_7B["vision"]
    cfg = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(
            depth=depth, hidden_size=spec.vision_hidden, num_heads=spec.vision_heads, out_hidden_size=spec.hidden,
            intermediate_size=round(spec.vision_hidden * seven["intermediate_size"] / seven["hidden_size"]),
            patch_size=spec.patch, spatial_merge_size=2, temporal_patch_size=2, window_size=8 * spec.patch,
            fullatt_block_indexes=sorted(range(depth - 1, -1, -full_every)),
        ),
        **ids,
    )
    return cfg, tok, vocab


def qwen2_5_vl_proxy(spec: TinySpec = QWEN2_5_VL_PROXY, full_every: int = 8):
    """A random-weight ``Qwen2_5_VLForConditionalGeneration`` and its processor with Qwen2.5-VL-7B's layout
    (:func:`qwen2_5_vl_config`).

    :data:`QWEN2_5_VL_PROXY`, on one 1,008 x 1,008 image (the processor keeps it: 72 x 72 = 5,184 patches -> 36 x 36 =
    1,296 LLM tokens) and :data:`PROMPT` (64 text tokens, 1,360 in all): the tower has 16 blocks (full attention in 7
    and 15) of width 128 (2 heads of 64, MLP 342); the decoder is Qwen2-7B at a quarter of its width (896, 7 heads /
    1 KV head of 128, MLP 4736) and 4 layers. FLOPs (multiply-add = 2, :func:`prefill_flops`): tower + merger 66.0
    GFLOP, decoder 171.7: the tower's share is 27.8%. Qwen2.5-VL-7B on the same tokens (:data:`QWEN2_5_VL_7B`):
    tower 7.26 TFLOP (blocks' linear layers 6.53, full-attention blocks' attention 0.55, merger 0.12), Qwen2-7B
    18.12 TFLOP: 28.6% (:func:`qwen2_5_vl_tower_share`).

    What the share cannot carry: the patch count is fixed by the image, so at a CPU width the terms in N^2 weigh ~10x
    more than at 7B: the two full-attention blocks' attention is 42% of the proxy's tower (7B: 7.6%), and FoPru's
    scoring (softmax(q k^T) of one full block over 5,184 patches) is 6.9 GFLOP, 2.9% of the full prefill and 7.2% of
    FoPru-10%'s (7B: 68.8 GFLOP, 0.27% and 0.70%). FoPru's FLOP ideal at 10% is 2.49 here, 2.58 at 7B.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    cfg, tok, vocab = qwen2_5_vl_config(spec, full_every)
    return _qwen_model_and_processor(Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, cfg, spec, tok, vocab)


#: Qwen3-VL-8B (its config.json): the tower (DeepStack from blocks 8, 16, 24) and the Qwen3-8B decoder
QWEN3_VL_8B: dict[str, dict[str, Any]] = dict(
    vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, in_channels=3, patch_size=16,
                temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=4096,
                deepstack_visual_indexes=[8, 16, 24]),
    text=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
              num_key_value_heads=8, head_dim=128),
)
#: Qwen3-VL-8B's layout at CPU-sized width/depth (see :func:`qwen3_vl_proxy` for the numbers)
QWEN3_VL_PROXY = TinySpec(hidden=1024, layers=9, heads=8, kv_heads=2, intermediate=3072,
                          vision_hidden=128, vision_layers=9, vision_heads=2, image_size=1024, patch=16, seed=0)
QWEN3_VL_QUICK = TinySpec(hidden=64, layers=4, heads=4, kv_heads=2, intermediate=128,
                          vision_hidden=32, vision_layers=3, vision_heads=2, image_size=256, patch=16, seed=0)


def qwen3_vl_proxy(spec: TinySpec = QWEN3_VL_PROXY):
    """A random-weight ``Qwen3VLForConditionalGeneration`` and its processor with Qwen3-VL-8B's layout: patch 16,
    temporal patch 2, 2x2 merger, a GELU MLP at 8B's ratio (4304 / 1152), full attention in every block, DeepStack
    from a third of the way, two thirds and the last block (8B: 8, 16, 24 of 27) into decoder layers 0-2.

    :data:`QWEN3_VL_PROXY`, on one 1,024 x 1,024 image (Qwen3-VL's processor makes a 1,008 px image 1,024 px, a
    multiple of 32: 64 x 64 = 4,096 patches -> 1,024 LLM tokens) and :data:`PROMPT`: 9 blocks of width 128 (2 heads
    of 64, MLP 478; DeepStack from blocks 2, 5, 8); a Qwen3 decoder at a quarter of Qwen3-8B's width (1024, 8
    heads / 2 KV heads of 128, MLP 3072) and 9 layers. Its tower's FLOP share is 27.8%, 8B's 27.3%
    (``tests/tools/test_bench_prefill.py``); as for Qwen2.5-VL, the N^2 terms weigh far more at this width (every
    block attends over 4,096 patches), so the tower's attention is most of its FLOPs here and FoPru's scoring is a
    larger share than at 8B."""
    side = QWEN3_VL_8B["vision"]
    depth = spec.vision_layers
    levels = [round(depth * i / 3) - 1 for i in (1, 2, 3)] if depth >= 3 else list(range(depth))
    return tiny_qwen3_vl(spec, vision_intermediate=round(spec.vision_hidden * side["intermediate_size"]
                                                         / side["hidden_size"]), deepstack=levels)


#: LLaVA-v1.6 (LLaVA-NeXT) layout at the LLaVA-1.5 proxy's sizes: CLIP crops of 336 px, pinpoints up to 2 x 2
LLAVA_NEXT_PROXY = PROXY
LLAVA_NEXT_QUICK = QUICK


def llava_next_proxy(spec: TinySpec = LLAVA_NEXT_PROXY):
    """A random-weight ``LlavaNextForConditionalGeneration`` and its processor with LLaVA-v1.6-7B's layout at the
    LLaVA-1.5 proxy's sizes (:data:`PROXY`: CLIP width 384, 5 layers; Llama width 1536, 8 layers). Benched on a
    672 x 672 image: the 336 px base crop and the 2 x 2 tiles, 5 x 576 = 2,880 visual tokens and 48
    ``image_newline`` tokens (never pruned). The tower runs once per crop: its FLOP share is 3.4% here, 4.2% for
    LLaVA-v1.6-Mistral-7B on the same 2,989 tokens (5 CLIP-L passes up to layer -2 against Mistral-7B)."""
    return tiny_llava_next(spec)


# -- FLOPs (multiply-add = 2) -------------------------------------------------------------------------------
def tower_flops(vc, text_hidden: int, layers: int) -> float:
    """The patch embedding and ``layers`` CLIP layers over the patches + CLS of vision config ``vc``, and the
    2-layer projector into a decoder of width ``text_hidden``."""
    n = (vc.image_size // vc.patch_size) ** 2 + 1
    d, ff = vc.hidden_size, vc.intermediate_size
    embed = 2 * (n - 1) * (vc.num_channels * vc.patch_size ** 2) * d
    per_layer = 2 * n * (4 * d * d + 2 * d * ff) + 4 * n * n * d
    projector = 2 * (n - 1) * (d * text_hidden + text_hidden * text_hidden)
    return embed + layers * per_layer + projector


def windows(grid: Grid, vc) -> list[int]:
    """Patches per attention window of a Qwen2.5-VL tower (config ``vc``) over one image of ``grid`` patches:
    squares of ``window_size`` pixels in merged-token units, cut short at the bottom and right edges; per frame
    group."""
    t, h, w = grid
    m = vc.spatial_merge_size
    side = vc.window_size // m // vc.patch_size  # merged tokens per window side

    def cuts(n: int) -> list[int]:
        return [side] * (n // side) + ([n % side] if n % side else [])

    return [a * b * m * m for _ in range(t) for a in cuts(h // m) for b in cuts(w // m)]


def qwen2_5_vl_tower_flops(vc, grid: Grid) -> float:
    """A Qwen2.5-VL tower (config ``vc``) over one image: patch embedding (a linear map of each
    ``3 x temporal_patch x patch x patch`` patch), ``depth`` blocks (qkv and output projections, SwiGLU MLP; attention
    QK^T and AV within each window, over the whole frame group in ``fullatt_block_indexes``), and the merger (RMSNorm,
    then Linear(4d, 4d), GELU, Linear(4d, out) over each 2x2 group)."""
    t, h, w = grid
    n, d, ff = t * h * w, vc.hidden_size, vc.intermediate_size
    m2 = vc.spatial_merge_size ** 2
    embed = 2 * n * (vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2) * d
    linear = 2 * n * (4 * d * d + 3 * d * ff)
    full = {i % vc.depth for i in vc.fullatt_block_indexes}
    attention_full = 4 * t * (h * w) ** 2 * d
    attention_windowed = 4 * sum(p * p for p in windows(grid, vc)) * d
    blocks = sum(linear + (attention_full if i in full else attention_windowed) for i in range(vc.depth))
    merger = 2 * (n // m2) * ((m2 * d) ** 2 + m2 * d * vc.out_hidden_size)
    return embed + blocks + merger


def qwen3_vl_tower_flops(vc, grid: Grid) -> float:
    """A Qwen3-VL tower (config ``vc``) over one image: patch embedding, ``depth`` blocks (qkv and output
    projections, a two-layer GELU MLP, attention over the whole frame group in every block), and the merger plus one
    DeepStack merger per level (each Linear(4d, 4d), GELU, Linear(4d, out) over each 2x2 group)."""
    t, h, w = grid
    n, d, ff = t * h * w, vc.hidden_size, vc.intermediate_size
    m2 = vc.spatial_merge_size ** 2
    embed = 2 * n * (vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2) * d
    block = 2 * n * (4 * d * d + 2 * d * ff) + 4 * t * (h * w) ** 2 * d
    mergers = (1 + len(vc.deepstack_visual_indexes)) * 2 * (n // m2) * ((m2 * d) ** 2 + m2 * d * vc.out_hidden_size)
    return embed + vc.depth * block + mergers


def qwen2_5_vl_scoring_flops(vc, grid: Grid) -> float:
    """Reading one full-attention block's attention: softmax(q k^T) over each frame group's patches (q, k come
    from the tower)."""
    t, h, w = grid
    return 2 * t * (h * w) ** 2 * vc.hidden_size


def _llava_tower(model, grid: Grid, attention_layer: int | None) -> float:
    layers = adapter_for(model).layers_run(attention_layer)  # type: ignore[attr-defined]  # LlavaAdapter's
    return tower_flops(model.config.vision_config, model.config.text_config.hidden_size, layers)


def _llava_scoring(model, grid: Grid) -> float:
    n = grid[0] * grid[1] * grid[2] + 1  # the patches + CLS
    return 2 * n * n * model.config.vision_config.hidden_size


def _llava_grid(model, processor, image) -> Grid:
    vc = model.config.vision_config
    side = vc.image_size // vc.patch_size
    return (1, side, side)


def _llava_next_grid(model, processor, image) -> Grid:
    """(crops, side, side): the tower runs once per crop (the base one and the tiles), each attending on its own."""
    if processor is None or image is None:
        raise ValueError("LLaVA-NeXT's crops depend on the image: pass the image's grid")
    crops = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"].shape[1]
    _, side, _ = _llava_grid(model, processor, image)
    return (int(crops), side, side)


def _processor_grid(model, processor, image) -> Grid:
    if processor is None or image is None:
        raise ValueError(f"{type(model).__name__}'s grid depends on the image: pass the image's grid")
    t, h, w = processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0].tolist()
    return (int(t), int(h), int(w))


@dataclass(frozen=True)
class TowerCount:
    """How one family's vision side is counted: an image's patch grid, the tower's FLOPs (the layers that run, with
    the projector / merger), and the FLOPs of reading one of its layers' attention (attention-scoring pruners)."""

    grid: Callable[[Any, Any, Any], Grid]
    """(model, processor, image) -> the grid the tower sees"""
    tower: Callable[[Any, Grid, int | None], float]
    """(model, grid, scored vision layer or None) -> FLOPs"""
    scoring: Callable[[Any, Grid], float]
    """(model, grid) -> FLOPs"""
    views: Callable[[int, Grid], list[int]] = lambda n, grid: [n]
    """(LLM visual tokens, grid) -> the tokens of each view (pruners select within each view)"""


#: by the adapter's ``family``
TOWERS: dict[str, TowerCount] = {
    "llava": TowerCount(_llava_grid, _llava_tower, _llava_scoring),
    "llava_next": TowerCount(_llava_next_grid,
                             lambda model, grid, layer: grid[0] * _llava_tower(model, (1, *grid[1:]), layer),
                             lambda model, grid: grid[0] * _llava_scoring(model, (1, *grid[1:])),
                             lambda n, grid: [grid[1] * grid[2], n - grid[1] * grid[2]]),  # base, high-res
    "qwen2_5_vl": TowerCount(_processor_grid,
                             lambda model, grid, layer: qwen2_5_vl_tower_flops(model.config.vision_config, grid),
                             lambda model, grid: qwen2_5_vl_scoring_flops(model.config.vision_config, grid)),
    "qwen3_vl": TowerCount(_processor_grid,
                           lambda model, grid, layer: qwen3_vl_tower_flops(model.config.vision_config, grid),
                           lambda model, grid: qwen2_5_vl_scoring_flops(model.config.vision_config, grid)),
}


def tower_count(model) -> TowerCount:
    family = adapter_for(model).family
    if family not in TOWERS:
        raise NotImplementedError(f"no FLOP count for the {family} tower (bench.prefill.TOWERS)")
    return TOWERS[family]


def image_grid(model, processor, image) -> Grid:
    return tower_count(model).grid(model, processor, image)


def vision_flops(model, attention_layer: int | None = None, grid: Grid | None = None) -> float:
    """The tower's layers that run (LLaVA: up to the feature layer, or the scored layer if later) and the
    projector / merger, over one image of ``grid`` patches (None: LLaVA's fixed grid)."""
    count = tower_count(model)
    return count.tower(model, grid or count.grid(model, None, None), attention_layer)


def scoring_flops(model, grid: Grid | None = None) -> float:
    """An attention-scoring pruner (FoPru) reads one vision layer's attention: softmax(qk^T) over its tokens."""
    count = tower_count(model)
    return count.scoring(model, grid or count.grid(model, None, None))


def similarity_flops(model, n: int, grid: Grid | None = None) -> float:
    """DivPrune's pairwise cosine similarity of ``n`` LLM-input visual tokens, within each view (its greedy
    selection is O(k n) comparisons, not counted)."""
    count = tower_count(model)
    views = count.views(n, grid or count.grid(model, None, None))
    return sum(2 * v * v * model.config.text_config.hidden_size for v in views)


def llm_layer_flops(model, n: int) -> float:
    tc = model.config.text_config
    d, ff = tc.hidden_size, tc.intermediate_size
    hd = d // tc.num_attention_heads
    q, kv = tc.num_attention_heads * hd, tc.num_key_value_heads * hd
    linear = 2 * n * (d * q + 2 * d * kv + q * d + 3 * d * ff)
    return linear + attention_flops(model, n)  # QK^T and AV over the causal half: 2 * (2 * n^2/2 * q)


def prefill_flops(model, stats, policy: Policy, grid: Grid | None = None) -> float:
    """FLOPs of one prefill of one image of ``grid`` patches (None: LLaVA's fixed grid) as this run did it: the
    vision tower, the pruner's scoring (reading the vision attention; DivPrune's similarities), and every decoder
    layer at the length it actually had (text + that layer's visual tokens); ZipVL's attention restricted to its
    important share."""
    vp = policy.vision_pruners
    scored = bool(vp) and vp[0].needs_attention
    flops = vision_flops(model, vp[0].attention_layer() if scored else None, grid)
    if scored:
        flops += scoring_flops(model, grid)
    elif vp and isinstance(vp[0], DivPrune):
        flops += similarity_flops(model, stats.visual_tokens_in, grid)
    share = next((st["important_share"] for st in stats.stages if "important_share" in st), 1.0)
    for v in stats.visual_tokens_per_layer:  # ZipVL: all tokens through the linear layers, attention among
        n = stats.text_tokens + v               # its important share only (share = 1 otherwise)
        flops += llm_layer_flops(model, n) - attention_flops(model, n) + attention_flops(model, share * n)
    return flops


def attention_flops(model, n: float) -> float:
    tc = model.config.text_config
    return 2 * n * n * tc.num_attention_heads * (tc.hidden_size // tc.num_attention_heads)


def qwen2_5_vl_tower_share(vc, tc, grid: Grid = (1, 72, 72), text_tokens: int = 64,
                           tower_flops: Callable[[Any, Grid], float] = qwen2_5_vl_tower_flops) -> float:
    """The tower's share of a Qwen2.5-VL's full prefill FLOPs (vision config ``vc``, text config ``tc``) on one image
    of ``grid`` patches (default: the 1,008 px image, 1,296 LLM tokens) and ``text_tokens``
    (``qwen2_5_vl_tower_share(NS(**QWEN2_5_VL_7B["vision"]), NS(**QWEN2_5_VL_7B["text"]))``: the 7B's). Qwen3-VL:
    ``tower_flops=qwen3_vl_tower_flops``, ``grid=(1, 64, 64)``."""
    tower = tower_flops(vc, grid)
    n = text_tokens + grid[0] * grid[1] * grid[2] // vc.spatial_merge_size ** 2
    llm = tc.num_hidden_layers * llm_layer_flops(NS(config=NS(text_config=tc)), n)
    return tower / (tower + llm)


# -- the proxies ---------------------------------------------------------------------------------------------
def _fopru(keep: float, fastv_layer: int):
    return FoPru(keep=keep)


def _divprune(keep: float, fastv_layer: int):
    return DivPrune(keep=keep)


def _fastv(keep: float, fastv_layer: int):
    return FastV(layer=fastv_layer, keep=keep)


#: the methods a proxy can be benched with, by row name: (keep, FastV's layer) -> method
METHODS: dict[str, Callable[[float, int], Any]] = {"fopru": _fopru, "divprune": _divprune, "fastv": _fastv}

COLUMNS = [("method", "method"), ("keep", "keep"), ("visual_tokens_kept", "vis kept"),
           ("prefill_s", "prefill s"), ("speedup", "speedup"), ("ideal_speedup", "ideal"), ("efficiency", "eff"),
           ("overhead_pct_of_full", "overhead %"), ("decode_ms_per_token", "decode ms/tok"), ("kv_bytes", "KV bytes")]
#: the overhead as a share of the row's own (pruned) prefill
COLUMNS_SCORING = [c if c[0] != "overhead_pct_of_full" else ("overhead_pct_of_prefill", "scoring %") for c in COLUMNS]


@dataclass(frozen=True)
class Proxy:
    """One family's benchmark proxy: how it is built, at which sizes, which methods run beside ``full``, and the
    table's columns."""

    build: Callable[[TinySpec], tuple[Any, Any]]
    spec: TinySpec
    quick: TinySpec
    """a tiny one, for smoke tests (``--quick``)"""
    methods: tuple[str, ...] = ("fopru", "fastv")
    columns: list[tuple[str, str]] = field(default_factory=lambda: COLUMNS)
    image_scale: int = 1
    """the benched image's side, in multiples of ``spec.image_size`` (LLaVA-NeXT: 2 x 2 tiles of a 336 px crop)"""


#: ``--family`` -> proxy
PROXIES: dict[str, Proxy] = {
    "llava": Proxy(tiny_llava, PROXY, QUICK),
    "qwen2.5-vl": Proxy(qwen2_5_vl_proxy, QWEN2_5_VL_PROXY, QWEN2_5_VL_QUICK, ("fopru", "divprune", "fastv"),
                        COLUMNS_SCORING),
    "qwen3-vl": Proxy(qwen3_vl_proxy, QWEN3_VL_PROXY, QWEN3_VL_QUICK, ("fopru", "divprune", "fastv"), COLUMNS_SCORING),
    "llava-next": Proxy(llava_next_proxy, LLAVA_NEXT_PROXY, LLAVA_NEXT_QUICK, ("fopru", "divprune", "fastv"),
                        COLUMNS_SCORING, image_scale=2),
}


@dataclass
class Config:
    method: str
    keep: float | None
    """None: filled in from the measured visual-token share (``bench prune``'s policy rows)"""
    policy: Policy


def configs(keeps=(0.5, 0.25, 0.1), fastv_layer: int = 2, methods=("fopru", "fastv")) -> list[Config]:
    out = [Config("full", 1.0, Policy(source="<full>"))]
    for name in methods:
        out += [Config(name, k, Policy([METHODS[name](k, fastv_layer)], source=f"{name}@{k}")) for k in keeps]
    return out


def build_proxy(spec: TinySpec = PROXY, family: str = "llava"):
    model, processor = PROXIES[family].build(spec)
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
    grid = image_grid(model, processor, image)
    full_prefill = statistics.median(s.prefill_s for s in results[0])
    f_full = prefill_flops(model, results[0][0], cfgs[0].policy, grid)
    rows = []
    for c, st in zip(cfgs, results):
        prefill = statistics.median(s.prefill_s for s in st)
        overhead = statistics.median(s.scoring_s for s in st)
        row = {
            "method": c.method, "keep": c.keep, "visual_tokens_in": st[0].visual_tokens_in,
            "visual_tokens_kept": st[0].visual_tokens_final,
            "layer_avg_visual_tokens": round(st[0].layer_avg_visual_tokens, 1),
            "prefill_s": round(prefill, 4), "speedup": round(full_prefill / prefill, 3),
            "ideal_speedup": round(f_full / prefill_flops(model, st[0], c.policy, grid), 3),
            "overhead_s": round(overhead, 4), "overhead_pct_of_full": round(100 * overhead / full_prefill, 2),
            "overhead_pct_of_prefill": round(100 * statistics.median(s.scoring_s / s.prefill_s for s in st), 2),
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


def run(json_path: str | Path | None = None, *, family: str = "llava", spec: TinySpec | None = None,
        repeats: int = 5, decode_tokens: int = 8, keeps=(0.5, 0.25, 0.1), threads: int | None = None,
        progress: bool = True) -> list[dict]:
    """Bench ``family``'s proxy (:data:`PROXIES`; ``spec``: its sizes, default the proxy's own)."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    proxy = PROXIES[family]
    spec = spec or proxy.spec
    model, processor = build_proxy(spec, family)
    image = random_image(spec.image_size * proxy.image_scale)
    rows = time_configs(model, processor, image, configs(keeps, methods=proxy.methods),
                        repeats, decode_tokens, progress, desc=f"bench prefill ({family})")
    write_json(rows, json_path)
    return rows


def table(rows: list[dict], markdown: bool = False, columns: list[tuple[str, str]] = COLUMNS) -> str:
    head = [h for _, h in columns]
    body = [[f"{r[k]:,}" if k == "kv_bytes" else str(r[k]) for k, _ in columns] for r in rows]
    return format_table(head, body, markdown)


def format_table(head: list[str], body: list[list[str]], markdown: bool = False) -> str:
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])
