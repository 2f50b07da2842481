"""Sparse attention kernels over :class:`~vlmfast.sparse.mask.MaskSpec` masks.

* ``torch`` (:mod:`.torch_kernel`): portable; block runs as strided views of the keys, grid lines as gathered
  (permuted) column tiles, dense rows apart, merged by log-sum-exp. Uses PyTorch's CPU flash-attention
  kernel for every piece on CPU, plain math elsewhere.
* ``triton`` (:mod:`.triton_kernels`): GPU kernels (index-driven block-sparse pass over the original order,
  gathered pass over the permuted columns and dense rows, merged by log-sum-exp); also runs on CPU under
  ``TRITON_INTERPRET=1`` (that is how CI tests them).
* ``flex`` (:mod:`.flex`): FlexAttention with a BlockMask and a ``mask_mod`` built from the same MaskSpec
  (for comparison in ``vlmfast bench sparse``).

All take q (H, n, D), k and v (Hkv, n, D), one MaskSpec per query head and the softmax scale, and return
(n, H, D): the same numbers as dense attention restricted to each head's mask.
"""

from __future__ import annotations

import torch

from ..mask import MaskSpec
from .common import attend, masked_reference, merge_lse

BACKENDS = ("auto", "torch", "triton", "flex")


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, specs: list[MaskSpec], scale: float,
                     backend: str = "auto") -> torch.Tensor:
    """Dispatch to a kernel; ``auto`` is Triton on CUDA devices when triton is installed, else torch."""
    if backend == "auto":
        backend = "triton" if q.is_cuda and triton_available() else "torch"
    if backend == "torch":
        from .torch_kernel import sparse_attention as fn
    elif backend == "triton":
        from .triton_kernels import sparse_attention as fn
    elif backend == "flex":
        from .flex import sparse_attention as fn
    else:
        raise ValueError(f"unknown sparse attention backend {backend!r}; expected one of {BACKENDS}")
    return fn(q, k, v, specs, scale)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


__all__ = ["sparse_attention", "attend", "merge_lse", "masked_reference", "BACKENDS", "triton_available"]
