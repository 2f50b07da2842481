"""``vlmfast bench grounding``: what ``ground=True`` adds to a generate call when SAM and the VLM have the
compute ratio of real checkpoints (``vlmfast bench grounding --markdown --json docs/results/bench_grounding.json``,
about 3 minutes on 2 cores).

On the embedded pair the ratio is not a real one: tiny-sam-shapes' image encoder (~1.2 GFLOPs at 256 px) runs
about as long as a whole tiny-llava-shapes call, which is bound by per-op overhead, not FLOPs, so the grounding
overhead measured there (``vlmfast eval shapes --task grounding``) says little about a deployment. Here the
LLaVA-1.5-shaped random-weight proxy of ``bench prefill`` is paired with random-weight SAMs of
segment-anything's own layout (1024 px input, patch 16, windowed attention with window 14 and a third of the
blocks global, neck to 256 channels, the real prompt encoder and mask decoder) whose image encoder is sized so
that

    encoder FLOPs / proxy prefill FLOPs  =  SAM ViT-x encoder FLOPs / LLaVA-1.5-7B prefill FLOPs

for x = B, L, H (encoder FLOPs counted by ``torch.utils.flop_counter`` on meta-device models; prefill FLOPs by
:func:`~.bench_prefill.prefill_flops`' formulas at the proxy's sequence length). The calls are timed with the
protocol of the ShapesWorld time section (:func:`~.grounding_eval.interleaved_times`): a plain call, the call
with ``ground=True`` on a new image (SAM encodes it), and again with SAM holding the image. The ratio is matched
for the prefill only: a real 7B call on a GPU spends much of its time decoding (memory-bound), which makes the
real overhead smaller than the proxy's for answers of more than a few tokens. Weights are random: this measures
time, not masks.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..eval.grounding import interleaved_times
from . import prefill as bench_prefill

#: the LLaVA-1.5-7B layout (CLIP ViT-L/14 at 336 px, Vicuna-7B), for its prefill FLOPs
LLAVA_7B = dict(vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=336, patch_size=14, num_channels=3),
                text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=32))
SAM_TYPES = ("vit_b", "vit_l", "vit_h")
PHRASE = "red circle"
"""grounded with ``ground_phrases`` (it is in :data:`~.bench_prefill.PROMPT`)"""


@dataclass(frozen=True)
class SamLayout:
    """segment-anything's image-encoder layout at a chosen width and depth (1024 px, patch 16, window 14)."""

    embed_dim: int
    depth: int = 6
    img_size: int = 1024
    window_size: int = 14

    @property
    def num_heads(self) -> int:
        return max(1, self.embed_dim // 64)

    @property
    def global_attn_indexes(self) -> tuple[int, ...]:
        return tuple(range(2, self.depth, 3))  # every third block, as in ViT-B (2, 5, 8, 11)


def _meta_sam(layout: SamLayout | str):
    from segment_anything import sam_model_registry

    from ..zoo.sam import build_tiny_sam

    if isinstance(layout, str):
        return sam_model_registry[layout](checkpoint=None)
    return build_tiny_sam(sam_config(layout))


def sam_config(layout: SamLayout):
    """A :class:`~vlmfast.zoo.sam.TinySamConfig` of ``layout`` with SAM's real prompt encoder and mask decoder."""
    from ..zoo.sam import tiny_sam_config

    return tiny_sam_config(img_size=layout.img_size, patch_size=16, embed_dim=layout.embed_dim, depth=layout.depth,
                           num_heads=layout.num_heads, window_size=layout.window_size,
                           global_attn_indexes=layout.global_attn_indexes, out_chans=256, decoder_mlp_dim=2048,
                           decoder_heads=8, iou_head_hidden_dim=256)


@functools.lru_cache(maxsize=None)
def encoder_flops(layout: SamLayout | str) -> float:
    """FLOPs (multiply-add = 2) of one image-encoder pass: ``vit_b`` / ``vit_l`` / ``vit_h`` or a layout; counted
    on a meta-device model (nothing is computed or allocated) once per layout."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        sam = _meta_sam(layout)
        size = sam.image_encoder.img_size
        with FlopCounterMode(display=False) as counter:
            sam.image_encoder(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())


def llava_7b_prefill_flops(text_tokens: int) -> float:
    """LLaVA-1.5-7B's prefill FLOPs (tower + projector + decoder) for 576 visual tokens and ``text_tokens``."""
    from types import SimpleNamespace as NS

    v, t = NS(**LLAVA_7B["vision"]), NS(**LLAVA_7B["text"])
    vision = bench_prefill.tower_flops(v, t.hidden_size, v.num_hidden_layers - 1)  # up to the feature layer (-2)
    length = (v.image_size // v.patch_size) ** 2 + text_tokens
    return vision + t.num_hidden_layers * bench_prefill.llm_layer_flops(NS(config=NS(text_config=t)), length)


def matched_layout(target_flops: float, depth: int = 6) -> SamLayout:
    """The width (a multiple of 64) whose encoder FLOPs are closest to ``target_flops`` (log scale)."""
    best = None
    for width in range(64, 2049, 64):
        f = encoder_flops(SamLayout(width, depth))
        err = abs(math.log(f / target_flops))
        if best is None or err < best[0]:
            best = (err, SamLayout(width, depth))
        if f > target_flops:
            break
    assert best is not None  # the first width always sets it
    return best[1]


def run(json_path: str | Path | None = None, *, spec=bench_prefill.PROXY, sam_types=SAM_TYPES, repeats: int = 5,
        decode_tokens: int = 8, threads: int | None = None, progress: bool = True) -> list[dict]:
    """One row per SAM type: the proxy SAM's layout and FLOP share, and the overheads (new image / image seen)."""
    from segment_anything import SamPredictor

    from ..accelerator import VLMAccelerator
    from ..policy import Policy
    from ..zoo.sam import build_tiny_sam

    if threads:
        torch.set_num_threads(threads)
    model, processor = bench_prefill.build_proxy(spec)
    acc = VLMAccelerator(model, processor, policy=Policy(source="<full>"))
    image = bench_prefill.random_image(spec.image_size)
    kw: dict[str, Any] = dict(prompt=bench_prefill.PROMPT, max_new_tokens=decode_tokens + 1)
    stats = acc.generate(images=[image], **kw).stats  # also the warm-up
    proxy_flops = bench_prefill.prefill_flops(model, stats, acc.policy)
    real_flops = llava_7b_prefill_flops(stats.text_tokens)
    rows = []
    for sam_type in tqdm(sam_types, desc="bench grounding", disable=not progress):
        share = encoder_flops(sam_type) / real_flops
        layout = matched_layout(share * proxy_flops)
        acc.grounder.predictor = SamPredictor(build_tiny_sam(sam_config(layout)).eval())
        acc.generate(images=[image], ground=True, ground_phrases=[PHRASE], **kw)  # warm-up
        times = interleaved_times(acc, [([image], kw, dict(ground_phrases=[PHRASE]))] * repeats)
        rows.append({
            "sam_type": sam_type, "sam_encoder_share_of_llava7b_prefill": round(share, 4),
            "proxy_sam": {"embed_dim": layout.embed_dim, "depth": layout.depth, "heads": layout.num_heads,
                          "global_attn_indexes": list(layout.global_attn_indexes), "img_size": layout.img_size},
            "proxy_sam_encoder_share": round(encoder_flops(layout) / proxy_flops, 4),
            "generate_s": round(times["generate_s"], 4), "generate_ground_s": round(times["generate_ground_s"], 4),
            "generate_ground_warm_s": round(times["generate_ground_warm_s"], 4),
            "grounding_stage_s": round(times["grounding_stage_s"], 4),
            "overhead": round(times["overhead"], 4), "overhead_warm": round(times["overhead_warm"], 4),
            "cpu_overhead": round(times["cpu"]["overhead"], 4),
            "cpu_overhead_warm": round(times["cpu"]["overhead_warm"], 4),
            "phrases": times["phrases"], "repeats": repeats, "decode_tokens": decode_tokens,
            "torch_threads": torch.get_num_threads(), "load_average": round(os.getloadavg()[0], 2),
        })
    if json_path:
        Path(json_path).write_text(json.dumps({"proxy_prefill_flops": proxy_flops, "llava7b_prefill_flops": real_flops,
                                               "rows": rows}, indent=2) + "\n")
    return rows


def table(rows: list[dict], markdown: bool = False) -> str:
    head = ["SAM (share of LLaVA-7B prefill)", "proxy SAM encoder", "plain s", "ground s (new image)",
            "overhead new / seen", "CPU overhead new / seen"]
    body = [[f"{r['sam_type']} ({100 * r['sam_encoder_share_of_llava7b_prefill']:.1f}%)",
             f"w{r['proxy_sam']['embed_dim']} d{r['proxy_sam']['depth']} "
             f"({100 * r['proxy_sam_encoder_share']:.1f}%)", f"{r['generate_s']:.3f}", f"{r['generate_ground_s']:.3f}",
             f"{100 * r['overhead']:+.1f}% / {100 * r['overhead_warm']:+.1f}%",
             f"{100 * r['cpu_overhead']:+.1f}% / {100 * r['cpu_overhead_warm']:+.1f}%"] for r in rows]
    return bench_prefill.format_table(head, body, markdown)
