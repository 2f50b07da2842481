"""Sparse prefill attention: MMInference's modality-aware permutation sparse attention, with MInference's
patterns as special cases (docs/methods/mminference.md).

* :mod:`.layout` — where the visual spans are and where each token came from (grid, original offsets);
* :mod:`.patterns` — per-head patterns (grid, A-shape, vertical-slash, block-sparse, Q-/2D-boundary) with
  their online estimation, each compiled to a :class:`~.mask.MaskSpec` (the exact mask the kernels compute);
* :mod:`.kernels` — the portable PyTorch kernel (CPU flash pieces on views / gathered tiles, merged by
  log-sum-exp), Triton kernels for GPUs, FlexAttention for comparison;
* :mod:`.search` — offline per-head pattern and budget search by attention recall -> head-pattern JSON;
* :mod:`.method` — the ``mminference`` policy method that dispatches per layer and head during prefill.
"""

from .layout import Layout, Span
from .mask import MaskSpec, attention_recall
from .method import HeadPatterns, MMInference
from .patterns import AShape, BlockSparse, Boundary2D, Dense, Grid, QBoundary, VerticalSlash, parse_pattern

__all__ = ["Layout", "Span", "MaskSpec", "attention_recall", "HeadPatterns", "MMInference", "AShape",
           "BlockSparse", "Boundary2D", "Dense", "Grid", "QBoundary", "VerticalSlash", "parse_pattern"]
