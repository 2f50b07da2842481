"""FoPru (Focal Pruning, arXiv 2411.14164): vision-stage pruning from the tower's own attention.

Significance of each token = column mean (attention received) or row mean of the head-averaged
patch-to-patch attention of the feature layer, whichever varies more. *rank* keeps the global top
floor(N*keep) tokens; *row* keeps the floor(rows*keep) grid rows with the largest summed significance.
Kept tokens stay in raster order. Spec: shared/reference/pruning.md section 2; docs/methods/fopru.md.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import torch
from pydantic import Field

from ..adapters.base import ImageTokens
from ..registry import register
from .base import VisionPruner, method_dataclass, n_keep, topk_sorted


def significance(attention: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                 patches_per_token: int = 1) -> torch.Tensor:
    """Per-token significance from an (N, N) patch attention matrix or its (column, row) means; patches are summed
    into tokens. (On a tower without CLS the rows of a softmax sum to 1, so the row means are constant and the
    column means win.)"""
    col, row = (attention.mean(0), attention.mean(1)) if isinstance(attention, torch.Tensor) else attention
    sig = col if col.var() > row.var() else row
    if patches_per_token > 1:
        sig = sig.view(-1, patches_per_token).sum(1)
    return sig


def select_rows(sig: torch.Tensor, grid: tuple[int, int, int], keep: float) -> torch.Tensor:
    """Keep whole grid rows (of every frame) with the largest summed significance."""
    t, h, w = grid
    rows = sig.view(t * h, w).sum(1)
    kept_rows = topk_sorted(rows, n_keep(t * h, keep))
    return (kept_rows[:, None] * w + torch.arange(w, device=sig.device)).reshape(-1)


@register("fopru")
@method_dataclass
class FoPru(VisionPruner):
    reads_attention_means: ClassVar[bool] = True
    keep: Annotated[float, Field(gt=0, le=1)] = 0.25
    """fraction of each image's visual tokens to keep"""
    strategy: Literal["rank", "row"] = "rank"
    """rank: global top-k tokens; row: top whole grid rows"""
    layer: int | None = None
    """vision layer whose attention scores tokens; None = the layer that feeds the LLM (LLaVA: -2)"""

    def score(self, image: ImageTokens) -> torch.Tensor:
        return significance(image.attention_means("FoPru"), image.patches_per_token)

    def select(self, image: ImageTokens) -> torch.Tensor:
        sig = self.score(image)
        if self.strategy == "row":
            return select_rows(sig, image.grid, self.keep)
        return topk_sorted(sig, n_keep(sig.numel(), self.keep))
