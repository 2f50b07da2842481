"""DivPrune (CVPR 2025): keep a maximally diverse subset of the projected visual tokens.

Max-min diversity on cosine distance between the LLM-input embeddings: start from the token whose nearest
neighbour is farthest, then repeatedly add the token whose minimum distance to the chosen set is largest
(greedy farthest-point), until floor(N * keep) tokens; return them in raster order. Needs no attention.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

import torch
from pydantic import Field

from ..adapters.base import ImageTokens
from ..registry import register
from .base import VisionPruner, method_dataclass, n_keep


def max_min_diverse(x: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max-min selection of k rows of x under cosine distance; indices in selection order."""
    z = torch.nn.functional.normalize(x.float(), dim=-1)
    dist = 1 - z @ z.T
    n = x.shape[0]
    d_nn = dist + torch.eye(n, device=x.device) * 1e9
    chosen = [int(d_nn.min(1).values.argmax())]
    min_d = dist[chosen[0]].clone()
    min_d[chosen[0]] = -1
    for _ in range(k - 1):
        nxt = int(min_d.argmax())
        chosen.append(nxt)
        min_d = torch.minimum(min_d, dist[nxt])
        min_d[chosen] = -1
    return torch.tensor(chosen, device=x.device)


@register("divprune")
@method_dataclass
class DivPrune(VisionPruner):
    needs_attention: ClassVar[bool] = False
    keep: Annotated[float, Field(gt=0, le=1)] = 0.1

    def select(self, image: ImageTokens) -> torch.Tensor:
        return max_min_diverse(image.features, n_keep(image.n_tokens, self.keep)).sort().values
