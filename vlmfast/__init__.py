"""vlmfast: faster, more trustworthy vision-language model inference, by policy, on transformers' models.

Importing the package registers every built-in method (``vlmfast.available_methods()`` lists them) and sets the
``vlmfast`` logger's level from ``VLMFAST_VERBOSITY`` (default: warning).
"""

from ._logging import set_verbosity, setup_logging
from .accelerator import GenerateOutput, VLMAccelerator
from .errors import InputError, PolicyError, UnsupportedModelError, VlmfastError
from .grounding import Grounding, GroundingConfig
from .method import Method, Run, method_dataclass
from .policy import Policy, load_policy
from .pruners import (
    AttentionMethod,
    CDPruner,
    DivPrune,
    Downsample,
    FasterVLM,
    FastV,
    FoPru,
    LayerPruner,
    PyramidDrop,
    RandomPruner,
    VFlowOpt,
    VisionPruner,
    VisionZip,
    ZipVL,
)
from .registry import available as available_methods
from .registry import register
from .request import Request
from .reweight import AGLA, DAMRO, VAR, BranchMethod, Reweighter
from .sparse import MMInference
from .stats import Stats

__version__ = "0.1.0"
setup_logging()

__all__ = [
    # the API
    "VLMAccelerator", "GenerateOutput", "Stats", "Policy", "load_policy", "Grounding", "GroundingConfig",
    # built-in methods
    "FoPru", "VFlowOpt", "ZipVL", "FastV", "PyramidDrop", "VisionZip", "FasterVLM", "DivPrune", "CDPruner",
    "Downsample", "RandomPruner", "MMInference", "VAR", "DAMRO", "AGLA",
    # writing a method
    "register", "available_methods", "method_dataclass", "Method", "Run", "Request", "VisionPruner", "LayerPruner",
    "AttentionMethod", "Reweighter", "BranchMethod",
    # errors and logging
    "VlmfastError", "PolicyError", "InputError", "UnsupportedModelError", "set_verbosity",
]
