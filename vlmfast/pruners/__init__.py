"""Visual-token pruners, one method per file; importing this package registers them."""

from .base import LayerPruner, Method, VisionPruner, n_keep
from .fastv import FastV
from .fopru import FoPru

__all__ = ["Method", "VisionPruner", "LayerPruner", "FoPru", "FastV", "n_keep"]
