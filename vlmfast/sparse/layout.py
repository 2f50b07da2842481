"""Where the visual tokens of one sequence are, and where each came from.

A :class:`Layout` lists the visual spans (one per image or video) of the sequence the language model sees,
each with its grid ``(t, h, w)`` in LLM tokens and, for every token still present, its original raster
offset ``t * h * w`` inside the span. Pruned inputs keep the offsets of the tokens that pruning kept, so
grid lines (the same spatial cell in every frame, the first cell of every row) stay where they were.
Family differences (how spans and grids are read from the inputs) stay in the adapters and the
accelerator; this module only sees numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Span:
    start: int
    """first position of the span in the sequence"""
    grid: tuple[int, int, int]
    """(t, h, w) of the full visual input, in LLM tokens"""
    offsets: torch.Tensor
    """(m,) original raster offsets of the tokens present, ascending; the span covers [start, start + m)"""
    kind: str = "image"

    @property
    def end(self) -> int:
        return self.start + int(self.offsets.numel())

    @property
    def frame_stride(self) -> int:
        return self.grid[1] * self.grid[2]

    @property
    def row_stride(self) -> int:
        return self.grid[2]


@dataclass
class Layout:
    n: int
    spans: list[Span] = field(default_factory=list)

    def __post_init__(self):
        last = 0
        for s in self.spans:
            if s.start < last or s.end > self.n:
                raise ValueError(f"visual spans overlap or exceed the sequence of {self.n} tokens: "
                                 f"{[(x.start, x.end) for x in self.spans]}")
            last = s.end

    @staticmethod
    def from_counts(n: int, visual: torch.Tensor, grids: list[tuple[int, int, int]],
                    offsets: list[torch.Tensor], kinds: list[str] | None = None) -> "Layout":
        """``visual``: (n,) bool, True at visual tokens; the i-th visual input owns the next
        ``len(offsets[i])`` visual positions (inputs in order, tokens in order). An input whose tokens are several
        runs in the sequence (a Qwen3-VL video: one run per frame group, each after its text timestamp) becomes one
        span per run, each with the input's grid and its own tokens' offsets."""
        pos = visual.nonzero().squeeze(1).tolist()
        spans, at = [], 0
        for i, (g, off) in enumerate(zip(grids, offsets)):
            m = int(off.numel())
            if m == 0:
                continue
            if at + m > len(pos):
                raise ValueError(f"visual input {i} has {m} tokens but only {len(pos) - at} visual positions are left")
            t, h, w = (int(x) for x in g)
            mine = torch.tensor(pos[at:at + m])
            breaks = ((mine[1:] - mine[:-1]) != 1).nonzero().squeeze(1).add(1).tolist()
            for s, e in zip([0, *breaks], [*breaks, m]):
                spans.append(Span(int(mine[s]), (t, h, w), off[s:e].long().cpu(), kinds[i] if kinds else "image"))
            at += m
        if at != len(pos):
            raise ValueError(f"{len(pos)} visual positions but the inputs account for {at}")
        return Layout(n, spans)

    @property
    def visual(self) -> torch.Tensor:
        m = torch.zeros(self.n, dtype=torch.bool)
        for s in self.spans:
            m[s.start:s.end] = True
        return m

    def modality(self) -> torch.Tensor:
        """(n,) long: 0 text, 1 visual."""
        return self.visual.long()

    def offsets(self) -> torch.Tensor:
        """(n,) long: original offset inside its span, -1 for text."""
        out = torch.full((self.n,), -1, dtype=torch.long)
        for s in self.spans:
            out[s.start:s.end] = s.offsets
        return out

    def strides(self, kind: str | int) -> torch.Tensor:
        """(n,) long: the grid stride of each visual token's span (``frame`` = h*w, ``row`` = w, or a number);
        0 for text."""
        out = torch.zeros(self.n, dtype=torch.long)
        for s in self.spans:
            val = s.frame_stride if kind == "frame" else s.row_stride if kind == "row" else int(kind)
            out[s.start:s.end] = max(1, val)
        return out

    @property
    def first_visual(self) -> int:
        return self.spans[0].start if self.spans else self.n

    @property
    def last_visual_end(self) -> int:
        return self.spans[-1].end if self.spans else 0

    def subset(self, idx: torch.Tensor) -> "Layout":
        """The layout of the tokens at sorted positions ``idx`` (padding removed, tokens dropped by a layer
        pruner): spans keep their grids and their tokens' original offsets."""
        idx = idx.cpu()
        spans = []
        for s in self.spans:
            inside = (idx >= s.start) & (idx < s.end)
            if not bool(inside.any()):
                continue
            first = int(inside.nonzero()[0, 0])
            spans.append(Span(first, s.grid, s.offsets[idx[inside] - s.start], s.kind))
        return Layout(int(idx.numel()), spans)


def video_like(n_prefix: int, frames: int, h: int, w: int, n_suffix: int) -> Layout:
    """A synthetic layout: ``n_prefix`` text tokens, one video of ``frames`` x h x w tokens, ``n_suffix`` text
    tokens (benchmarks, tests)."""
    m = frames * h * w
    return Layout(n_prefix + m + n_suffix, [Span(n_prefix, (frames, h, w), torch.arange(m), "video")])


def multi_image(n_prefix: int, n_images: int, h: int, w: int, n_between: int, n_suffix: int) -> Layout:
    spans, at = [], n_prefix
    for i in range(n_images):
        spans.append(Span(at, (1, h, w), torch.arange(h * w)))
        at += h * w + (n_between if i < n_images - 1 else 0)
    return Layout(at + n_suffix, spans)
