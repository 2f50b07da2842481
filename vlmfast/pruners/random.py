"""Random selection: the floor every pruner must clear. Seeded, so runs are reproducible."""

from __future__ import annotations

from typing import Annotated, ClassVar

import torch
from pydantic import Field

from ..adapters.base import ImageTokens
from ..registry import register
from .base import VisionPruner, method_dataclass, n_keep


@register("random")
@method_dataclass
class RandomPruner(VisionPruner):
    needs_attention: ClassVar[bool] = False
    keep: Annotated[float, Field(gt=0, le=1)] = 0.25
    seed: int = 0

    def select(self, image: ImageTokens) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(image.n_tokens, generator=g)
        return perm[: n_keep(image.n_tokens, self.keep)].sort().values.to(image.features.device)
