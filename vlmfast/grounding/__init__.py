"""Attention-as-prompt grounding (VL-SAM style): the VLM's own attention becomes point prompts for SAM.

``acc.generate(images, prompt, ground=True)`` captures, through vlmfast's attention function, the attention of
the answer's object words (and of any ``ground_phrases`` in the prompt) over the image tokens, aggregates the
heads (mean-max), propagates it across layers (regularised attention flow), removes visual attention sinks,
maps the token grid back to the image's pixels, samples positive / negative points from the map and lets
SAM turn them into a mask. ``out.grounding`` holds one :class:`Grounding` per phrase.

Modules: ``config`` (the hyper-parameters), ``capture`` (the attention observer), ``maps`` (head
aggregation, flow, sinks, grid to pixels), ``prompts`` (points from a map), ``phrases`` (which phrases and
which query rows), ``segmenter`` (loading SAM and the refinement loop), ``pipeline`` (one request end to end).
Spec: shared/reference/hallucination_grounding.md sections 4-5 and 7.3; docs/methods/grounding.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .config import GroundingConfig


@dataclass
class Grounding:
    """One grounded phrase."""

    phrase: str
    image_index: int
    """which of the request's images the phrase was grounded in (the one holding most of its attention)"""
    heatmap: np.ndarray = field(repr=False)
    """float32 H x W (original image size), values in [0, 1]: the phrase's attention map"""
    points: np.ndarray = field(repr=False)
    """N x 2 point prompts, (x, y) pixels in the original image"""
    point_labels: np.ndarray = field(repr=False)
    """N: 1 positive, 0 negative"""
    box: np.ndarray | None = field(repr=False)
    """the box prompt (x0, y0, x1, y1) sent to SAM, or None when no box was used (``use_box``)"""
    mask: np.ndarray = field(repr=False)
    """bool H x W: SAM's mask"""
    score: float
    """SAM's predicted IoU of the mask"""


__all__ = ["Grounding", "GroundingConfig"]
