"""What every result carries: visual tokens per stage, times, KV-cache bytes."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch


def now(device: torch.device | None = None) -> float:
    """perf_counter after the device's queued work (CUDA) has finished: a time stamp for Stats."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class Stats:
    visual_tokens_in: int = 0
    """visual tokens the model would process without vlmfast (images and videos)"""
    video_tokens_in: int = 0
    """of ``visual_tokens_in``, those of videos"""
    visual_tokens_kept: int = 0
    """visual tokens entering the language model (after vision-stage pruning)"""
    visual_tokens_final: int = 0
    """visual tokens in the deepest layer (after layer-stage pruning)"""
    layer_avg_visual_tokens: float = 0.0
    """visual tokens averaged over decoder layers (how FastV/PyramidDrop budgets are usually quoted)"""
    visual_tokens_per_layer: list[int] = field(default_factory=list)
    text_tokens: int = 0
    """non-visual prompt tokens (chat template included)"""
    stages: list[dict] = field(default_factory=list)
    batch_size: int = 1
    """samples in the call this result came from. The times below (``*_s``, ``decode_ms_per_token``) are the whole
    call's, shared by its samples: :meth:`share` divides them by ``batch_size``"""
    preprocess_s: float = 0.0
    """processor time (tokenise, resize): not part of prefill"""
    vision_s: float = 0.0
    """vision tower + projector"""
    scoring_s: float = 0.0
    """vision-stage pruners' own cost (reading the vision attention, scoring, selecting)"""
    llm_prefill_s: float = 0.0
    prefill_s: float = 0.0
    """time to first-token logits: vision + scoring + assembling inputs + LLM prefill"""
    decode_ms_per_token: float | None = None
    new_tokens: int = 0
    kv_bytes: int = 0
    """KV-cache bytes after prefill: this sample's share of the call's cache (its total / ``batch_size``, padding
    included)"""
    grounding_s: float = 0.0
    """``ground=True``: maps, points and SAM after decoding, for the whole batch (the attention capture itself
    runs inside prefill and decode)"""

    def to_dict(self) -> dict:
        return asdict(self)

    def share(self, seconds: float) -> float:
        """This sample's share of one of the call's times (``stats.share(stats.prefill_s)``)."""
        return seconds / max(1, self.batch_size)

    def table(self) -> str:
        rows = [
            ("visual tokens in", f"{self.visual_tokens_in}"),
            ("visual tokens kept (LLM input)", f"{self.visual_tokens_kept}"),
        ]
        if self.video_tokens_in:
            rows.insert(1, ("  of which video", f"{self.video_tokens_in}"))
        for st in self.stages:
            where = f"layer {st['layer']}" if st.get("layer") is not None else st["stage"]
            if "summary" in st:  # reweighting and decoding methods describe themselves
                rows.append((f"  {st['method']} @ {where}", st["summary"]))
                continue
            if "important_share" in st:
                rows.append((f"  {st['method']} @ {where}", f"{100 * st['important_share']:.1f}% tokens important "
                                                            f"(avg over layers), KV: {st['kv']}"))
                continue
            rows.append((f"  {st['method']} @ {where}", f"{st['visual_tokens_in']} -> {st['visual_tokens_kept']}"))
        if any(st["stage"] == "layer" for st in self.stages):
            rows.append(("visual tokens, layer average", f"{self.layer_avg_visual_tokens:.1f}"))
        rows += [
            ("prefill (s)", f"{self.prefill_s:.4f}"),
            ("  vision tower (s)", f"{self.vision_s:.4f}"),
            ("  pruning overhead (s)", f"{self.scoring_s:.4f}"),
            ("  LLM prefill (s)", f"{self.llm_prefill_s:.4f}"),
            ("decode (ms/token)", "-" if self.decode_ms_per_token is None else f"{self.decode_ms_per_token:.2f}"),
            ("new tokens", f"{self.new_tokens}"),
            ("KV cache (bytes)", f"{self.kv_bytes:,}"),
        ]
        if self.grounding_s:
            rows.append(("grounding: maps + SAM (s)", f"{self.grounding_s:.4f}"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
