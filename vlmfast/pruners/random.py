"""Random selection: the floor every pruner must clear. Seeded, so runs are reproducible; a video's frame groups
draw one after another from the same generator, so each group keeps its own cells."""

from __future__ import annotations

from typing import Annotated, ClassVar

import torch
from pydantic import Field

from ..adapters.base import ImageTokens
from ..registry import register
from .base import Pruned, VisionPruner, method_dataclass, n_keep


@register("random")
@method_dataclass
class RandomPruner(VisionPruner):
    needs_attention: ClassVar[bool] = False
    keep: Annotated[float, Field(gt=0, le=1)] = 0.25
    seed: int = 0

    def select(self, image: ImageTokens, generator: torch.Generator | None = None) -> torch.Tensor:
        g = generator or torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(image.n_tokens, generator=g)
        return perm[: n_keep(image.n_tokens, self.keep)].sort().values.to(image.features.device)

    def prune_visual(self, image: ImageTokens) -> Pruned:
        groups = image.frame_groups()
        if len(groups) == 1:
            return self.prune(image)
        g = torch.Generator().manual_seed(self.seed)
        keep = torch.cat([self.select(x, g) + i * x.n_tokens for i, x in enumerate(groups)])
        return Pruned(keep, image.features[keep])
