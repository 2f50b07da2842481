"""The portable sparse attention kernel: block ranges as strided views, grid lines as gathered (permuted)
tiles, dense rows apart, everything merged by log-sum-exp. Fast on CPU; runs on any device.

For one head (or several heads sharing one :class:`MaskSpec`) and one row group:

1. **Diagonal tiles**: every query block with its own key block, causal, one batched call.
2. **Block runs** (original order): each query block's other kept key blocks are cut into maximal runs of
   consecutive blocks. Runs at the same absolute keys (the sink) run as one call over a stride-0 view (and
   consecutive query blocks as one long query); runs at the same offset from their query block (the local
   band, slash covers) over consecutive query blocks run as one call over an overlapping strided view. Each
   run joins the larger of its two groups. No key or value is copied.
3. **Columns** (permuted order): the head's kept columns are gathered once into a contiguous tile (grid
   lines become dense); each query block attends the columns before it that no block of its own covers —
   the range every block of a chunk needs without a mask, the rest with a per-block key mask — so no
   element is counted twice.
4. The results of 1-3 are merged row by row by log-sum-exp (a running max / sum / weighted output per row,
   normalised once), which gives exactly the softmax over the union of their key sets.
5. **Dense rows** (horizontal lines, the question after the visual span) attend all their causal keys (the
   keys before a window of rows unmasked, the few after with a causal mask, merged by log-sum-exp); their
   result replaces whatever 1-4 computed for them.

Every piece is one call of :func:`~.common.attend` (PyTorch's CPU flash-attention kernel on CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..mask import MaskSpec
from .common import attend, merge_lse

#: query blocks per call in the column step
COLUMN_CHUNK = 32
#: dense rows at most this many positions apart are computed together
DENSE_ROW_WINDOW = 4096
#: diagonal tiles in their own causal call (True) or as the causal-masked end of the block run before them
SPLIT_DIAGONAL = True


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, specs: list[MaskSpec], scale: float
                     ) -> torch.Tensor:
    """q: (H, n, D); k, v: (Hkv, n, D) with H a multiple of Hkv (GQA); specs: one MaskSpec per query head
    (heads that share a spec object are computed together). Returns (n, H, D) in q's dtype."""
    h, n, d = q.shape
    groups = h // k.shape[0]
    if len(specs) != h:
        raise ValueError(f"need one MaskSpec per query head: got {len(specs)} for {h} heads")
    out = q.new_empty(h, n, d)
    by_spec: dict[int, list[int]] = {}
    for i, s in enumerate(specs):
        if s.n != n:
            raise ValueError(f"MaskSpec of head {i} is for {s.n} tokens, the input has {n}")
        by_spec.setdefault(id(s), []).append(i)
    for heads in by_spec.values():
        spec = specs[heads[0]]
        hq = torch.tensor(heads, device=q.device)
        hk = hq // groups
        out[hq] = _one_spec(q[hq], k[hk], v[hk], spec, scale).to(q.dtype)
    return out.transpose(0, 1)


def _pad(x: torch.Tensor, n_pad: int) -> torch.Tensor:
    return x if x.shape[1] == n_pad else F.pad(x, (0, 0, 0, n_pad - x.shape[1]))


def _one_spec(q, k, v, spec: MaskSpec, scale: float) -> torch.Tensor:
    """q, k, v: (Hg, n, D) -> (Hg, n, D) float32."""
    hg, n, d = q.shape
    b = spec.block
    nb = (n + b - 1) // b
    n_pad = nb * b
    if spec.is_full:
        o, _ = attend(q[None], k[None], v[None], scale, causal=True)
        return o[0].float()
    q, k, v = _pad(q, n_pad).contiguous(), _pad(k, n_pad).contiguous(), _pad(v, n_pad).contiguous()
    groups = spec.row_groups()
    dense_rows = spec.rows
    final = None
    for g in range(spec.n_groups):
        member = (groups == g) & ~dense_rows
        if not bool(member.any()):
            continue
        has = torch.zeros(nb, dtype=torch.bool, device=q.device)
        has[member.nonzero().squeeze(1) // b] = True
        acc, _ = _group(q, k, v, spec.blocks[g], spec.cols[g], has, b, scale)
        if spec.n_groups == 1:
            final = acc
        else:
            if final is None:
                final = torch.zeros(hg, n_pad, d, dtype=torch.float32, device=q.device)
            idx = member.nonzero().squeeze(1)
            final[:, idx] = acc[:, idx]
    if final is None:
        final = torch.zeros(hg, n_pad, d, dtype=torch.float32, device=q.device)
    if bool(dense_rows.any()):
        _dense_rows(q, k, v, dense_rows.nonzero().squeeze(1), scale, final)
    return final[:, :n]


def _blocks_view(x: torch.Tensor, b: int) -> torch.Tensor:
    """(Hg, nB*b, D) -> (nB, Hg, b, D) view."""
    hg, n_pad, d = x.shape
    return x.view(hg, n_pad // b, b, d).transpose(0, 1)


def _select(view: torch.Tensor, qbs: torch.Tensor) -> torch.Tensor:
    """view[qbs] without a copy when qbs is a consecutive range."""
    first, last = int(qbs[0]), int(qbs[-1])
    if last - first + 1 == qbs.numel():
        return view[first:last + 1]
    return view.index_select(0, qbs)


def _merge_into(state, qbs: torch.Tensor, o: torch.Tensor, lse: torch.Tensor):
    """Add call results o (A, Hg, b, D), lse (A, Hg, b) to the running softmax state of query blocks ``qbs``.
    The state keeps, per row, the running maximum log-sum-exp ``m``, the sum ``l`` of exp(lse - m) and the
    output accumulated with those weights (normalised once at the end): a log-sum-exp merge that touches
    each output element twice per call."""
    acc_v, m_v, l_v = state
    first, last = int(qbs[0]), int(qbs[-1])
    consecutive = last - first + 1 == qbs.numel()
    sl = slice(first, last + 1) if consecutive else qbs
    acc, m, l = (acc_v[sl], m_v[sl], l_v[sl]) if consecutive else (acc_v.index_select(0, qbs),
                                                                  m_v.index_select(0, qbs), l_v.index_select(0, qbs))
    m_new = torch.maximum(m, lse)
    alpha = torch.exp(m - m_new)
    beta = torch.exp(lse - m_new)
    acc.mul_(alpha[..., None]).addcmul_(o.float(), beta[..., None])
    l.mul_(alpha).add_(beta)
    m.copy_(m_new)
    if not consecutive:
        acc_v.index_copy_(0, qbs, acc)
        m_v.index_copy_(0, qbs, m)
        l_v.index_copy_(0, qbs, l)


def block_runs(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Maximal runs of True along each row of a (nB, nB) bool matrix: (row, start, length), row-major."""
    prev = F.pad(u[:, :-1], (1, 0))
    nxt = F.pad(u[:, 1:], (0, 1))
    rows, start = (u & ~prev).nonzero(as_tuple=True)
    _, end = (u & ~nxt).nonzero(as_tuple=True)
    return rows, start, end - start + 1


def _group(q, k, v, blocks: torch.Tensor, cols: torch.Tensor, has: torch.Tensor, b: int, scale: float):
    """One row group: diagonal tiles + block runs + columns, merged by LSE. Returns (Hg, n_pad, D) float32."""
    hg, n_pad, d = q.shape
    nb = n_pad // b
    dev = q.device
    qv = _blocks_view(q, b)
    qbs_all = has.nonzero().squeeze(1)
    acc = torch.zeros(hg, n_pad, d, dtype=torch.float32, device=dev)
    m = torch.full((hg, n_pad), float("-inf"), dtype=torch.float32, device=dev)
    den = torch.zeros(hg, n_pad, dtype=torch.float32, device=dev)
    state = (_blocks_view(acc, b), m.view(hg, nb, b).transpose(0, 1), den.view(hg, nb, b).transpose(0, 1))
    u = blocks & has[:, None]
    if SPLIT_DIAGONAL:
        # 1. diagonal tiles: every query block with its own key block, causal, one batched call
        kv_, vv_ = _blocks_view(k, b), _blocks_view(v, b)
        o, l = attend(_select(qv, qbs_all), _select(kv_, qbs_all), _select(vv_, qbs_all), scale, causal=True)
        _merge_into(state, qbs_all, o, l)
        u = u.tril(-1)
    # 2. runs of kept key blocks (without SPLIT_DIAGONAL the diagonal block ends one, causal-masked there)
    if bool(u.any()):
        rows, start, length = block_runs(u)
        _runs(q, k, v, rows, start, length, b, scale, state, qv)
    # 3. columns not covered by blocks, in permuted (gathered) order
    cidx = cols.nonzero().squeeze(1)
    if cidx.numel():
        _columns(q, k, v, blocks, cidx, qbs_all, b, scale, state, qv)
    acc.div_(den.clamp(min=1e-30)[..., None])
    return acc, m + torch.log(den)


def _runs(q, k, v, rows, start, length, b, scale, state, qv):
    hg, n_pad, d = k.shape
    # absolute groups: the same key range for several query blocks (sink): a stride-0 view of the keys
    diag = start + length - 1 == rows
    key_abs = torch.where(diag, -1 - rows, start * (n_pad + 1) + length)  # diagonal runs are never shared
    uniq, inv, counts = torch.unique(key_abs, return_inverse=True, return_counts=True)
    _, inv_rel, counts_rel = torch.unique((rows - start) * (n_pad + 1) + length, return_inverse=True,
                                          return_counts=True)
    # each run joins the larger of its two groups (a sink is shared absolutely, a band or slash relatively)
    absolute = (counts[inv] >= 2) & (counts[inv] > counts_rel[inv_rel])
    for gi in torch.unique(inv[absolute]).tolist():
        sel = ((inv == gi) & absolute).nonzero().squeeze(1)
        qbs = rows[sel]
        a, ln = int(start[sel[0]]), int(length[sel[0]])
        o, l = _shared_keys(q, qv, qbs, k[:, a * b:(a + ln) * b], v[:, a * b:(a + ln) * b], b, scale)
        _merge_into(state, qbs, o, l)
    # relative groups: the same offset from the query block (local band, slash covers): overlapping views
    rest = (~absolute).nonzero().squeeze(1)
    if not rest.numel():
        return
    r_rows, r_off, r_len = rows[rest], rows[rest] - start[rest], length[rest]
    key_rel = r_off * (n_pad + 1) + r_len
    order = torch.argsort(key_rel * (n_pad + 1) + r_rows)
    r_rows, r_off, r_len, key_rel = r_rows[order], r_off[order], r_len[order], key_rel[order]
    # split into segments of equal key and consecutive query blocks
    brk = torch.ones_like(r_rows, dtype=torch.bool)
    brk[1:] = (key_rel[1:] != key_rel[:-1]) | (r_rows[1:] != r_rows[:-1] + 1)
    starts = brk.nonzero().squeeze(1).tolist() + [r_rows.numel()]
    for s, e in zip(starts[:-1], starts[1:]):
        q0, cnt = int(r_rows[s]), e - s
        off, ln = int(r_off[s]), int(r_len[s])
        k0 = (q0 - off) * b
        shape, stride = (cnt, hg, ln * b, d), (b * d, n_pad * d, d, 1)
        ks = k.as_strided(shape, stride, k.storage_offset() + k0 * d)
        vs = v.as_strided(shape, stride, v.storage_offset() + k0 * d)
        mask = None
        if off == ln - 1:  # the run ends at the query block itself: causal inside that last key block
            q_pos = off * b + torch.arange(b, device=k.device)  # the query rows' positions in the key run
            allowed = torch.arange(ln * b, device=k.device)[None, :] <= q_pos[:, None]
            mask = torch.zeros(allowed.shape, dtype=k.dtype, device=k.device).masked_fill_(~allowed, float("-inf"))
            mask = mask[None, None]
        o, l = attend(qv[q0:q0 + cnt], ks, vs, scale, mask=mask)
        _merge_into(state, r_rows[s:e], o, l)


def _shared_keys(q, qv, qbs, ks, vs, b, scale, block_mask=None):
    """Query blocks ``qbs`` against the same keys ks, vs (Hg, L, D); ``block_mask``: (A, L) additive mask per
    query block. Consecutive blocks run as one long query (bigger tiles for the CPU kernel), others batched.
    Returns (A, Hg, b, D), (A, Hg, b)."""
    a = qbs.numel()
    hg, d = q.shape[0], q.shape[2]
    first, last = int(qbs[0]), int(qbs[-1])
    if last - first + 1 == a:
        mask = None if block_mask is None else block_mask.repeat_interleave(b, 0)[None, None]
        o, l = attend(q[:, first * b:(last + 1) * b].unsqueeze(0), ks.unsqueeze(0), vs.unsqueeze(0), scale, mask=mask)
        return o[0].view(hg, a, b, d).transpose(0, 1), l[0].view(hg, a, b).transpose(0, 1)
    mask = None if block_mask is None else block_mask[:, None, None, :]
    return attend(_select(qv, qbs), ks.unsqueeze(0).expand(a, -1, -1, -1), vs.unsqueeze(0).expand(a, -1, -1, -1),
                  scale, mask=mask)


def _columns(q, k, v, blocks, cidx, qbs_all, b, scale, state, qv):
    kc, vc = k[:, cidx], v[:, cidx]  # (Hg, nc, D): the permutation that makes lines contiguous
    col_block = cidx // b
    for s in range(0, qbs_all.numel(), COLUMN_CHUNK):
        qbs = qbs_all[s:s + COLUMN_CHUNK]
        need = (cidx[None, :] < (qbs[:, None] * b)) & ~blocks[qbs][:, col_block]  # (A, nc)
        any_need = need.any(1)
        if not bool(any_need.any()):
            continue
        qbs, need = qbs[any_need], need[any_need]
        every = need.all(0)
        # the columns every block of the chunk needs, when they are one contiguous range: no mask at all
        lo = hi = 0
        if bool(every.any()):
            idx = every.nonzero().squeeze(1)
            if int(idx[-1]) - int(idx[0]) + 1 == idx.numel():
                lo, hi = int(idx[0]), int(idx[-1]) + 1
                o, l = _shared_keys(q, qv, qbs, kc[:, lo:hi], vc[:, lo:hi], b, scale)
                _merge_into(state, qbs, o, l)
                need = need.clone()
                need[:, lo:hi] = False
        some = need.any(0)
        if not bool(some.any()):
            continue
        cols = some.nonzero().squeeze(1)
        first, last = int(cols[0]), int(cols[-1]) + 1
        part = need[:, first:last]
        rows_any = part.any(1)
        qbs, part = qbs[rows_any], part[rows_any]
        mask = torch.zeros(part.shape, dtype=q.dtype, device=q.device).masked_fill_(~part, float("-inf"))
        o, l = _shared_keys(q, qv, qbs, kc[:, first:last], vc[:, first:last], b, scale, mask)
        _merge_into(state, qbs, o, l)


def _dense_rows(q, k, v, ridx, scale, final):
    """Dense rows attend all their causal keys. Rows are taken in windows (at most ``DENSE_ROW_WINDOW``
    positions apart): the keys every row of a window sees (up to its first row) in one unmasked call, the
    few keys after it with a causal mask, merged by log-sum-exp."""
    start = 0
    while start < ridx.numel():
        first = int(ridx[start])
        end = start
        while end < ridx.numel() and int(ridx[end]) - first < DENSE_ROW_WINDOW and end - start < 512:
            end += 1
        r = ridx[start:end]
        start = end
        qr = q[:, r].unsqueeze(0)  # (1, Hg, R, D)
        o, lse = attend(qr, k[:, :first + 1].unsqueeze(0), v[:, :first + 1].unsqueeze(0), scale)
        last = int(r[-1])
        if last > first:
            j = torch.arange(first + 1, last + 1, device=q.device)
            allowed = j[None, :] <= r[:, None]
            mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
            o2, l2 = attend(qr, k[:, first + 1:last + 1].unsqueeze(0), v[:, first + 1:last + 1].unsqueeze(0), scale,
                            mask=mask[None, None])
            l2 = l2.masked_fill(~allowed.any(1)[None, None], float("-inf"))  # rows with no key here
            o, lse = merge_lse(o, lse, o2, l2)
        final[:, r] = o[0].float()
