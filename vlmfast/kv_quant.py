"""Group-wise asymmetric integer quantization of KV tensors, with bit packing, and cache layers that hold it.

Each group of ``group`` consecutive values along the head dimension of one token gets its own fp16 scale
and minimum; codes are packed 8 // bits per byte. The memory is real: ``nbytes()`` counts the packed codes
and the fp16 scales, and the full-precision keys/values exist only transiently while a layer attends.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer


class Quantized:
    """A tensor (..., D) stored as packed ``bits``-bit codes with per-group fp16 scale and minimum."""

    def __init__(self, x: torch.Tensor, bits: int, group: int):
        if bits not in (1, 2, 4, 8):
            raise ValueError(f"bits must be 1, 2, 4 or 8, got {bits}")
        self.shape, self.dtype, self.bits = x.shape, x.dtype, bits
        d = x.shape[-1]
        self.group = group if d % group == 0 else d
        g = x.float().reshape(-1, self.group)
        lo, hi = g.min(1, keepdim=True).values, g.max(1, keepdim=True).values
        levels = (1 << bits) - 1
        scale = ((hi - lo) / levels).clamp(min=1e-8)
        codes = ((g - lo) / scale).round().clamp(0, levels).to(torch.uint8).reshape(-1)
        per = 8 // bits
        pad = (-codes.numel()) % per
        codes = torch.cat([codes, codes.new_zeros(pad)]).view(-1, per)
        shifts = torch.arange(per, dtype=torch.uint8, device=x.device) * bits
        self.packed = (codes << shifts).sum(1, dtype=torch.uint8) if per > 1 else codes[:, 0].clone()
        self.scale, self.lo = scale.half(), lo.half()

    def dequantize(self) -> torch.Tensor:
        per = 8 // self.bits
        shifts = torch.arange(per, dtype=torch.uint8, device=self.packed.device) * self.bits
        mask = (1 << self.bits) - 1
        codes = ((self.packed[:, None] >> shifts) & mask).reshape(-1)[: self.scale.numel() * self.group]
        g = codes.view(-1, self.group).float() * self.scale.float() + self.lo.float()
        return g.reshape(self.shape).to(self.dtype)

    def nbytes(self) -> int:
        return self.packed.numel() + 2 * (self.scale.numel() + self.lo.numel())


class MixedPrecisionLayer(DynamicLayer):
    """A prefilled cache layer whose tokens are quantized at ``bits_hi`` (important) or ``bits_lo`` bits;
    tokens appended during decoding stay in full precision."""

    keys: torch.Tensor  # the decode tail (DynamicLayer's may be None before its first update; these never are)
    values: torch.Tensor

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, important: torch.Tensor, bits_hi: int,
                 bits_lo: int, group: int):
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.prefix_len = keys.shape[2]
        self.rows = []
        for b in range(keys.shape[0]):
            hi = important[b].nonzero().squeeze(1)
            lo = (~important[b]).nonzero().squeeze(1)
            self.rows.append([(idx, Quantized(keys[b, :, idx], bits, group), Quantized(values[b, :, idx], bits, group))
                              for idx, bits in ((hi, bits_hi), (lo, bits_lo)) if idx.numel()])
        self.shape = keys.shape
        self.keys = keys.new_zeros(keys.shape[0], keys.shape[1], 0, keys.shape[3])  # decode tail
        self.values = values.new_zeros(self.keys.shape)

    def _prefix(self) -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        v = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        for b, parts in enumerate(self.rows):
            for idx, qk, qv in parts:
                k[b, :, idx] = qk.dequantize()
                v[b, :, idx] = qv.dequantize()
        return k, v

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        k, v = self._prefix()
        return torch.cat([k, self.keys], dim=-2), torch.cat([v, self.values], dim=-2)

    def get_seq_length(self) -> int:
        return self.prefix_len + self.keys.shape[-2]

    def nbytes(self) -> int:
        q = sum(qk.nbytes() + qv.nbytes() for parts in self.rows for _, qk, qv in parts)
        return q + self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()


class EvictedLayer(DynamicLayer):
    """A prefilled cache layer that keeps only some tokens (``keys`` shorter than the sequence) but reports
    the full sequence length, so transformers keeps sizing masks for the whole sequence; the decode hook
    maps mask columns onto the kept tokens."""

    keys: torch.Tensor  # the kept tokens, set at construction (DynamicLayer's may be None)
    values: torch.Tensor

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, prefix_len: int):
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.keys, self.values = keys, values
        self.kept_len, self.prefix_len = keys.shape[2], prefix_len

    def get_seq_length(self) -> int:
        return self.prefix_len + self.keys.shape[-2] - self.kept_len
