"""Building blocks shared by the kernels: one dense attention call that also returns the log-sum-exp, and
the merge of partial results by log-sum-exp.

``attend`` uses PyTorch's CPU flash-attention kernel (``aten._scaled_dot_product_flash_attention_for_cpu``,
the kernel behind ``scaled_dot_product_attention`` on CPU), which returns each row's log-sum-exp and accepts
strided views, so the sparse kernel can feed it key ranges without copying them. Elsewhere (or if that
operator is missing) a plain math implementation gives the same two results.
"""

from __future__ import annotations

import torch

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def has_cpu_flash() -> bool:
    return _FLASH_CPU is not None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None = None,
           causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q (A, H, Lq, D) over k, v (A, H, Lk, D), returning the output (A, H, Lq, D) in
    q's dtype and the per-row log-sum-exp (A, H, Lq) in float32. ``mask``: additive float mask broadcastable
    to (A, H, Lq, Lk), in q's dtype. ``causal`` (square calls only): row i sees keys <= i.
    Rows whose keys are all masked get lse 0 from the CPU kernel: callers that can produce such rows must set
    their lse to -inf themselves."""
    if _FLASH_CPU is not None and q.device.type == "cpu" and q.dtype in _FLASH_DTYPES:
        out, lse = _FLASH_CPU(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
        return out, lse.float()
    return attend_math(q, k, v, scale, mask, causal)


def attend_math(q, k, v, scale, mask=None, causal=False):
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if causal:
        lq, lk = s.shape[-2:]
        s = s.masked_fill(torch.ones(lq, lk, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    if mask is not None:
        s = s + mask.float()
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])
    return torch.matmul(p, v.float()).to(q.dtype), lse


def merge_lse(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two attention results over disjoint key sets into the result over their union.

    out_*: (..., D) each normalised over its own keys; lse_*: (...) their log-sum-exps (-inf = no keys).
    Returns (out, lse) in float32: ``out = (out_a e^{lse_a} + out_b e^{lse_b}) / (e^{lse_a} + e^{lse_b})``.
    """
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    wa, wb = torch.exp(lse_a - m), torch.exp(lse_b - m)
    total = wa + wb
    safe = torch.where(total > 0, total, torch.ones_like(total))
    out = (out_a.float() * (wa / safe)[..., None] + out_b.float() * (wb / safe)[..., None])
    lse = torch.where(total > 0, m + torch.log(safe), torch.full_like(m, float("-inf")))
    return out, lse


def masked_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention restricted to a boolean mask, in float64: q (n, D), k, v (n, D), mask (n, n).
    The reference every sparse kernel is tested against."""
    s = (q.double() @ k.double().t()) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[:, None])
    return p @ v.double(), lse
