"""ZipVL (arXiv 2410.08584): a per-layer dynamic share of important tokens, attention restricted to them
during prefill, and a mixed-precision (v1) or evicted (v2) KV cache.

In every layer from ``first_layer`` on, during prefill: probe queries (the most recent ``probe`` share of
the sequence plus as many evenly spaced earlier ones) attend to all keys; their head-averaged attention,
summed per key, gives the smallest number p of keys holding ``tau`` of the attention mass; the p keys with
the largest *normalised* score (column sum / number of probes that can see the key, which removes the bias
towards early tokens) are the important set T. Attention is computed among T only (queries outside T get no
attention update: a residual pass-through). The recent probe window always belongs to T, so the tokens the
answer is generated from are never starved (our choice; the paper does not say what happens to them).

After prefill the KV cache keeps T at ``bits_hi`` bits and the rest at ``bits_lo`` bits (``kv="quantize"``),
or drops the rest (``kv="evict"``), per layer. docs/methods/zipvl.md.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from pydantic import Field

from .._compat import cache_from_kwargs
from ..adapters.base import ModelInfo
from ..errors import PolicyError
from ..hooks import layer_pre_hooks
from ..kv_quant import EvictedLayer, MixedPrecisionLayer
from ..method import Run
from ..registry import register
from .base import AttentionMethod, method_dataclass


@register("zipvl")
@method_dataclass
class ZipVL(AttentionMethod):
    tau: Annotated[float, Field(gt=0, le=1)] = 0.975
    """share of the probes' attention mass the important tokens must hold"""
    probe: Annotated[float, Field(gt=0, le=0.5)] = 0.05
    """share of the sequence used as recent probe queries (the same number of earlier ones is added)"""
    first_layer: Annotated[int, Field(ge=0)] = 0
    kv: Literal["quantize", "evict", "none"] = "quantize"
    bits_hi: Literal[2, 4, 8] = 4
    bits_lo: Literal[1, 2, 4, 8] = 2
    group: Annotated[int, Field(ge=1)] = 32

    def check(self, info: ModelInfo) -> None:
        if self.first_layer >= info.num_layers:
            raise PolicyError(f"zipvl.first_layer = {self.first_layer} is beyond the language model's depth "
                              f"({info.num_layers} layers)")

    def start(self, request) -> "ZipVLRun":
        return ZipVLRun(self, request.valid, request.n_layers)


def probe_indices(n: int, share: float) -> torch.Tensor:
    recent = max(1, math.ceil(share * n))
    earlier = torch.linspace(0, max(0, n - recent - 1), steps=min(recent, max(0, n - recent))).round().long()
    return torch.cat([earlier, torch.arange(n - recent, n)]).unique()


def important_tokens(q: torch.Tensor, k: torch.Tensor, scaling: float, valid: torch.Tensor, tau: float,
                     probe: float) -> torch.Tensor:
    """(B, L) bool: ZipVL's important set for one layer. q: (B, H, L, D); k: (B, Hkv, L, D).
    Each row is scored on its own valid (non-padding) tokens, so a batch row gets what it gets alone."""
    out = torch.zeros(valid.shape, dtype=torch.bool, device=q.device)
    groups = q.shape[1] // k.shape[1]
    for i in range(q.shape[0]):
        idx = valid[i].nonzero().squeeze(1)
        n = idx.numel()
        probes = probe_indices(n, probe).to(q.device)
        kk = k[i][:, idx].repeat_interleave(groups, dim=0) if groups > 1 else k[i][:, idx]
        logits = torch.matmul(q[i][:, idx[probes]].float(), kk.float().transpose(-1, -2)) * scaling  # (H, P, n)
        visible = torch.arange(n, device=q.device)[None, :] <= probes[:, None]
        attn = logits.masked_fill(~visible[None], float("-inf")).softmax(-1).mean(0)  # (P, n)
        colsum = attn.sum(0)
        norm = colsum / visible.sum(0).clamp(min=1)  # divide by the number of probes that can see each key
        mass = colsum.sort(descending=True).values.cumsum(0)
        p = min(n, int((mass < tau * len(probes) - 1e-6).sum()) + 1)
        keep = norm.topk(p).indices
        recent = probes[probes >= n - max(1, math.ceil(probe * n))]
        out[i, idx[keep]] = True
        out[i, idx[recent]] = True
    return out


class ZipVLRun(Run):
    """Per-request state: the important set of each layer, the attention override, the cache transform."""

    def __init__(self, method: ZipVL, valid: torch.Tensor, n_layers: int):
        self.m, self.valid, self.n_layers = method, valid, n_layers
        self.important: dict[int, torch.Tensor] = {}
        self.prefill_len = valid.shape[1]
        self.evicted: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def register(self, session) -> None:
        for layer in range(self.m.first_layer, self.n_layers):
            session.override(layer, self._attention)

    def _attention(self, module, query, key, value, mask, base, **kwargs):
        if query.shape[2] == 1 or query.shape[2] != key.shape[2]:  # decode: plain attention
            return base(module, query, key, value, mask, **kwargs)
        imp = important_tokens(query, key, module.scaling, self.valid, self.m.tau, self.m.probe)
        self.important[module.layer_idx] = imp
        b, h, n, d = query.shape
        out = query.new_zeros(b, n, h, d)
        for i in range(b):
            idx = imp[i].nonzero().squeeze(1)
            m_i = None
            if mask is not None:
                m_i = mask[i:i + 1].index_select(2, idx).index_select(3, idx)
            o, _ = base(module, query[i:i + 1, :, idx], key[i:i + 1, :, idx], value[i:i + 1, :, idx], m_i, **kwargs)
            out[i, idx] = o[0]
        return out, None

    def report(self, b: int) -> dict:
        shares = [float(m[b].sum() / self.valid[b].sum()) for m in self.important.values()]
        return {"stage": "attention", "method": "zipvl", "layer": None,
                "important_share": round(sum(shares) / len(shares), 4) if shares else 1.0, "kv": self.m.kv}

    def transform_cache(self, cache) -> None:
        if self.m.kv == "none":
            return
        for layer, imp in self.important.items():
            old = cache.layers[layer]
            if self.m.kv == "quantize":
                cache.layers[layer] = MixedPrecisionLayer(old.keys, old.values, imp, self.m.bits_hi, self.m.bits_lo,
                                                          self.m.group)
                continue
            width = int(imp.sum(1).max())
            idx = torch.argsort((~imp).to(torch.int8), dim=1, stable=True)[:, :width].sort(1).values
            real = imp.gather(1, idx)  # short rows are padded with masked ghost columns
            rows = torch.arange(idx.shape[0], device=idx.device)[:, None]
            keys, values = old.keys[rows, :, idx].transpose(1, 2), old.values[rows, :, idx].transpose(1, 2)
            cache.layers[layer] = EvictedLayer(keys.contiguous(), values.contiguous(), self.prefill_len)
            self.evicted[layer] = (idx, real)

    def hooks(self, layers):
        """During decoding, map evicted layers' mask columns onto the tokens they kept."""
        return layer_pre_hooks(layers, self._decode_hook, range(len(layers)) if self.m.kv == "evict" else ())

    def _decode_hook(self, layer_idx: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.shape[1] != 1 or layer_idx not in self.evicted:
                return None
            idx, real = self.evicted[layer_idx]
            mask = kwargs.get("attention_mask")
            b = idx.shape[0]
            n_new = cache_from_kwargs(kwargs).layers[layer_idx].get_seq_length() - self.prefill_len + 1
            tail_valid = torch.ones(b, n_new, dtype=torch.bool, device=idx.device)
            if mask is None:
                if bool(real.all()):
                    return None
                new = torch.cat([real, tail_valid], 1)[:, None, None, :]
            else:
                tail = torch.arange(self.prefill_len, mask.shape[-1], device=idx.device).expand(b, -1)
                cols = torch.cat([idx, tail], 1)
                mask = mask.expand(b, *mask.shape[1:])
                new = mask.gather(3, cols[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1))
                ghost = ~torch.cat([real, tail_valid], 1)[:, None, None, :]
                new = new & ~ghost if new.dtype == torch.bool else new.masked_fill(ghost, torch.finfo(new.dtype).min)
            kwargs = dict(kwargs, attention_mask=new)
            return args, kwargs

        return hook
