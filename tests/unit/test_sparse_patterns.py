"""Patterns: each compiles to the mask it claims (known answers on hand-made layouts), and the kernel equals
dense attention on that mask for every pattern, including the permuted (gathered) grid passes."""

from __future__ import annotations

import pytest
import torch

from vlmfast.errors import PolicyError
from vlmfast.sparse.kernels import masked_reference, sparse_attention
from vlmfast.sparse.layout import Layout, Span, multi_image, video_like
from vlmfast.sparse.patterns import (
    AShape,
    BlockSparse,
    Boundary2D,
    Dense,
    Grid,
    HeadContext,
    QBoundary,
    VerticalSlash,
    grid_phase,
    parse_pattern,
    slash_blocks,
    tokens,
)

LAYOUTS = {"video": video_like(20, 4, 6, 8, 15), "images": multi_image(10, 3, 5, 5, 2, 12)}
PATTERNS = [Dense(), AShape(sink=16, local=48), AShape(sink=0.05, local=0.2, tail_dense=False),
            VerticalSlash(vertical=20, slash=30, last_q=16), BlockSparse(topk=2), BlockSparse(topk=0.3),
            Grid(stride="row", phase=2, local=32), Grid(stride="frame", local=16),
            Grid(stride=5, phase=1, horizontal=False),
            Grid(stride="row", phase=0, vertical=False, text_columns=False),
            QBoundary(vertical=10, slash=20, last_q=8), Boundary2D(vertical=6, slash=10, last_q=8)]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.pattern)
def test_kernel_equals_dense_on_the_pattern_mask(layout, pattern):
    lay = LAYOUTS[layout]
    torch.manual_seed(0)
    n, d = lay.n, 16
    q, k, v = torch.randn(2, n, d), torch.randn(1, n, d), torch.randn(1, n, d)
    cache: dict = {}
    specs = [pattern.build(HeadContext(q[h], k[0], lay, 16, d ** -0.5, cache)) for h in range(2)]
    out = sparse_attention(q, k, v, specs, d ** -0.5, backend="torch")
    for h in range(2):
        ref, _ = masked_reference(q[h], k[0], v[0], specs[h].dense(), d ** -0.5)
        assert (out[:, h].double() - ref).abs().max() < 2e-6
    assert 0 < specs[0].density() <= 1.0


def test_structural_patterns_are_shared_between_heads():
    lay = LAYOUTS["video"]
    q = torch.randn(lay.n, 8)
    cache: dict = {}
    a = Grid(stride="row", phase=1).build(HeadContext(q, q, lay, 16, 1.0, cache))
    b = Grid(stride="row", phase=1).build(HeadContext(q * 2, q, lay, 16, 1.0, cache))
    assert a is b  # one spec object: the kernel computes those heads in one batched call


def test_grid_lines_known_answer():
    # 3 text tokens, a video of 2 frames x 2 x 3 tokens, 2 text tokens
    lay = Layout(17, [Span(3, (2, 2, 3), torch.arange(12), "video")])
    q = torch.zeros(17, 4)
    spec = Grid(stride="row", phase=1, local=0, sink=0).build(HeadContext(q, q, lay, 16, 1.0))
    visual_line = [3 + o for o in range(12) if o % 3 == 1]  # row stride 3, phase 1
    text_after = [15, 16]
    assert spec.cols[0].nonzero().squeeze(1).tolist() == visual_line + text_after
    assert spec.rows.nonzero().squeeze(1).tolist() == visual_line + text_after
    frame = Grid(stride="frame", phase=4, local=0, sink=0, text_columns=False).build(HeadContext(q, q, lay, 16, 1.0))
    assert frame.cols[0].nonzero().squeeze(1).tolist() == [3 + 4, 3 + 10]  # frame stride 6


def test_grid_follows_original_offsets_after_pruning():
    lay = Layout(20, [Span(2, (1, 4, 4), torch.arange(16))])
    kept = torch.tensor([0, 1, 2, 5, 6, 9, 10, 13, 17, 18, 19])  # kept by a pruner: 4 text + 7 visual tokens
    sub = lay.subset(kept)
    assert sub.n == 11 and sub.spans[0].start == 2
    assert sub.spans[0].offsets.tolist() == [0, 3, 4, 7, 8, 11, 15]
    q = torch.zeros(11, 4)
    spec = Grid(stride="row", phase=3, local=0, sink=0, text_columns=False).build(HeadContext(q, q, sub, 16, 1.0))
    assert spec.cols[0].nonzero().squeeze(1).tolist() == [3, 5, 7, 8]  # offsets 3, 7, 11, 15 (row stride 4)


def test_a_shape_blocks_and_tail():
    lay = LAYOUTS["images"]
    q = torch.zeros(lay.n, 4)
    spec = AShape(sink=16, local=32).build(HeadContext(q, q, lay, 16, 1.0))
    nb = spec.blocks.shape[-1]
    for i in range(nb):
        for j in range(nb):
            expect = j <= i and (j == 0 or i - j <= 2)
            assert bool(spec.blocks[0, i, j]) == expect, (i, j)
    assert spec.rows.nonzero().squeeze(1).tolist() == list(range(lay.last_visual_end, lay.n))


def test_slash_blocks_known_answer():
    diag = torch.zeros(64, dtype=torch.bool)
    diag[20] = True  # one diagonal i - j = 20, blocks of 16: touches block diagonals 1 and 2
    blocks = slash_blocks(diag, 64, 16)
    diffs = {int(i - j) for i, j in blocks.nonzero().tolist()}
    assert diffs == {1, 2}


def test_vertical_slash_finds_planted_columns_and_diagonal():
    torch.manual_seed(0)
    n, d = 256, 32
    lay = Layout(n, [])
    k = torch.randn(n, d) * 0.1
    q = torch.randn(n, d) * 0.1
    e = torch.randn(d)
    k[[77, 150]] += e * 3
    q += e * 3  # every query attends keys 77 and 150
    spec = VerticalSlash(vertical=32, slash=0, last_q=16).build(HeadContext(q, k, lay, 16, d ** -0.5))
    cols = spec.cols[0]
    assert cols[77] and cols[150] and cols[:30].all()  # planted + MInference's forced 30 sink columns
    assert int(cols.sum()) == 32


def test_grid_phase_estimate_finds_planted_phase():
    torch.manual_seed(0)
    lay = video_like(8, 6, 4, 5, 8)  # row stride 5
    n, d = lay.n, 32
    q, k = torch.randn(n, d) * 0.1, torch.randn(n, d) * 0.1
    e = torch.randn(d)
    off = lay.offsets()
    k[(off >= 0) & (off % 5 == 3)] += e * 2
    q += e * 2
    assert grid_phase(HeadContext(q, k, lay, 16, d ** -0.5), "row", 16) == 3


def test_q_boundary_groups_rows_by_modality():
    lay = LAYOUTS["images"]
    torch.manual_seed(0)
    q = torch.randn(lay.n, 8)
    spec = QBoundary(vertical=5, slash=5, last_q=4).build(HeadContext(q, q, lay, 16, 1.0))
    assert spec.n_groups == 2 and torch.equal(spec.groups, lay.modality())


def test_budgets_and_parsing():
    assert tokens(0.25, 100) == 25 and tokens(40, 100) == 40 and tokens(500, 100) == 100
    p = parse_pattern({"pattern": "grid", "stride": "frame", "phase": 3})
    assert isinstance(p, Grid) and p.phase == 3
    with pytest.raises(PolicyError, match="stride"):
        parse_pattern({"pattern": "grid", "stride": "diagonal"})
    with pytest.raises(PolicyError, match="'nope'"):
        parse_pattern({"pattern": "nope"})
