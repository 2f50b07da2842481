"""PyramidDrop (arXiv 2410.17247): drop image tokens in stages, a fixed share at each stage.

Before each layer in ``layers`` the image tokens still present are ranked by the attention the last
instruction token pays to them (at the layer before) and the top ``ratio`` of them stay, so after stage i a
``ratio ** (i + 1)`` share is left (defaults for 32-layer LLaVA-1.5: layers 8/16/24, ratio 0.5 -> 50%, 25%,
12.5%). Survivors keep their original positions (the reference renumbers them contiguously).
"""

from __future__ import annotations

import logging
from typing import Annotated, ClassVar

import torch
from pydantic import Field

from ..adapters.base import ModelInfo
from ..registry import register
from .base import LayerPruner, method_dataclass
from .fastv import keep_top_image_tokens

log = logging.getLogger("vlmfast")
DEFAULT_LAYERS = [8, 16, 24]
"""LLaVA-1.5's (32 decoder layers): a quarter, half and three quarters of the way"""


@register("pyramiddrop")
@method_dataclass
class PyramidDrop(LayerPruner):
    layers_field: ClassVar[str] = "layers"
    layers: Annotated[list[int], Field(min_length=1)] = Field(default_factory=lambda: list(DEFAULT_LAYERS))
    """decoder layers before which a share of the remaining image tokens is dropped (strictly increasing)"""
    ratio: Annotated[float, Field(gt=0, le=1)] = 0.5
    """share of the remaining image tokens kept at each stage (PyramidDrop's lambda)"""

    def drop_layers(self) -> list[int]:
        return list(self.layers)

    def check(self, info: ModelInfo) -> None:
        super().check(info)
        if self.layers == DEFAULT_LAYERS and info.num_layers != 32:
            same = [info.num_layers * i // 4 for i in (1, 2, 3)]
            log.warning("pyramiddrop.layers = %s are LLaVA-1.5's defaults (32 decoder layers); this language model "
                        "has %d, so the stages fall elsewhere in its depth (a quarter, half and three quarters of "
                        "the way would be %s); set layers in the policy to silence this", self.layers,
                        info.num_layers, same)

    def select_layer(self, scores: torch.Tensor, image_mask: torch.Tensor, valid: torch.Tensor,
                     stage: int = 0) -> torch.Tensor:
        return keep_top_image_tokens(scores, image_mask, valid, self.ratio)
