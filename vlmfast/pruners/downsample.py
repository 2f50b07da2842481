"""Downsampling: the honest floor of visual-token reduction (VTC-Bench: plain image downsampling beats many
pruning methods). Instead of choosing tokens, the image itself is resized so the vision tower yields (at most) the
budget's tokens, and those features enter the language model.

For an image of an h x w token grid and a budget of ``k = floor(h * w * keep)`` tokens, the resized grid has
``h' = floor(sqrt(k * h / w))`` rows (at least 1, at most h and k) and ``w' = min(w, floor(k / h'))`` columns:
the image's aspect ratio to within one row, ``h' * w' <= k`` tokens. The tower runs again on its input resized to
that grid (``Adapter.resampled_features``: Qwen's dynamic resolution directly; LLaVA's fixed-resolution CLIP with its
position embeddings interpolated). The features take the positions of a regular sub-grid of the original
placeholders (the original token under each new cell's centre), so they keep their original (Qwen: 3-D) positions,
as every pruner's kept tokens do. Needs no attention. Images only (LLaVA-1.5, Qwen2-VL, Qwen2.5-VL; other families
and videos are refused by name).
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar

import torch
from pydantic import Field

from ..adapters.base import ImageTokens, ModelInfo
from ..errors import InputError, PolicyError
from ..registry import register
from .base import Pruned, VisionPruner, method_dataclass, n_keep


def sub_grid(h: int, w: int, k: int) -> tuple[int, int]:
    """The (h', w') grid of at most k tokens for an h x w grid: h' = floor(sqrt(k h / w)) in [1, min(h, k)],
    w' = min(w, floor(k / h'))."""
    rows = max(1, min(h, k, math.floor(math.sqrt(k * h / w) + 1e-9)))
    return rows, max(1, min(w, k // rows))


def cell_centres(h: int, w: int, rows: int, cols: int, device=None) -> torch.Tensor:
    """Raster indices (ascending) into an h x w grid of the token under the centre of each cell of a rows x cols
    grid laid over it."""
    r = ((torch.arange(rows, device=device) + 0.5) * h / rows).long()
    c = ((torch.arange(cols, device=device) + 0.5) * w / cols).long()
    return (r[:, None] * w + c[None, :]).flatten()


@register("downsample")
@method_dataclass
class Downsample(VisionPruner):
    needs_attention: ClassVar[bool] = False
    needs_resample: ClassVar[bool] = True
    keep: Annotated[float, Field(gt=0, le=1)] = 0.25

    def check(self, info: ModelInfo) -> None:
        super().check(info)
        if info.resample_unsupported:
            raise PolicyError(f"downsample cannot run on this {info.family} model: {info.resample_unsupported}")

    def prune(self, image: ImageTokens) -> Pruned:
        t, h, w = image.grid
        n = image.n_tokens
        k = n_keep(n, self.keep)
        if k >= n:
            return Pruned(torch.arange(n, device=image.features.device), image.features)
        if image.resample is None:
            raise InputError(f"downsample resizes images, and this request has a {image.kind} (grid {image.grid}) "
                             "it cannot resize (videos are not supported); use another vision pruner for videos")
        rows, cols = sub_grid(h, w, k)
        return Pruned(cell_centres(h, w, rows, cols, image.features.device), image.resample((rows, cols)))
