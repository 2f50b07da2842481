"""Sparse attention patterns for one head; each compiles to the :class:`MaskSpec` the kernels compute.

MMInference's menu (arXiv 2504.16083) with MInference's patterns (arXiv 2407.02490) as special cases:

* ``grid``: sink + local band + horizontal lines (whole query rows) + vertical lines (whole key columns) that
  repeat with a stride (``frame`` = tokens per frame/image, ``row`` = tokens per row, or a number) and a
  phase over each visual span; rows after the first visual token that are text (the question) are dense.
  The phase is fixed (found by the offline search) or estimated online from the last queries.
* ``a_shape``: sink + local band (Lambda shape); with ``tail_dense`` the text after the visual input
  attends densely (tri-shape).
* ``vertical_slash``: top vertical columns and top slash diagonals estimated from the last ``last_q``
  queries (30 first columns and 100 nearest diagonals forced, as MInference does).
* ``block_sparse``: top-k key blocks per query block by mean-pooled q . k.
* ``q_boundary``: vertical-slash estimated per modality (probe = the last queries of that modality's last
  span) and applied only to that modality's query rows.
* ``boundary_2d``: rows grouped by modality as in ``q_boundary``, and keys too: each (row modality, key
  modality) quadrant gets its own vertical budget; slashes come from the within-modality quadrant.
* ``dense``.

Budgets (``sink``, ``local``, ``vertical``, ``slash``, ``topk``) are token counts, or shares of the sequence
when given as a float below 1. Block-level parts are in units of the kernel block (``block``, default 64).
docs/methods/mminference.md has the details and what differs from the research code.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, Union, cast

import torch
from pydantic import Field, TypeAdapter, ValidationError

from ..errors import PolicyError
from ..method import format_validation_error, method_dataclass
from .layout import Layout
from .mask import MaskSpec, n_blocks

Budget = Annotated[float, Field(ge=0)]

#: MInference's forced columns (attention sinks) and diagonals (local window) in vertical-slash estimation
FORCED_COLUMNS = 30
FORCED_DIAGONALS = 100


def tokens(budget: float, n: int) -> int:
    """A budget as a token count: a float below 1 is a share of ``n``; anything else a count."""
    if 0 < budget < 1:
        return min(n, max(1, math.ceil(budget * n)))
    return min(n, int(budget))


@method_dataclass
class Dense:
    pattern: Literal["dense"] = "dense"

    def build(self, ctx: "HeadContext") -> MaskSpec:
        return ctx.cached(("dense",), lambda: MaskSpec.full(ctx.n, ctx.block, ctx.device))


@method_dataclass
class AShape:
    pattern: Literal["a_shape"] = "a_shape"
    sink: Budget = 128
    local: Budget = 1024
    tail_dense: bool = True
    """tri-shape: text rows after the last visual token attend densely"""

    def build(self, ctx: "HeadContext") -> MaskSpec:
        key = ("a_shape", self.sink, self.local, self.tail_dense)
        return ctx.cached(key, lambda: _a_shape(ctx, tokens(self.sink, ctx.n), tokens(self.local, ctx.n),
                                                self.tail_dense))


@method_dataclass
class VerticalSlash:
    pattern: Literal["vertical_slash"] = "vertical_slash"
    vertical: Budget = 1000
    slash: Budget = 1024
    last_q: Annotated[int, Field(ge=1)] = 64

    def build(self, ctx: "HeadContext") -> MaskSpec:
        n, b = ctx.n, ctx.block
        rows = torch.arange(max(0, n - self.last_q), n, device=ctx.device)
        cols, diag = vs_estimate(ctx, rows, n, tokens(self.vertical, n), tokens(self.slash, n))
        return MaskSpec(n, b, slash_blocks(diag, n, b)[None], cols[None], _no_rows(ctx), pattern="vertical_slash")


@method_dataclass
class BlockSparse:
    pattern: Literal["block_sparse"] = "block_sparse"
    topk: Budget = 0.1
    """key blocks per query block: a count, or a share of the blocks when below 1"""

    def build(self, ctx: "HeadContext") -> MaskSpec:
        n, b = ctx.n, ctx.block
        nb = n_blocks(n, b)
        qp, kp = _pool(ctx.q, b), _pool(ctx.k, b)
        causal = torch.ones(nb, nb, dtype=torch.bool, device=ctx.device).tril()
        score = (qp @ kp.t()).masked_fill(~causal, float("-inf"))
        k = max(1, min(nb, tokens(self.topk, nb)))
        top = score.topk(k, dim=1).indices
        blocks = torch.zeros(nb, nb, dtype=torch.bool, device=ctx.device)
        blocks.scatter_(1, top, True)
        blocks[:, 0] = True
        return MaskSpec(n, b, blocks.tril()[None], torch.zeros(1, n, dtype=torch.bool, device=ctx.device),
                        _no_rows(ctx), pattern="block_sparse")


@method_dataclass
class Grid:
    pattern: Literal["grid"] = "grid"
    stride: Union[Literal["frame", "row"], Annotated[int, Field(ge=1)]] = "frame"
    phase: Annotated[int, Field(ge=0)] | None = None
    """offset of the lines inside each period; None: estimated online from the last ``last_q`` queries"""
    local: Budget = 1024
    sink: Budget | None = None
    """key tokens at the start always attended; None: every token before the first visual span"""
    horizontal: bool = True
    vertical: bool = True
    text_columns: bool = True
    """text tokens after the first visual token are attended by every row (they are few: separators,
    the question); our extension for multi-image inputs"""
    last_q: Annotated[int, Field(ge=1)] = 64

    def build(self, ctx: "HeadContext") -> MaskSpec:
        phase = grid_phase(ctx, self.stride, self.last_q) if self.phase is None else self.phase
        key = ("grid", self.stride, phase, self.local, self.sink, self.horizontal, self.vertical, self.text_columns)
        return ctx.cached(key, lambda: _grid(ctx, self, phase))


@method_dataclass
class QBoundary:
    pattern: Literal["q_boundary"] = "q_boundary"
    vertical: Budget = 1000
    slash: Budget = 1024
    last_q: Annotated[int, Field(ge=1)] = 64

    def build(self, ctx: "HeadContext") -> MaskSpec:
        return _boundary(ctx, self, two_d=False)


@method_dataclass
class Boundary2D:
    pattern: Literal["boundary_2d"] = "boundary_2d"
    vertical: Budget = 1000
    """vertical budget of each (row modality, key modality) quadrant"""
    slash: Budget = 1024
    last_q: Annotated[int, Field(ge=1)] = 64

    def build(self, ctx: "HeadContext") -> MaskSpec:
        return _boundary(ctx, self, two_d=True)


Pattern = Annotated[Union[Dense, AShape, VerticalSlash, BlockSparse, Grid, QBoundary, Boundary2D],
                    Field(discriminator="pattern")]
_PATTERN = TypeAdapter(Pattern)
PATTERNS = {"dense": Dense, "a_shape": AShape, "vertical_slash": VerticalSlash, "block_sparse": BlockSparse,
            "grid": Grid, "q_boundary": QBoundary, "boundary_2d": Boundary2D}


def parse_pattern(data) -> "Pattern":
    """A pattern from a dict like ``{"pattern": "grid", "stride": "frame", "phase": 3}`` (validated)."""
    if isinstance(data, tuple(PATTERNS.values())):
        return cast("Pattern", data)  # isinstance over a computed tuple of classes narrows to object only
    try:
        return _PATTERN.validate_python(data)
    except ValidationError as e:
        raise PolicyError(f"sparse pattern {data!r}: {format_validation_error(e)}") from None


def pattern_dict(p) -> dict:
    import dataclasses

    return dataclasses.asdict(p)


# -- per-head context ---------------------------------------------------------------------------------------
class HeadContext:
    """What a pattern sees for one head of one layer: its queries and keys (for online estimation), the
    layout, the kernel block, and a cache so structural masks are built once per layer and shared by heads."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, layout: Layout, block: int, scale: float,
                 cache: dict | None = None):
        self.q, self.k, self.layout, self.block, self.scale = q, k, layout, block, scale
        self.n = q.shape[0]
        self.device = q.device
        self._cache = cache if cache is not None else {}

    def cached(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def on_device(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device)


def _no_rows(ctx: HeadContext) -> torch.Tensor:
    return torch.zeros(ctx.n, dtype=torch.bool, device=ctx.device)


def _pool(x: torch.Tensor, b: int) -> torch.Tensor:
    n, d = x.shape
    nb = n_blocks(n, b)
    pad = nb * b - n
    xp = torch.cat([x.float(), x.new_zeros(pad, d).float()]) if pad else x.float()
    counts = torch.full((nb,), float(b), device=x.device)
    counts[-1] = b - pad
    return xp.view(nb, b, d).sum(1) / counts[:, None]


def band_blocks(n: int, b: int, sink: int, local: int, device) -> torch.Tensor:
    """(nB, nB): key blocks holding the first ``sink`` tokens, and the ``local`` tokens before each query
    block (rounded up to whole blocks), causal."""
    nb = n_blocks(n, b)
    i = torch.arange(nb, device=device)
    diff = i[:, None] - i[None, :]
    blocks = (diff >= 0) & (diff <= math.ceil(local / b))
    blocks |= (i[None, :] < math.ceil(sink / b)) & (diff >= 0)
    return blocks


def _a_shape(ctx: HeadContext, sink: int, local: int, tail_dense: bool) -> MaskSpec:
    n, b = ctx.n, ctx.block
    rows = _no_rows(ctx)
    if tail_dense and ctx.layout.spans:
        rows[ctx.layout.last_visual_end:] = True
    return MaskSpec(n, b, band_blocks(n, b, sink, local, ctx.device)[None],
                    torch.zeros(1, n, dtype=torch.bool, device=ctx.device), rows, pattern="a_shape")


def _grid(ctx: HeadContext, p: Grid, phase: int) -> MaskSpec:
    n, b, lay = ctx.n, ctx.block, ctx.layout
    sink = lay.first_visual if p.sink is None else tokens(p.sink, n)
    offsets = lay.offsets()
    strides = lay.strides(p.stride)
    visual = offsets >= 0
    on_line = visual & (offsets % strides.clamp(min=1) == phase % strides.clamp(min=1))
    text_after = ~visual & (torch.arange(n) >= lay.first_visual)
    rows = (on_line if p.horizontal else torch.zeros_like(on_line)) | text_after
    cols = on_line if p.vertical else torch.zeros_like(on_line)
    if p.text_columns:
        cols = cols | text_after
    return MaskSpec(n, b, band_blocks(n, b, sink, tokens(p.local, n), ctx.device)[None],
                    ctx.on_device(cols)[None], ctx.on_device(rows), pattern="grid")


# -- online estimation ----------------------------------------------------------------------------------------
def probe_attention(ctx: HeadContext, rows: torch.Tensor, key_end: int) -> torch.Tensor:
    """Causal softmax attention of query rows ``rows`` over keys [0, key_end): (len(rows), key_end) float32."""
    logits = (ctx.q[rows].float() @ ctx.k[:key_end].float().t()) * ctx.scale
    j = torch.arange(key_end, device=ctx.device)
    return logits.masked_fill(j[None, :] > rows[:, None], float("-inf")).softmax(-1)


def vs_estimate(ctx: HeadContext, rows: torch.Tensor, key_end: int, n_vertical: int, n_slash: int,
                key_filter: torch.Tensor | None = None, forced: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """MInference's vertical-slash estimation from probe rows: (n,) bool vertical columns, (n,) bool slash
    offsets (diagonal i - j). ``key_filter``: (n,) bool, restrict both to keys of one kind (2-D boundary)."""
    n = ctx.n
    a = probe_attention(ctx, rows, key_end)
    if key_filter is not None:
        a = a * key_filter[:key_end].to(a.dtype)
    v_score = torch.zeros(n, device=ctx.device)
    v_score[:key_end] = a.sum(0)
    if forced:
        v_score[:FORCED_COLUMNS] = float("inf")
    if key_filter is not None:
        v_score = v_score.masked_fill(~key_filter, float("-inf"))
    cols = torch.zeros(n, dtype=torch.bool, device=ctx.device)
    kv = min(n_vertical, int((v_score > float("-inf")).sum()))
    if kv > 0:
        cols[v_score.topk(kv).indices] = True
    j = torch.arange(key_end, device=ctx.device)
    delta = (rows[:, None] - j[None, :]).clamp(min=0)
    s_score = torch.zeros(n, device=ctx.device).scatter_add_(0, delta.flatten(), a.flatten())
    if forced:
        s_score[:FORCED_DIAGONALS] = float("inf")
    diag = torch.zeros(n, dtype=torch.bool, device=ctx.device)
    ks = min(n_slash, n)
    if ks > 0:
        diag[s_score.topk(ks).indices] = True
    if key_filter is not None:
        cols &= key_filter
    return cols, diag


def slash_blocks(diag: torch.Tensor, n: int, b: int) -> torch.Tensor:
    """(nB, nB) block pairs touched by any kept diagonal: rows [qb*b, qb*b + b) minus an offset in ``diag``
    meet keys [kb*b, kb*b + b) iff the offset lies in ((d-1)*b, (d+1)*b) with d = qb - kb."""
    nb = n_blocks(n, b)
    c = torch.cat([torch.zeros(1, dtype=torch.long, device=diag.device), diag.long().cumsum(0)])  # c[x] = #offsets < x
    d = torch.arange(nb, device=diag.device)
    lo = ((d - 1) * b + 1).clamp(min=0, max=n)
    hi = ((d + 1) * b).clamp(max=n)
    cov = (c[hi] - c[lo]) > 0
    i = torch.arange(nb, device=diag.device)
    diff = i[:, None] - i[None, :]
    return cov[diff.clamp(min=0)] & (diff >= 0)


def grid_phase(ctx: HeadContext, stride, last_q: int) -> int:
    """Online phase estimate (MMInference spec section 1.4): the column mass of the last queries, folded
    modulo each span's stride; the phase with the most mass."""
    lay = ctx.layout
    if not lay.spans:
        return 0
    rows = torch.arange(max(0, ctx.n - last_q), ctx.n, device=ctx.device)
    col = probe_attention(ctx, rows, ctx.n).sum(0).cpu()
    offsets, strides = lay.offsets(), lay.strides(stride)
    vis = offsets >= 0
    smax = int(strides.max())
    mass = torch.zeros(smax).scatter_add_(0, (offsets[vis] % strides[vis]), col[vis])
    return int(mass.argmax())


def _probe_rows(ctx: HeadContext, modality: torch.Tensor, m: int, last_q: int) -> torch.Tensor:
    """The last ``last_q`` rows of the last contiguous span of modality ``m``."""
    idx = (modality == m).nonzero().squeeze(1)
    if not idx.numel():
        return idx
    end = int(idx[-1]) + 1
    start = end
    while start > 0 and int(modality[start - 1]) == m and end - start < last_q:
        start -= 1
    return torch.arange(start, end, device=ctx.device)


def _boundary(ctx: HeadContext, p, two_d: bool) -> MaskSpec:
    n, b = ctx.n, ctx.block
    modality = ctx.on_device(ctx.layout.modality())
    present = [m for m in (0, 1) if bool((modality == m).any())]
    blocks = torch.zeros(2, n_blocks(n, b), n_blocks(n, b), dtype=torch.bool, device=ctx.device)
    cols = torch.zeros(2, n, dtype=torch.bool, device=ctx.device)
    nv, ns = tokens(p.vertical, n), tokens(p.slash, n)
    for m in present:
        rows = _probe_rows(ctx, modality, m, p.last_q)
        end = int(rows[-1]) + 1
        if not two_d:
            c, dg = vs_estimate(ctx, rows, end, nv, ns)
        else:
            c, dg = vs_estimate(ctx, rows, end, nv, ns, key_filter=modality == m)  # within-modality quadrant
            for other in present:
                if other != m:  # cross-modality quadrant: its own vertical budget, no slashes
                    c2, _ = vs_estimate(ctx, rows, end, nv, 0, key_filter=modality == other, forced=False)
                    c = c | c2
        cols[m] = c
        blocks[m] = slash_blocks(dg, n, b)
    return MaskSpec(n, b, blocks, cols, _no_rows(ctx), groups=modality, pattern=p.pattern)
