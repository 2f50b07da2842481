"""Triton kernels for GPUs: a block-sparse pass in the original token order and a gathered pass for the
permuted parts (grid/vertical columns, dense rows), merged by log-sum-exp.

* ``_block_sparse_fwd``: one program per (head, query block); loops over that block's kept key blocks
  (a CSR list), loads each as a contiguous tile, masks causally, online softmax in fp32. Returns the output
  and the log-sum-exp of each row.
* ``_gather_fwd``: one program per (head, query tile) whose query rows and key columns are index lists
  (the permutation: grid lines / vertical columns gathered into dense tiles; dense rows gathered into query
  tiles); causality is checked on the original positions. Also returns outputs and log-sum-exps.
* :func:`sparse_attention` builds the index lists from each head's :class:`MaskSpec` (columns already
  covered by a kept block are left out of the gathered pass, so the two passes are disjoint), runs both
  kernels and merges them with :func:`~vlmfast.sparse.kernels.common.merge_lse`; dense rows replace the
  result of their rows.

Plain pointer arithmetic only (no block pointers, removed in triton 3.9), so the kernels also run under
``TRITON_INTERPRET=1`` on CPU, which is how the test suite checks them against the PyTorch path (fp32 and
fp16; bf16 ``tl.dot`` is wrong in the interpreter, triton#11584). fp32 uses IEEE dots (no TF32).
"""

from __future__ import annotations

import torch

from ..mask import MaskSpec
from .common import merge_lse

_IMPORT_ERROR: Exception | None
try:  # triton is optional: an extra (``vlmfast[gpu]``), also present with CUDA builds of torch
    import triton
    import triton.language as tl
except Exception as e:  # pragma: no cover - depends on the install
    triton = None
    _IMPORT_ERROR = e
else:
    _IMPORT_ERROR = None


def _require():
    if triton is None:
        raise ImportError(f"the triton backend needs the `triton` package (pip install 'vlmfast[gpu]'): "
                          f"{_IMPORT_ERROR}")


if triton is not None:

    @triton.jit
    def _block_sparse_fwd(Q, K, V, O, LSE, blk_ptr, blk_idx, pair_head, pair_qb, n, d, kv_group, scale,
                          s_qh, s_qn, s_kh, s_kn, s_vh, s_vn,
                          BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
        p = tl.program_id(0)
        h = tl.load(pair_head + p)
        qb = tl.load(pair_qb + p)
        hk = h // kv_group
        offs_m = qb * BLOCK + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d[None, :] < d
        q = tl.load(Q + h * s_qh + offs_m[:, None] * s_qn + offs_d[None, :],
                    mask=(offs_m[:, None] < n) & dmask, other=0.0)
        m_i = tl.full([BLOCK], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK], tl.float32)
        acc = tl.zeros([BLOCK, BLOCK_D], tl.float32)
        start = tl.load(blk_ptr + p)
        end = tl.load(blk_ptr + p + 1)
        for t in range(start, end):
            kb = tl.load(blk_idx + t)
            offs_n = kb * BLOCK + tl.arange(0, BLOCK)
            kmask = (offs_n[:, None] < n) & dmask
            k = tl.load(K + hk * s_kh + offs_n[:, None] * s_kn + offs_d[None, :], mask=kmask, other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                s = tl.dot(q, tl.trans(k)) * scale
            ok = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] < n)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            pr = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(pr, 1)
            v = tl.load(V + hk * s_vh + offs_n[:, None] * s_vn + offs_d[None, :], mask=kmask, other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v)
            m_i = m_new
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        out = acc / l_safe[:, None]
        lse = tl.where(l_i > 0, m_i + tl.log(l_safe), float("-inf"))
        rows = tl.arange(0, BLOCK)
        tl.store(O + p * BLOCK * BLOCK_D + rows[:, None] * BLOCK_D + offs_d[None, :], out)
        tl.store(LSE + p * BLOCK + rows, lse)

    @triton.jit
    def _gather_fwd(Q, K, V, O, LSE, q_idx, key_ptr, key_idx, pair_head, d, kv_group, scale,
                    s_qh, s_qn, s_kh, s_kn, s_vh, s_vn,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
        p = tl.program_id(0)
        h = tl.load(pair_head + p)
        hk = h // kv_group
        rows = tl.arange(0, BLOCK_M)
        qi = tl.load(q_idx + p * BLOCK_M + rows)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d[None, :] < d
        q = tl.load(Q + h * s_qh + tl.maximum(qi, 0)[:, None] * s_qn + offs_d[None, :],
                    mask=(qi[:, None] >= 0) & dmask, other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        start = tl.load(key_ptr + p)
        end = tl.load(key_ptr + p + 1)
        for t in range(start, end, BLOCK_N):
            kj = tl.load(key_idx + t + tl.arange(0, BLOCK_N))
            kmask = (kj[:, None] >= 0) & dmask
            k = tl.load(K + hk * s_kh + tl.maximum(kj, 0)[:, None] * s_kn + offs_d[None, :], mask=kmask, other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                s = tl.dot(q, tl.trans(k)) * scale
            ok = (kj[None, :] >= 0) & (kj[None, :] <= qi[:, None]) & (qi[:, None] >= 0)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            pr = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(pr, 1)
            v = tl.load(V + hk * s_vh + tl.maximum(kj, 0)[:, None] * s_vn + offs_d[None, :], mask=kmask, other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v)
            m_i = m_new
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        out = acc / l_safe[:, None]
        lse = tl.where(l_i > 0, m_i + tl.log(l_safe), float("-inf"))
        tl.store(O + p * BLOCK_M * BLOCK_D + rows[:, None] * BLOCK_D + offs_d[None, :], out)
        tl.store(LSE + p * BLOCK_M + rows, lse)


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, 1 << (int(x) - 1).bit_length())


def block_sparse_pass(q, k, v, heads: torch.Tensor, qbs: torch.Tensor, lists: list[torch.Tensor], block: int,
                      scale: float):
    """Pass 1: pair i = (query head heads[i], query block qbs[i]) attends key blocks lists[i] (ascending).
    q: (H, n, D); k, v: (Hkv, n, D). Returns out (P, block, D) float32 and lse (P, block)."""
    _require()
    h, n, d = q.shape
    bd = _pow2(d)
    dev = q.device
    counts = torch.tensor([len(x) for x in lists], dtype=torch.int32)
    ptr = torch.zeros(len(lists) + 1, dtype=torch.int32)
    ptr[1:] = counts.cumsum(0)
    idx = torch.cat(lists).to(torch.int32) if lists else torch.zeros(0, dtype=torch.int32)
    p = len(lists)
    out = torch.empty(p, block, bd, dtype=torch.float32, device=dev)
    lse = torch.empty(p, block, dtype=torch.float32, device=dev)
    _block_sparse_fwd[(p,)](q, k, v, out, lse, ptr.to(dev), idx.to(dev), heads.to(torch.int32).to(dev),
                            qbs.to(torch.int32).to(dev), n, d, h // k.shape[0], scale,
                            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                            BLOCK=block, BLOCK_D=bd, IEEE=q.dtype == torch.float32)
    return out[..., :d], lse


def gather_pass(q, k, v, heads: torch.Tensor, q_rows: torch.Tensor, key_lists: list[torch.Tensor], scale: float,
                block_m: int, block_n: int):
    """Pass 2: pair i = (query head heads[i], query rows q_rows[i] (block_m indices, -1 = none)) attends
    the keys key_lists[i] (any order, causality checked on positions). Returns (P, block_m, D), (P, block_m)."""
    _require()
    h, n, d = q.shape
    bd = _pow2(d)
    dev = q.device
    padded = [torch.cat([x, x.new_full(((-x.numel()) % block_n,), -1)]) for x in key_lists]
    ptr = torch.zeros(len(padded) + 1, dtype=torch.int32)
    ptr[1:] = torch.tensor([x.numel() for x in padded], dtype=torch.int32).cumsum(0)
    idx = torch.cat(padded).to(torch.int32) if padded else torch.zeros(0, dtype=torch.int32)
    p = len(padded)
    out = torch.empty(p, block_m, bd, dtype=torch.float32, device=dev)
    lse = torch.empty(p, block_m, dtype=torch.float32, device=dev)
    _gather_fwd[(p,)](q, k, v, out, lse, q_rows.to(torch.int32).contiguous().to(dev), ptr.to(dev), idx.to(dev),
                      heads.to(torch.int32).to(dev), d, h // k.shape[0], scale,
                      q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                      BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=bd, IEEE=q.dtype == torch.float32)
    return out[..., :d], lse


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, specs: list[MaskSpec], scale: float,
                     block_n: int = 16) -> torch.Tensor:
    """Same contract as the torch kernel: q (H, n, D); k, v (Hkv, n, D); one MaskSpec per head -> (n, H, D)."""
    _require()
    h, n, d = q.shape
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.zeros(n, h, d, dtype=torch.float32, device=q.device)
    for head in range(h):
        spec = specs[head]
        if spec.n != n:
            raise ValueError(f"MaskSpec of head {head} is for {spec.n} tokens, the input has {n}")
        out[:, head] = _one_head(q, k, v, head, spec, scale, block_n)
    return out.to(q.dtype)


def _one_head(q, k, v, head: int, spec: MaskSpec, scale: float, block_n: int) -> torch.Tensor:
    n, d, b = q.shape[1], q.shape[2], spec.block
    dev = q.device
    nb = (n + b - 1) // b
    groups = spec.row_groups()
    result = torch.zeros(n, d, dtype=torch.float32, device=dev)
    j = torch.arange(n, device=spec.device)
    for g in range(spec.n_groups):
        member = (groups == g) & ~spec.rows
        if not bool(member.any()):
            continue
        qbs = torch.unique(member.nonzero().squeeze(1) // b)
        blocks = spec.blocks[g]
        lists = [blocks[qb, :qb + 1].nonzero().squeeze(1) for qb in qbs.tolist()]
        heads = torch.full((qbs.numel(),), head, dtype=torch.long)
        o1, l1 = block_sparse_pass(q, k, v, heads, qbs, lists, b, scale)
        cols = spec.cols[g]
        need_lists, rows_list = [], []
        for qb in qbs.tolist():
            need = cols & (j < qb * b) & ~blocks[qb][j // b]
            need_lists.append(need.nonzero().squeeze(1))
            rows_list.append(qb * b + torch.arange(b, device=spec.device))
        q_rows = torch.stack(rows_list).masked_fill(torch.stack(rows_list) >= n, -1)
        o2, l2 = gather_pass(q, k, v, heads, q_rows, need_lists, scale, b, block_n)
        o, _ = merge_lse(o1, l1, o2, l2)
        rows_all = (qbs[:, None].to(dev) * b + torch.arange(b, device=dev)[None]).flatten()
        flat = o.reshape(-1, d)
        keep = rows_all < n
        tmp = torch.zeros(nb * b, d, dtype=torch.float32, device=dev)
        tmp[rows_all[keep]] = flat[keep]
        sel = member.nonzero().squeeze(1).to(dev)
        result[sel] = tmp[sel]
    dense = spec.rows.nonzero().squeeze(1)
    if dense.numel():
        tiles = [dense[i:i + b] for i in range(0, dense.numel(), b)]
        q_rows = torch.stack([torch.cat([t, t.new_full((b - t.numel(),), -1)]) for t in tiles])
        key_lists = [torch.arange(int(t.max()) + 1, device=spec.device) for t in tiles]
        heads = torch.full((len(tiles),), head, dtype=torch.long)
        o3, _ = gather_pass(q, k, v, heads, q_rows, key_lists, scale, b, block_n)
        valid = q_rows >= 0
        result[q_rows[valid].to(dev)] = o3[valid.to(dev)]
    return result
