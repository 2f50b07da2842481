"""VisionZip (CVPR 2025): dominant tokens by [CLS] attention, plus contextual tokens merged from the rest.

Of the budget floor(N * keep), a share ``contextual`` becomes contextual tokens: anchors chosen uniformly
among the non-dominant tokens, each absorbing the remaining tokens whose (head-mean, normalised) key is most
similar to its own. vlmfast places each contextual token at its anchor's position (so positions keep their
meaning) and carries the mean of the merged features. Differences from the reference (which merges
pre-projector hidden states as anchor + mean and appends them after the dominant tokens) are in
docs/methods/visionzip.md. Without a [CLS] token (the Qwen towers, SigLIP) dominance falls back to received attention.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

import torch
from pydantic import Field

from ..adapters.base import ImageTokens
from ..registry import register
from .base import Pruned, VisionPruner, method_dataclass, n_keep, topk_sorted
from .fastervlm import cls_scores


@register("visionzip")
@method_dataclass
class VisionZip(VisionPruner):
    reads_attention_means: ClassVar[bool] = True  # [CLS] attention or received attention, and the keys
    keep: Annotated[float, Field(gt=0, le=1)] = 0.25
    contextual: Annotated[float, Field(ge=0, lt=1)] = 0.16
    """share of the budget spent on contextual (merged) tokens; the paper's 54+10 of 64 is ~0.16"""
    layer: int | None = None

    def split(self, n: int) -> tuple[int, int]:
        k = n_keep(n, self.keep)
        c = min(int(round(k * self.contextual)), n - k) if k > 1 else 0
        return k - c, c

    def prune(self, image: ImageTokens) -> Pruned:
        n = image.n_tokens
        n_dom, n_ctx = self.split(n)
        dominant = topk_sorted(cls_scores(image), n_dom)
        if n_ctx == 0:
            return Pruned(dominant, image.features[dominant])
        rest = torch.ones(n, dtype=torch.bool, device=dominant.device)
        rest[dominant] = False
        rest = rest.nonzero().squeeze(1)
        step = max(1, len(rest) // n_ctx)
        anchors = rest[::step][:n_ctx]
        if image.keys is None:
            raise RuntimeError("VisionZip needs the scoring layer's keys; the adapter did not capture them")
        keys = torch.nn.functional.normalize(image.keys.float(), dim=-1)
        owner = (keys[rest] @ keys[anchors].T).argmax(1)  # anchors own themselves (self-similarity 1)
        feats = image.features.float()
        merged = torch.zeros(n_ctx, feats.shape[1], device=feats.device).index_add_(0, owner, feats[rest])
        merged /= torch.bincount(owner, minlength=n_ctx).clamp(min=1)[:, None]
        keep = torch.cat([dominant, anchors])
        order = keep.argsort()
        return Pruned(keep[order], torch.cat([image.features[dominant], merged.to(image.features.dtype)])[order])

    def select(self, image: ImageTokens) -> torch.Tensor:
        return self.prune(image)[0]
