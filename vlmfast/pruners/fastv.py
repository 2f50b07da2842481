"""FastV (arXiv 2403.06764): drop image tokens inside the language model at layer K.

At layer K-1 the attention the last token pays to each image token (averaged over heads) ranks them;
before layer K the lowest-ranked ones are dropped from the hidden states, so layers >= K (and their KV
cache) run on the shortened sequence. Kept tokens keep their positions. docs/methods/fastv.md.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from ..registry import register
from .base import LayerPruner, method_dataclass, n_keep


@register("fastv")
@method_dataclass
class FastV(LayerPruner):
    layer: Annotated[int, Field(ge=1)] = 2
    """K: tokens are dropped before decoder layer K, ranked by layer K-1's last-token attention"""
    keep: Annotated[float, Field(gt=0, le=1)] = 0.5
    """fraction of image tokens kept (FastV's R = 1 - keep)"""

    def select_layer(self, scores: torch.Tensor, image_mask: torch.Tensor, valid: torch.Tensor,
                     stage: int = 0) -> torch.Tensor:
        return keep_top_image_tokens(scores, image_mask, valid, self.keep)


def keep_top_image_tokens(scores: torch.Tensor, image_mask: torch.Tensor, valid: torch.Tensor, ratio: float):
    """Keep mask: every non-image (or padding) token, plus each row's top floor(n * ratio) image tokens."""
    keep = ~image_mask | ~valid  # text and padding pass through untouched
    for b in range(scores.shape[0]):
        idx = (image_mask[b] & valid[b]).nonzero().squeeze(1)
        if idx.numel():
            top = torch.topk(scores[b, idx], n_keep(idx.numel(), ratio)).indices
            keep[b, idx[top]] = True
    return keep
