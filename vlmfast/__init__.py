"""vlmfast: faster, more trustworthy vision-language model inference, by policy, on transformers' models."""

from ._logging import setup_logging
from .accelerator import GenerateOutput, VLMAccelerator
from .errors import InputError, PolicyError, UnsupportedModelError, VlmfastError
from .grounding import Grounding, GroundingConfig
from .policy import Policy, load_policy
from .pruners import FastV, FoPru
from .reweight import AGLA, DAMRO, VAR
from .registry import available as available_methods, register
from .stats import Stats

__version__ = "0.1.0"
setup_logging()

__all__ = [
    "VLMAccelerator", "GenerateOutput", "Stats", "Policy", "load_policy", "register", "available_methods",
    "FoPru", "FastV", "VlmfastError", "PolicyError", "InputError", "UnsupportedModelError",
    "Grounding", "GroundingConfig", "VAR", "DAMRO", "AGLA",
]
