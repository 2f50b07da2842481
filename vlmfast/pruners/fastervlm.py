"""FasterVLM (arXiv 2412.01818): keep the tokens the vision tower's [CLS] attends to most, before the LLM.

Score = attention of the [CLS] query to each patch in the feature layer (head mean); keep the top
floor(N * keep) in raster order. The Qwen towers (and SigLIP) have no [CLS]: there the score falls back to the
attention each token *receives* (column mean of the patch attention, summed per merged token) — documented in
docs/methods/fastervlm.md.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

import torch
from pydantic import Field

from ..adapters.base import ImageTokens
from ..registry import register
from .base import VisionPruner, method_dataclass, n_keep, topk_sorted


def cls_scores(image: ImageTokens) -> torch.Tensor:
    """[CLS] attention per token, or the received-attention substitute for towers without [CLS]."""
    if image.cls_attention is not None:
        return image.cls_attention
    return image.attention_means("FasterVLM")[0].view(-1, image.patches_per_token).sum(1)


@register("fastervlm")
@method_dataclass
class FasterVLM(VisionPruner):
    reads_attention_means: ClassVar[bool] = True
    keep: Annotated[float, Field(gt=0, le=1)] = 0.25
    layer: int | None = None
    """vision layer whose [CLS] attention scores tokens; None = the layer that feeds the LLM"""

    def select(self, image: ImageTokens) -> torch.Tensor:
        s = cls_scores(image)
        return topk_sorted(s, n_keep(s.numel(), self.keep))
