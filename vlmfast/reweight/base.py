"""What a hallucination-mitigation method is. Two kinds, by where they act (docs/architecture.md):

* ``Reweighter`` (stage ``reweight``, VAR): changes the language model's post-softmax attention weights inside
  vlmfast's attention function. It wraps whatever computes a layer's attention (the model's own
  implementation, or an attention method's override such as sparse prefill), so it composes with pruners
  and with prefill-only attention methods. ``start(image_mask, valid)`` returns a per-request run with
  ``register(session, n_layers)``, ``hooks(layers)`` and ``report(b)``.
* ``BranchMethod`` (stage ``decoding``, DAMRO and AGLA): decodes with a second view of the request (an
  outlier-only image, an augmented image) in its own branch with its own KV cache; each step the branches'
  logits are combined with the main branch's, z = w_main z_main + sum_b w_b z_b, then tokens outside the
  main branch's plausible set {v : z_main[v] >= log(beta) + max z_main} are removed, then the usual logits
  processors and warpers apply (vlmfast/reweight/branches.py runs this).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from ..pruners.base import Method, method_dataclass


@method_dataclass
class Reweighter(Method):
    stage: ClassVar[str] = "reweight"

    def start(self, adapter, inputs: dict, image_mask: torch.Tensor, valid: torch.Tensor):
        """A per-request run. ``inputs``: the processor's inputs (token ids of the unpruned prompt);
        ``image_mask``, ``valid``: (B, L) over the sequence the language model receives (after pruning)."""
        raise NotImplementedError


@method_dataclass
class BranchMethod(Method):
    """A decoding method with one extra branch. Subclasses define ``alpha``, ``beta`` and build the branch."""

    stage: ClassVar[str] = "decoding"
    #: does the method read the vision tower's attention ([CLS] row) to build its branch (DAMRO)
    needs_vision_attention: ClassVar[bool] = False
    #: does the branch see the image the main branch sees (VAR applies there too) or a negative view (it does not)
    positive_branch: ClassVar[bool] = True

    def main_weight(self) -> float:
        """What this method adds to the main branch's weight (DAMRO: alpha; AGLA: 0)."""
        return 0.0

    def branch_weight(self) -> float:
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
