"""CDPruner (arXiv 2506.10967, NeurIPS 2025): keep the visual tokens of maximal *conditional* diversity.

A determinantal point process over the image's tokens whose kernel is their similarity conditioned on the
instruction: with x_i the visual tokens and t_j the instruction's token embeddings,

* similarity ``S_ij = cos(x_i, x_j)``;
* relevance ``r_i = mean_j cos(x_i, t_j)``, min-max normalised over the image to [0, 1];
* conditional kernel ``L = diag(r) S diag(r)``, so ``log det L_Y = sum_{i in Y} log r_i^2 + log det S_Y``: relevant
  tokens are favoured, similar ones repel. ``theta`` (optional) uses Chen et al.'s relevance-diversity trade-off
  instead: ``diag(exp(a r)) S diag(exp(a r))`` with ``a = theta / (2 (1 - theta))``, whose log-det is
  ``theta / (1 - theta) * sum r + log det S_Y`` (theta = 0: diversity only, the instruction ignored);
* the kept set: the greedy MAP of that DPP with ``floor(N * keep)`` tokens (Chen, Zhang, Zhou, NeurIPS 2018: each
  step adds the token of the largest determinant gain, updated by one row of an incremental Cholesky factor, O(N k^2)
  after the kernel), in raster order.

Compared in the language model's input space: the projected visual tokens (``ImageTokens.features``) and the
prompt's tokens through the LLM's input embedding layer (``ImageTokens.instruction``). Needs no attention.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

import torch
from pydantic import Field

from ..adapters.base import ImageTokens
from ..registry import register
from .base import VisionPruner, method_dataclass, n_keep

#: a determinant gain below this share of the largest diagonal entry counts as none (the kernel's rank is spent)
RANK_EPS = 1e-6


def instruction_relevance(x: torch.Tensor, text: torch.Tensor | None) -> torch.Tensor:
    """Per visual token (rows of x), its mean cosine similarity to the instruction's tokens, min-max normalised to
    [0, 1]. All ones when there is no instruction (no tokens) or every token is equally relevant."""
    if text is None or text.shape[0] == 0:
        return torch.ones(x.shape[0], device=x.device)
    z = torch.nn.functional.normalize(x.float(), dim=-1)
    t = torch.nn.functional.normalize(text.float().to(x.device), dim=-1)
    r = (z @ t.T).mean(1)
    span = r.max() - r.min()
    if span <= 1e-12:
        return torch.ones_like(r)
    return (r - r.min()) / span


def conditional_kernel(x: torch.Tensor, relevance: torch.Tensor, theta: float | None = None) -> torch.Tensor:
    """``diag(q) S diag(q)`` with S the cosine similarity of x's rows, q = relevance (theta None) or
    ``exp(theta / (2 (1 - theta)) * relevance)``, divided by its largest value (a common factor leaves every
    choice as it was and keeps exp from overflowing as theta nears 1)."""
    z = torch.nn.functional.normalize(x.float(), dim=-1)
    r = relevance.float()
    q = r if theta is None else torch.exp(theta / (2 * (1 - theta)) * (r - r.max()))
    return q[:, None] * (z @ z.T) * q[None, :]


def greedy_map(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy MAP inference of the DPP with (N, N) PSD ``kernel``: k indices in selection order, each maximising
    det(L_{Y + i}) given the chosen Y (Chen et al. 2018, Algorithm 1: ``d_i^2`` is token i's determinant gain, kept
    up to date with one new row of the incremental Cholesky factor per step). Once the kernel's rank is spent (every
    gain below ``RANK_EPS`` of the largest diagonal entry) the rest of the budget goes to the remaining tokens in
    order of their diagonal (their conditional quality, r_i^2), first index first on ties."""
    n = kernel.shape[0]
    k = min(k, n)
    L = kernel.double()
    gain = L.diagonal().clone()
    floor = RANK_EPS * float(gain.max().clamp_min(0))
    factor = torch.zeros(k, n, dtype=L.dtype, device=L.device)
    chosen: list[int] = []
    for step in range(k):
        j = int(gain.argmax())
        if float(gain[j]) <= floor:
            break
        chosen.append(j)
        row = (L[j] - factor[:step, j] @ factor[:step]) / gain[j].sqrt()
        factor[step] = row
        gain = gain - row * row
        gain[chosen] = -torch.inf
    if len(chosen) < k:
        rest = torch.ones(n, dtype=torch.bool, device=L.device)
        rest[chosen] = False
        idx = rest.nonzero().squeeze(1)
        order = idx[torch.sort(-L.diagonal()[idx], stable=True).indices]
        chosen += order[: k - len(chosen)].tolist()
    return torch.tensor(chosen, dtype=torch.long, device=kernel.device)


@register("cdpruner")
@method_dataclass
class CDPruner(VisionPruner):
    needs_attention: ClassVar[bool] = False
    needs_instruction: ClassVar[bool] = True
    keep: Annotated[float, Field(gt=0, le=1)] = 0.1
    theta: Annotated[float, Field(ge=0, lt=1)] | None = None
    """None: the paper's kernel diag(r) S diag(r); in [0, 1): Chen et al.'s relevance-diversity trade-off"""

    def select(self, image: ImageTokens) -> torch.Tensor:
        k = n_keep(image.n_tokens, self.keep)
        if k >= image.n_tokens:
            return torch.arange(image.n_tokens, device=image.features.device)
        r = instruction_relevance(image.features, image.instruction)
        return greedy_map(conditional_kernel(image.features, r, self.theta), k).sort().values
