"""What a pruner is: a dataclass of hyper-parameters that answers "which visual tokens to keep".

Two kinds, by where they act (see docs/architecture.md):

* ``VisionPruner`` (stage ``vision``): after the vision tower, before the language model. Gets each image's
  ``ImageTokens`` (features, grid, the scoring layer's attention) and returns the indices to keep. A video is
  pruned per frame group (``VisionPruner.prune_visual``): each group is an image of grid (1, h, w).
* ``LayerPruner`` (stage ``layer``): inside the language model. Before decoder layer ``layer`` it gets the
  attention the last query paid to every key at layer ``layer - 1`` and returns a keep mask over the sequence.

Scoring and selecting are separate functions so a new method is usually one ``score``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import torch

from ..adapters.base import ImageTokens, ModelInfo
from ..budget import ViewBudget, n_keep  # noqa: F401  (n_keep re-exported: the pruners count with it)
from ..errors import PolicyError
from ..method import Method, Run, method_dataclass

if TYPE_CHECKING:
    from ..request import Request


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in ascending index order (kept tokens keep their original order)."""
    return torch.topk(scores, k, sorted=False).indices.sort().values


class Pruned(NamedTuple):
    """What a vision pruner returns for one image."""

    keep: torch.Tensor
    """indices (ascending) of the tokens that enter the LLM"""
    features: torch.Tensor
    """their features (their own, or merged ones placed at those positions)"""
    scores: torch.Tensor | None = None
    """per kept token importance, for methods whose later (layer) stages rank by it (VFlowOpt)"""


@method_dataclass
class VisionPruner(Method):
    stage: ClassVar[str] = "vision"
    #: set by the method: does it need the vision layer's attention, and which layer (None = feature layer)
    needs_attention: ClassVar[bool] = True
    #: does it read only the attention's column and row means (``ImageTokens.attention_means``)? When every
    #: method that reads the vision attention does, adapters may skip the (N, N) matrix
    reads_attention_means: ClassVar[bool] = False
    #: does it read ``ImageTokens.grey`` (pixel grey values per token)? The adapters compute them only then
    #: (0.4 s for a 16k-token video)
    needs_grey: ClassVar[bool] = False
    #: does it read ``ImageTokens.instruction`` (the prompt's token embeddings: CDPruner)? Filled only then
    needs_instruction: ClassVar[bool] = False
    #: does it call ``ImageTokens.resample`` (the tower on the image resized: downsample)? Set only then
    needs_resample: ClassVar[bool] = False
    view_budget: ViewBudget = dataclasses.field(default="proportional", kw_only=True)
    """how a multi-view image's budget (``keep`` of all its views' tokens) is split over its views: "proportional" to
    their sizes, or "base": the base view keeps half (``budget.split_budget``); no effect on one-view images"""

    def attention_layer(self) -> int | None:
        return getattr(self, "layer", None)

    def select(self, image: ImageTokens) -> torch.Tensor:
        """Indices (ascending) of the image's tokens to keep."""
        raise NotImplementedError

    def prune(self, image: ImageTokens) -> Pruned:
        """Indices to keep and the features they carry into the LLM (their own, unless the method merges
        dropped tokens into kept positions, like VisionZip's contextual tokens)."""
        keep = self.select(image)
        return Pruned(keep, image.features[keep])

    def prune_visual(self, image: ImageTokens) -> Pruned:
        """``prune`` one visual input: an image as a whole; a video (grid t > 1) per frame group, each group an
        image of grid (1, h, w) with its own attention block that keeps its share (``keep`` of each group)."""
        groups = image.frame_groups()
        if len(groups) == 1:
            return self.prune(image)
        parts = [self.prune(g) for g in groups]
        per = groups[0].n_tokens
        scored = [p.scores for p in parts if p.scores is not None]
        scores = torch.cat(scored) if len(scored) == len(parts) else None
        return Pruned(torch.cat([p.keep + i * per for i, p in enumerate(parts)]),
                      torch.cat([p.features for p in parts]), scores)

    def check(self, info: ModelInfo) -> None:
        info.check_vision_layer(self.method_name, self.attention_layer(), reads_attention=self.needs_attention)


@method_dataclass
class LayerPruner(Method):
    """Drops image tokens before one or more decoder layers (``drop_layers``), ranked by the attention the
    last query pays to each key at the layer before."""

    stage: ClassVar[str] = "layer"
    #: the dataclass field holding the drop layer(s), for error messages
    layers_field: ClassVar[str] = "layer"
    #: rank by the vision stage's per-token scores (VFlowOpt) instead of the LLM's last-query attention
    uses_vision_scores: ClassVar[bool] = False

    def drop_layers(self) -> list[int]:
        return [self.layer]  # type: ignore[attr-defined]  # the field of single-layer subclasses (FastV)

    def select_layer(self, scores: torch.Tensor, image_mask: torch.Tensor, valid: torch.Tensor,
                     stage: int = 0) -> torch.Tensor:
        """scores, image_mask, valid: (B, L). Return a (B, L) bool keep mask (non-image tokens must stay).
        ``stage`` is the index into ``drop_layers()`` (for multi-stage methods)."""
        raise NotImplementedError

    def check(self, info: ModelInfo) -> None:
        layers = self.drop_layers()
        field_name = self.layers_field
        bad = [k for k in layers if not 1 <= k < info.num_layers]
        if bad:
            raise PolicyError(
                f"{self.method_name}.{field_name} = {getattr(self, field_name)} is beyond "
                f"the language model's depth: it has {info.num_layers} layers, so expected 1 <= layer < "
                f"{info.num_layers}"
            )
        if sorted(set(layers)) != list(layers):
            raise PolicyError(f"{self.method_name}.layers = {layers}: expected strictly increasing layers")


@method_dataclass
class AttentionMethod(Method):
    """Changes how the language model attends and what its KV cache keeps, without shortening the sequence
    (ZipVL): its per-request :class:`~vlmfast.method.Run` overrides layers' attention on the session and may
    rewrite the KV cache after prefill."""

    stage: ClassVar[str] = "attention"

    def start(self, request: Request) -> Run:
        raise NotImplementedError
