"""DAMRO — "Dive into Attention Mechanism to Reduce Object hallucination" (arXiv 2410.04514, EMNLP 2024).
Spec: shared/reference/hallucination_grounding.md §2; docs/methods/damro.md.

The vision tower's [CLS] attention concentrates on a few high-norm background "outlier" tokens, and the
language model's attention over the image follows it. DAMRO picks the top ``k`` tokens of each image by the
[CLS] attention of the feature layer (head mean, the tower's real attention) and decodes contrastively
against a branch that sees *only* those k tokens (their projected features, at their original positions;
the other tokens are dropped, so the branch's sequence is short and cheap), with its own KV cache:

    z = (1 + alpha) z_full - alpha z_outliers;   z[v] = -inf where z_full[v] < log(beta) + max z_full

Towers without a [CLS] token (the Qwen towers, SigLIP) need a substitute criterion (``criterion``): ``received`` —
the mean attention each token *receives* from all patches in the scoring layer (summed over the 2x2 patches merged into
one LLM token), the column-mean analogue of [CLS] attention (the default there, as for FasterVLM); or
``norm`` — the L2 norm of the projected token features (high-norm outliers, as in "ViTs need registers").
Neither is validated by the paper.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import torch
from pydantic import Field

from ..adapters.base import ImageTokens, ModelInfo
from ..errors import PolicyError
from ..pruners.base import topk_sorted
from ..registry import register
from .base import BranchInputs, BranchMethod, method_dataclass


def outlier_scores(image: ImageTokens, criterion: str = "auto") -> torch.Tensor:
    """Per LLM token, how much of an "outlier" it is: [CLS] attention, received attention, or feature norm."""
    if criterion == "norm":
        return image.features.float().norm(dim=-1)
    if criterion in ("auto", "cls") and image.cls_attention is not None:
        if image.cls_attention.numel() != image.n_tokens:
            raise RuntimeError(f"[CLS] attention covers {image.cls_attention.numel()} patches but the image has "
                               f"{image.n_tokens} LLM tokens")
        return image.cls_attention.float()
    if criterion == "cls":
        raise RuntimeError("damro.criterion = 'cls' needs a vision tower with a [CLS] token (this one has none); "
                           "use 'received' or 'norm' (or 'auto')")
    return image.attention_means("DAMRO")[0].view(-1, image.patches_per_token).sum(1)


def select_outliers(image: ImageTokens, k: int, criterion: str = "auto") -> torch.Tensor:
    """Indices (ascending) of the top-``k`` outlier tokens of one image."""
    s = outlier_scores(image, criterion)
    return topk_sorted(s, min(k, s.numel()))


@register("damro")
@method_dataclass
class DAMRO(BranchMethod):
    k: Annotated[int, Field(ge=1)] = 10
    """outlier tokens per image (10 for LLaVA-1.5/NeXT's 576 tokens, 4 for InstructBLIP's 256)"""
    alpha: Annotated[float, Field(ge=0)] = 2.0
    """contrast strength: (1 + alpha) z_full - alpha z_outliers"""
    beta: Annotated[float, Field(ge=0, le=1)] = 0.1
    """plausibility cutoff, relative to the full branch's most likely token"""
    criterion: Literal["auto", "cls", "received", "norm"] = "auto"
    """auto: [CLS] attention when the tower has a [CLS] token, else attention received (see the module doc)"""
    layer: int | None = None
    """vision layer whose attention is read; None = the layer that feeds the LLM (LLaVA: -2)"""

    needs_vision_attention: ClassVar[bool] = True
    reads_attention_means: ClassVar[bool] = True
    positive_branch: ClassVar[bool] = False

    def attention_layer(self) -> int | None:
        return self.layer

    def check(self, info: ModelInfo) -> None:
        if self.criterion == "cls" and not info.cls_token:
            raise PolicyError(f"damro.criterion = 'cls' needs a vision tower with a [CLS] token, and this "
                              f"{info.family} tower has none; use 'auto' (attention received instead), 'received' "
                              "or 'norm'")
        info.check_vision_layer("damro", self.layer, reads_attention=self.criterion != "norm")

    def main_weight(self) -> float:
        return self.alpha

    def branch_weight(self) -> float:
        return -self.alpha

    def build(self, request) -> BranchInputs:
        """The outlier-only branch's inputs: each image reduced to its k outliers (their own features)."""
        kept = [select_outliers(im, self.k, self.criterion) for im in request.encoded.visual]
        return BranchInputs(request.assemble(kept), kept, request.inputs,
                            info=f"{self.k} outlier tokens per image ({self.criterion})")
