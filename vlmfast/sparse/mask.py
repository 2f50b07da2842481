"""The effective mask of one sparse head: what the kernels compute, exactly, in three structural parts.

Every pattern (grid, A-shape, vertical-slash, block-sparse, modality boundaries) compiles to a
:class:`MaskSpec` over one sequence of ``n`` tokens (causal by index):

* ``blocks[g]``: a (nB, nB) boolean matrix over ``block`` x ``block`` tiles in the original token order
  (sink, local band, slash cover, selected blocks). The diagonal tile is always kept.
* ``cols[g]``: key columns every row of group ``g`` attends (vertical lines, VS verticals). The kernels gather
  them into contiguous tiles (the permutation that turns lines into dense tiles).
* ``rows``: dense query rows (horizontal grid lines, the text question after the visual span).

``groups`` assigns each query row to a row group (one per modality for boundary heads; one group otherwise).
Element (i, j) is attended iff ``j <= i and (rows[i] or cols[g(i)][j] or blocks[g(i)][i // B, j // B])``.
"Sparse = dense on its mask" compares the kernels with dense attention restricted to :meth:`MaskSpec.dense`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MaskSpec:
    n: int
    block: int
    blocks: torch.Tensor
    """(G, nB, nB) bool, lower triangular with the diagonal kept"""
    cols: torch.Tensor
    """(G, n) bool"""
    rows: torch.Tensor
    """(n,) bool: dense rows"""
    groups: torch.Tensor | None = None
    """(n,) long row group of each query row in [0, G); None = one group"""
    pattern: str = ""
    """name of the pattern that built it (for reports)"""

    def __post_init__(self):
        nb = n_blocks(self.n, self.block)
        g = self.blocks.shape[0]
        if self.blocks.shape != (g, nb, nb) or self.cols.shape != (g, self.n) or self.rows.shape != (self.n,):
            raise ValueError(f"MaskSpec shapes do not agree: n={self.n}, block={self.block}, blocks "
                             f"{tuple(self.blocks.shape)} (expected ({g}, {nb}, {nb})), cols {tuple(self.cols.shape)}, "
                             f"rows {tuple(self.rows.shape)}")
        eye = torch.eye(nb, dtype=torch.bool, device=self.blocks.device)
        self.blocks = (self.blocks | eye).tril()

    @property
    def n_groups(self) -> int:
        return self.blocks.shape[0]

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    def row_groups(self) -> torch.Tensor:
        if self.groups is None:
            return torch.zeros(self.n, dtype=torch.long, device=self.device)
        return self.groups

    @staticmethod
    def full(n: int, block: int, device=None) -> "MaskSpec":
        """Every causal element (dense attention)."""
        nb = n_blocks(n, block)
        return MaskSpec(n, block, torch.ones(1, nb, nb, dtype=torch.bool, device=device),
                        torch.zeros(1, n, dtype=torch.bool, device=device),
                        torch.zeros(n, dtype=torch.bool, device=device), pattern="dense")

    @property
    def is_full(self) -> bool:
        return bool(self.rows.all()) or bool(self.blocks.tril().eq(torch.ones_like(self.blocks).tril()).all())

    def dense(self, rows: slice | None = None) -> torch.Tensor:
        """The (n, n) boolean mask (or rows ``rows`` of it). For tests and small n."""
        i = torch.arange(self.n, device=self.device)[rows if rows is not None else slice(None)]
        j = torch.arange(self.n, device=self.device)
        g = self.row_groups()[i]
        b = self.block
        m = self.blocks[g[:, None], (i // b)[:, None], (j // b)[None, :]]
        m = m | self.cols[g] | self.rows[i][:, None]
        return m & (j[None, :] <= i[:, None])

    def kept_per_row(self) -> torch.Tensor:
        """(n,) number of keys each row attends, without materialising the mask."""
        out = torch.empty(self.n, dtype=torch.long, device=self.device)
        chunk = max(1, (1 << 24) // max(1, self.n))
        for s in range(0, self.n, chunk):
            out[s:s + chunk] = self.dense(slice(s, s + chunk)).sum(1)
        return out

    def density(self) -> float:
        """Share of the causal elements that are attended (1.0 = dense)."""
        causal = self.n * (self.n + 1) / 2
        return float(self.kept_per_row().sum()) / causal


def n_blocks(n: int, block: int) -> int:
    return (n + block - 1) // block


def causal_blocks(n: int, block: int, device=None) -> torch.Tensor:
    nb = n_blocks(n, block)
    return torch.ones(nb, nb, dtype=torch.bool, device=device).tril()


def attention_recall(q: torch.Tensor, k: torch.Tensor, spec: MaskSpec, scale: float, chunk: int = 1024,
                     rows: torch.Tensor | None = None) -> float:
    """Mean over query rows of the softmax mass the mask keeps (1.0 = nothing lost). q, k: (n, d) one head.
    ``rows``: optional bool (n,) restricting which rows are averaged."""
    n = q.shape[0]
    total, count = 0.0, 0
    kt = k.float().t()
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        logits = (q[s:e].float() @ kt) * scale
        i = torch.arange(s, e, device=q.device)
        causal = torch.arange(n, device=q.device)[None, :] <= i[:, None]
        p = logits.masked_fill(~causal, float("-inf")).softmax(-1)
        kept = (p * spec.dense(slice(s, e))).sum(-1)
        if rows is not None:
            kept = kept[rows[s:e]]
        total += float(kept.sum())
        count += kept.numel()
    return total / max(1, count)
