"""Hallucination mitigation, one method per file; importing this package registers them.

* ``var``: VAR, visual attention redistribution inside the language model's attention (stage ``reweight``);
* ``damro``: DAMRO, contrastive decoding against the vision tower's [CLS]-attention outlier tokens;
* ``agla``: AGLA, assembled decoding with a prompt-conditioned augmented image (stage ``decoding``).

The decode branches DAMRO and AGLA run in are in :mod:`vlmfast.reweight.branches`.
"""

from .agla import AGLA
from .base import BranchMethod, Reweighter, combine
from .damro import DAMRO
from .var import VAR

__all__ = ["VAR", "DAMRO", "AGLA", "Reweighter", "BranchMethod", "combine"]
