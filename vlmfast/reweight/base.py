"""What a hallucination-mitigation method is. Two kinds, by where they act (docs/architecture.md):

* ``Reweighter`` (stage ``reweight``, VAR): changes the language model's post-softmax attention weights inside
  vlmfast's attention function. It wraps whatever computes a layer's attention (the model's own
  implementation, or an attention method's override such as sparse prefill), so it composes with pruners
  and with prefill-only attention methods. ``start(request)`` returns its per-request run (wrappers on the
  session, sink pre-hooks on the decoder layers, a report row).
* ``BranchMethod`` (stage ``decoding``, DAMRO and AGLA): decodes with a second view of the request (an
  outlier-only image, an augmented image) in its own branch with its own KV cache; each step the branches'
  logits are combined with the main branch's, z = w_main z_main + sum_b w_b z_b, then tokens outside the
  main branch's plausible set {v : z_main[v] >= log(beta) + max z_main} are removed, then the usual logits
  processors and warpers apply (vlmfast/reweight/branches.py runs this). ``build(request)`` returns the branch's
  :class:`BranchInputs`, made with the request's public assembly API (``request.assemble(kept)``,
  ``request.encode(images)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..method import Method, Run, method_dataclass
from ..request import Assembled, Request


@method_dataclass
class Reweighter(Method):
    stage: ClassVar[str] = "reweight"

    def start(self, request: Request) -> Run:
        raise NotImplementedError


@dataclass
class BranchInputs:
    """What a decode branch feeds the language model (built by a :class:`BranchMethod` from the request)."""

    seq: Assembled
    """the branch's sequence (embeddings, mask, positions, visual tokens)"""
    kept: list[torch.Tensor]
    """per image, the indices of its visual tokens the branch sees"""
    inputs: dict
    """the processor's inputs the branch's prompt came from (VAR reads its first real token)"""
    info: str = ""
    """one line for the report"""
    similarity: list[float] | None = None
    """per image, the matcher's image-prompt similarity (AGLA)"""
    kept_fraction: list[float] | None = None
    """per image, the share of its pixels the augmented copy keeps (AGLA)"""


@method_dataclass
class BranchMethod(Method):
    """A decoding method with one extra branch. Subclasses define ``alpha``, ``beta`` and build the branch."""

    stage: ClassVar[str] = "decoding"
    #: does the method read the vision tower's attention (the [CLS] row, or the attention patches receive) to build
    #: its branch (DAMRO)
    needs_vision_attention: ClassVar[bool] = False
    #: does it read only the vision attention's column and row means (see ``VisionPruner``)?
    reads_attention_means: ClassVar[bool] = False
    #: does the branch see the image the main branch sees (VAR applies there too) or a negative view (it does not)
    positive_branch: ClassVar[bool] = True

    def attention_layer(self) -> int | None:
        """The vision layer whose attention the branch reads (None: the layer that feeds the language model);
        methods with ``needs_vision_attention`` define it."""
        raise NotImplementedError

    def main_weight(self) -> float:
        """What this method adds to the main branch's weight (DAMRO: alpha; AGLA: 0)."""
        return 0.0

    def branch_weight(self) -> float:
        raise NotImplementedError

    def build(self, request: Request) -> BranchInputs:
        """The branch's inputs, from the request (``request.assemble(kept)``, ``request.encode(images)``)."""
        raise NotImplementedError


def combine(main: torch.Tensor, branches: list[tuple[float, torch.Tensor]], main_weight: float = 1.0,
            beta: float = 0.0) -> torch.Tensor:
    """z = main_weight * main + sum(w * z_b); then -inf where main < log(beta) + max(main) (beta = 0: no cutoff).

    The cutoff comes from the main (full image) branch only, so the main branch's argmax is always kept.
    """
    z = main * main_weight if main_weight != 1.0 else main.clone()
    for w, zb in branches:
        z = z + w * zb
    if beta > 0:
        cutoff = math.log(beta) + main.max(-1, keepdim=True).values
        z = z.masked_fill(main < cutoff, float("-inf"))
    return z
