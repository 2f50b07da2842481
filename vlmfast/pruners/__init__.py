"""Visual-token pruners, one method per file; importing this package registers them."""

from .base import AttentionMethod, LayerPruner, Method, VisionPruner, n_keep
from .cdpruner import CDPruner
from .divprune import DivPrune
from .downsample import Downsample
from .fastervlm import FasterVLM
from .fastv import FastV
from .fopru import FoPru
from .pyramiddrop import PyramidDrop
from .random import RandomPruner
from .vflowopt import VFlowOpt
from .visionzip import VisionZip
from .zipvl import ZipVL

__all__ = ["Method", "VisionPruner", "LayerPruner", "FoPru", "FastV", "FasterVLM", "VisionZip", "DivPrune", "CDPruner",
           "Downsample", "RandomPruner", "PyramidDrop", "VFlowOpt", "ZipVL", "AttentionMethod", "n_keep"]
