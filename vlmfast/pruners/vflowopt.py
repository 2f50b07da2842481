"""VFlowOpt (arXiv 2508.05211, ICCV 2025): importance map + recycling before the LLM, progressive drops in it.

Importance of token j: ``c[j] + alpha * softmax(E)[j]``, where ``c[j]`` is the attention that the
vision layer's *global* tokens (those receiving more than ``t`` x the mean received attention; all tokens
if none does) pay to j, and ``E`` is the grey-level entropy of j's pixels. The vision stage keeps the most
important tokens and **recycles** the pruned ones: per m x m cell of the token grid, the pruned tokens are
averaged (weighted by importance) into one token written at the position of the cell's most important
pruned token. Language-model stages (``llm_layers``) then drop more image tokens, ranked by the same
importance map (no LLM attention needed). The hyper-parameter search (visual-information-flow objective)
lives in vlmfast.search. docs/methods/vflowopt.md.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

import torch
from pydantic import Field

from ..adapters.base import ImageTokens, ModelInfo
from ..errors import PolicyError
from ..registry import register
from .base import LayerPruner, Pruned, VisionPruner, method_dataclass, n_keep
from .fastv import keep_top_image_tokens


def patch_entropy(grey: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (bits) of the 256-bin grey histogram of each row of ``grey`` (values in [0, 255])."""
    bins = grey.round().long().clamp(0, 255)
    hist = torch.zeros(grey.shape[0], 256, device=grey.device).scatter_add_(1, bins, torch.ones_like(grey))
    p = hist / grey.shape[1]
    return -(p * torch.log2(p + 1e-10)).sum(1)


def context_relevance(attention: torch.Tensor, t: float) -> torch.Tensor:
    """Attention paid to each token by the global tokens (received attention > t * mean)."""
    received = attention.mean(0)
    glob = received > t * received.mean()
    if not bool(glob.any()):
        glob = torch.ones_like(glob)
    return attention[glob].mean(0)


def recycle(image: ImageTokens, importance: torch.Tensor, keep: float, m: float) -> Pruned:
    """Keep the most important tokens; merge the pruned ones per m x m cell (see module docstring).
    At most floor(N * keep) tokens come out: k - n_extra top tokens plus one per non-empty cell (at most
    n_extra = N / m^2 of them, the cells with the most importance first)."""
    n = image.n_tokens
    k = n_keep(n, keep)
    t, h, w = image.grid
    n_extra = min(int(n / (m * m)), k - 1) if m > 0 and k < n else 0
    order = importance.argsort(descending=True)
    kept, pruned = order[: k - n_extra], order[k - n_extra:]
    feats = image.features
    new_keep, new_feats = [kept], [feats[kept]]
    if n_extra and pruned.numel():
        frame, rem = pruned // (h * w), pruned % (h * w)
        cell_w = int(-(-w // m))
        cells = frame * (int(-(-h // m)) * cell_w) + (rem // w // m).long() * cell_w + (rem % w // m).long()
        groups = [pruned[cells == c] for c in cells.unique()]
        groups.sort(key=lambda g: -float(importance[g].sum()))  # over budget: the least important cells go
        for members in groups[:n_extra]:
            wts = importance[members].clamp(min=0)
            wts = wts / wts.sum() if float(wts.sum()) > 0 else torch.full_like(wts, 1 / len(members))
            slot = members[importance[members].argmax()]
            new_keep.append(slot[None])
            new_feats.append((wts[:, None] * feats[members].float()).sum(0, keepdim=True).to(feats.dtype))
    keep_idx = torch.cat(new_keep)
    order = keep_idx.argsort()
    return Pruned(keep_idx[order], torch.cat(new_feats)[order], importance[keep_idx[order]])


@register("vflowopt")
@method_dataclass
class VFlowOpt(VisionPruner, LayerPruner):
    keep: Annotated[float, Field(gt=0, le=1)] = 0.25
    """r_v: share of each image's tokens entering the LLM (recycled tokens included)"""
    t: Annotated[float, Field(ge=0)] = 10.0
    """global tokens receive more than t x the mean received attention"""
    alpha: float = 0.0
    """weight of the softmax-normalised patch entropy (the released configs use 0)"""
    m: Annotated[float, Field(ge=0)] = 4.0
    """recycling cell size in tokens (0 disables recycling)"""
    llm_layers: list[int] = Field(default_factory=list)
    """decoder layers before which more image tokens are dropped (e.g. [9, 18] for a 28-layer LLM)"""
    llm_keep: list[Annotated[float, Field(gt=0, le=1)]] = Field(default_factory=list)
    """share of the image tokens alive at each LLM stage that stays (one per llm_layers entry)"""
    layer: int | None = None
    """vision layer whose attention builds the importance map; None = the layer that feeds the LLM"""

    stage: ClassVar[str] = "vision"
    layers_field: ClassVar[str] = "llm_layers"
    uses_vision_scores: ClassVar[bool] = True

    @property
    def needs_grey(self) -> bool:  # type: ignore[override]  # the base's ClassVar flag, only ever read on instances
        # patch entropy weighs in only when alpha != 0
        return bool(self.alpha)

    def __post_init__(self):
        if len(self.llm_layers) != len(self.llm_keep):
            raise PolicyError(f"vflowopt: llm_layers ({self.llm_layers}) and llm_keep ({self.llm_keep}) must have "
                              "the same length")

    def importance(self, image: ImageTokens) -> torch.Tensor:
        if image.attention is None:
            raise RuntimeError("VFlowOpt needs the vision layer's attention; the adapter did not capture it")
        c = context_relevance(image.attention, self.t).view(-1, image.patches_per_token).sum(1)
        if self.needs_grey and image.grey is not None:
            c = c + self.alpha * patch_entropy(image.grey.float()).softmax(0)
        return c

    def prune(self, image: ImageTokens) -> Pruned:
        return recycle(image, self.importance(image), self.keep, self.m)

    def select(self, image: ImageTokens) -> torch.Tensor:
        return self.prune(image).keep

    # -- language-model stages
    def drop_layers(self) -> list[int]:
        return list(self.llm_layers)

    def select_layer(self, scores, image_mask, valid, stage: int = 0):
        return keep_top_image_tokens(scores, image_mask, valid, self.llm_keep[stage])

    def check(self, info: ModelInfo) -> None:
        VisionPruner.check(self, info)
        if self.llm_layers:
            LayerPruner.check(self, info)


def flow_objective(full_hidden: torch.Tensor, pruned_hidden: torch.Tensor) -> float:
    """VFlowOpt's visual-information-flow objective: cosine similarity of the last token's final hidden
    state with and without pruning (NaN counts as 0), averaged over the batch."""
    cos = torch.nn.functional.cosine_similarity(full_hidden.float(), pruned_hidden.float(), dim=-1)
    return float(torch.nan_to_num(cos, nan=0.0).mean())
