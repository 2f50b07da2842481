"""FlexAttention on the same masks: a BlockMask built from each head's block structure (full blocks skip
the element test) and a ``mask_mod`` that evaluates the MaskSpec's element rule from lookup tables.

Used by ``vlmfast bench sparse`` as the comparison point. Compiled ``flex_attention`` runs on CPU through
inductor's C++ template (inference only, no log-sum-exp on CPU, so the two-pass grid of MMInference cannot
be expressed with it there: the whole mask is one pass in the original order, where grid lines touch most
blocks). The first call per shape compiles (tens of seconds on 2 cores).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from ..mask import MaskSpec


@lru_cache(maxsize=None)
def _compiled():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def block_mask(specs: list[MaskSpec], device=None):
    """A BlockMask for heads ``specs`` (all with the same n and block)."""
    from torch.nn.attention.flex_attention import BlockMask

    n, b = specs[0].n, specs[0].block
    if any(s.n != n or s.block != b for s in specs):
        raise ValueError("flex: every head's MaskSpec must have the same length and block size")
    h = len(specs)
    nb = specs[0].blocks.shape[-1]
    g = max(s.n_groups for s in specs)
    dev = device or specs[0].device
    rows = torch.stack([s.rows for s in specs]).to(dev)
    grp = torch.stack([s.row_groups() for s in specs]).to(dev)
    cols = torch.zeros(h, g, n, dtype=torch.bool, device=dev)
    blk = torch.zeros(h, g, nb, nb, dtype=torch.bool, device=dev)
    for i, s in enumerate(specs):
        cols[i, :s.n_groups] = s.cols
        blk[i, :s.n_groups] = s.blocks
    tril = torch.ones(nb, nb, dtype=torch.bool, device=dev).tril()
    pad = nb * b - n
    colblk = torch.nn.functional.pad(cols, (0, pad)).view(h, g, nb, b).any(-1)  # (h, g, nb)
    rowblk = torch.nn.functional.pad(rows, (0, pad)).view(h, nb, b).any(-1)  # (h, nb)
    partial = (blk.any(1) | colblk.any(1)[:, None, :] | rowblk[:, :, None]) & tril
    full = torch.stack([blk[i, :s.n_groups].all(0) for i, s in enumerate(specs)]) & tril.tril(-1)
    partial &= ~full

    def indices(m):
        counts = m.sum(-1).to(torch.int32)
        idx = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return counts[None], idx[None]

    def mask_mod(bi, hi, qi, ki):
        gq = grp[hi, qi]
        keep = rows[hi, qi] | cols[hi, gq, ki] | blk[hi, gq, qi // b, ki // b]
        return keep & (ki <= qi)

    kv_num, kv_idx = indices(partial)
    full_num, full_idx = indices(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=b, mask_mod=mask_mod,
                                    seq_lengths=(n, n), compute_q_blocks=False)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, specs: list[MaskSpec], scale: float,
                     mask=None) -> torch.Tensor:
    """q: (H, n, D); k, v: (Hkv, n, D) -> (n, H, D). ``mask``: a BlockMask from :func:`block_mask` to reuse."""
    bm = mask if mask is not None else block_mask(specs, q.device)
    gqa = q.shape[0] != k.shape[0]
    out = _compiled()(q[None], k[None], v[None], block_mask=bm, scale=scale, enable_gqa=gqa)
    return out[0].transpose(0, 1)
