"""Sparse = dense on its mask: the PyTorch kernel against dense attention restricted to the same mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlmfast.sparse.kernels import masked_reference, merge_lse, sparse_attention
from vlmfast.sparse.kernels.common import attend_math
from vlmfast.sparse.kernels.torch_kernel import block_runs
from vlmfast.sparse.mask import MaskSpec, n_blocks


def random_spec(n: int, block: int, groups: int = 1, p_block=0.3, p_col=0.05, p_row=0.03, seed=0) -> MaskSpec:
    g = torch.Generator().manual_seed(seed)
    nb = n_blocks(n, block)
    return MaskSpec(n, block, torch.rand(groups, nb, nb, generator=g) < p_block,
                    torch.rand(groups, n, generator=g) < p_col, torch.rand(n, generator=g) < p_row,
                    torch.randint(0, groups, (n,), generator=g) if groups > 1 else None)


def check(q, k, v, specs, out, scale, tol):
    groups = q.shape[0] // k.shape[0]
    for h, spec in enumerate(specs):
        ref, _ = masked_reference(q[h].float(), k[h // groups].float(), v[h // groups].float(), spec.dense(), scale)
        err = (out[:, h].double() - ref).abs().max().item()
        assert err < tol, f"head {h}: max error {err} (pattern {spec.pattern or 'random'})"


@pytest.mark.parametrize("n,block,groups", [(300, 32, 1), (257, 64, 2), (512, 64, 1), (100, 128, 1), (97, 16, 3)])
def test_random_masks_equal_masked_dense(n, block, groups):
    torch.manual_seed(0)
    q, k, v = torch.randn(4, n, 16), torch.randn(2, n, 16), torch.randn(2, n, 16)  # GQA: 2 query heads per kv head
    specs = [random_spec(n, block, groups, seed=s) for s in range(3)]
    specs = [specs[0], specs[0], specs[1], specs[2]]  # heads 0 and 1 share a spec (computed together)
    out = sparse_attention(q, k, v, specs, 0.25, backend="torch")
    check(q, k, v, specs, out, 0.25, 2e-6)


def test_bf16_within_tolerance():
    torch.manual_seed(1)
    n = 200
    q, k, v = (torch.randn(2, n, 32).bfloat16() for _ in range(3))
    specs = [random_spec(n, 32, seed=3)] * 2
    out = sparse_attention(q, k, v, specs, 32 ** -0.5, backend="torch")
    assert out.dtype == torch.bfloat16
    check(q, k, v, specs, out, 32 ** -0.5, 3e-2)


def test_full_density_equals_sdpa():
    torch.manual_seed(2)
    n = 333
    q, k, v = torch.randn(2, n, 16), torch.randn(2, n, 16), torch.randn(2, n, 16)
    full = MaskSpec.full(n, 64)
    assert full.is_full and full.density() == 1.0
    every_block = MaskSpec(n, 64, torch.ones(1, 6, 6, dtype=torch.bool), torch.zeros(1, n, dtype=torch.bool),
                           torch.zeros(n, dtype=torch.bool))  # all blocks kept, not flagged dense
    ref = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True)[0].transpose(0, 1)
    for spec in (full, every_block):
        out = sparse_attention(q, k, v, [spec, spec], 0.25, backend="torch")
        assert (out - ref).abs().max() < 1e-5


def test_every_piece_alone():
    """Blocks only, columns only (+ diagonal), dense rows only: each path against the reference."""
    torch.manual_seed(3)
    n, b = 256, 32
    nb = n_blocks(n, b)
    q, k, v = torch.randn(1, n, 8), torch.randn(1, n, 8), torch.randn(1, n, 8)
    none = torch.zeros(1, nb, nb, dtype=torch.bool)
    cols = torch.zeros(1, n, dtype=torch.bool)
    cols[0, ::7] = True
    rows = torch.zeros(n, dtype=torch.bool)
    rows[50::31] = True
    sink_band = torch.zeros(1, nb, nb, dtype=torch.bool)
    sink_band[0, :, 0] = True
    for i in range(nb):
        sink_band[0, i, max(0, i - 2):i] = True
    for spec in (MaskSpec(n, b, sink_band, torch.zeros_like(cols), torch.zeros_like(rows)),
                 MaskSpec(n, b, none, cols, torch.zeros_like(rows)),
                 MaskSpec(n, b, none, torch.zeros_like(cols), rows)):
        out = sparse_attention(q, k, v, [spec], 0.3, backend="torch")
        check(q, k, v, [spec], out, 0.3, 2e-6)


def test_block_runs():
    u = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0], [0, 1, 1, 1]], dtype=torch.bool)
    rows, start, length = block_runs(u)
    assert list(zip(rows.tolist(), start.tolist(), length.tolist())) == [(0, 0, 2), (0, 3, 1), (2, 1, 3)]


def test_merge_lse_of_a_partition_is_the_union():
    torch.manual_seed(4)
    n, d = 50, 8
    q, k, v = torch.randn(1, 1, 5, d), torch.randn(1, 1, n, d), torch.randn(1, 1, n, d)
    part = torch.rand(n) < 0.4
    neg = torch.zeros(n).masked_fill(~part, float("-inf"))
    o1, l1 = attend_math(q, k, v, 0.5, mask=neg)
    o2, l2 = attend_math(q, k, v, 0.5, mask=torch.zeros(n).masked_fill(part, float("-inf")))
    o, lse = merge_lse(o1, l1, o2, l2)
    ref, ref_l = attend_math(q, k, v, 0.5)
    assert (o - ref).abs().max() < 1e-5 and (lse - ref_l).abs().max() < 1e-5
    # an empty part (lse = -inf) changes nothing
    o3, l3 = merge_lse(ref, ref_l, torch.zeros_like(ref), torch.full_like(ref_l, float("-inf")))
    assert torch.allclose(o3, ref) and torch.allclose(l3, ref_l)


def test_mask_spec_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shapes do not agree"):
        MaskSpec(100, 32, torch.ones(1, 3, 3, dtype=torch.bool), torch.zeros(1, 100, dtype=torch.bool),
                 torch.zeros(100, dtype=torch.bool))


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown sparse attention backend"):
        sparse_attention(torch.randn(1, 4, 8), torch.randn(1, 4, 8), torch.randn(1, 4, 8), [MaskSpec.full(4, 16)], 1.0,
                         backend="cuda-magic")
