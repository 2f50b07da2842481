"""Attention capture for grounding: an observer on vlmfast's attention function, one per decoder layer.

It reads each layer's queries and keys (before any method changes the weights: observers run before a
layer's override, so VAR-style reweighting never reaches the maps), recomputes the softmax attention,
aggregates the heads (mean-max or mean, :func:`~.maps.head_weights`) and keeps, per layer, the prefill matrix
and one row per decode step, in the coordinates of the full prefill sequence: when a ``layer`` pruner has
shortened a layer (FastV), its rows and columns are scattered back to where they belong and the dropped
tokens read 0. Memory: one (B, L, L) float32 matrix per layer plus the decode rows.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from ..hooks import layer_pre_hooks
from .maps import aggregate_heads, head_weights

#: prefill attention is computed at once below this many (B * H * Q * K) elements, else in query chunks
CHUNK_ELEMENTS = 1 << 26


def attention_probs(module, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
                    rows: slice | torch.Tensor = slice(None)) -> torch.Tensor:
    """softmax(q k^T * scaling) with the layer's mask, float32, (B, H, Q', K) for query rows ``rows``.

    ``query`` (B, H, Q, D), ``key`` (B, H_kv, K, D) (GQA keys are repeated). ``mask``: bool (True = attend),
    additive float, or None (causal: query i is position K - Q + i). Fully masked rows (left padding) are 0.
    ``rows``: a slice or an index tensor of query rows.
    """
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1) if groups > 1 else key
    q = query[:, :, rows]
    scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scaling
    n_q, n_k = query.shape[2], k.shape[2]
    if mask is not None:
        m = mask[:, :, rows, :n_k]
        logits = logits.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else logits + m.float()
    else:
        qi = torch.arange(n_k - n_q, n_k, device=q.device)[rows]
        causal = torch.arange(n_k, device=q.device)[None, :] <= qi[:, None]
        logits = logits.masked_fill(~causal, float("-inf"))
    return torch.nan_to_num(logits.softmax(-1), nan=0.0)


class AttentionCapture:
    """Per-request recorder of head-aggregated attention in every decoder layer.

    ``valid``: (B, L) the prefill sequence the language model receives (False for left padding).
    ``kept_index(layer)``: (B, L') indices into that sequence of the tokens a shortened layer holds, or None
    when the layer holds all of them (layer-stage pruning).
    """

    def __init__(self, n_layers: int, valid: torch.Tensor, head_weighting: str = "mean-max",
                 kept_index: Callable[[int], torch.Tensor | None] | None = None, image: torch.Tensor | None = None,
                 all_rows: bool = True):
        self.n_layers = n_layers
        self.all_rows = all_rows
        """record every query row (attention flow, VL-SAM head weights) or only the text rows (direct maps)"""
        self.valid = valid
        self.image = image if image is not None else torch.zeros_like(valid)
        """(B, L) image-token positions (for the ``image-mean-max`` head weights)"""
        self.prefill_len = valid.shape[1]
        self.head_weighting = head_weighting
        self.kept_index = kept_index or (lambda layer: None)
        self.prefill: dict[int, torch.Tensor] = {}
        self.weights: dict[int, torch.Tensor] = {}
        self.rows: dict[int, list[torch.Tensor]] = {i: [] for i in range(n_layers)}
        self.phi: dict[int, torch.Tensor] = {}
        self.paused = False

    def register(self, session) -> None:
        for layer in range(self.n_layers):
            session.observe(layer, self._observer(layer))

    def hooks(self, layers, enabled: bool = True):
        """Forward pre-hooks on the decoder layers that record, at prefill, each token's massive-activation
        score ``phi = max_d |x_d| / rms(x)`` of the layer's input (VAR's sink criterion without a model-specific
        list of sink dimensions: a sink token's residual stream is dominated by a few huge dimensions, so the
        ratio approaches sqrt(d); ordinary tokens stay near 3-6). Installed for the call, removed after it."""
        return layer_pre_hooks(layers, self._phi_hook, range(len(layers)) if enabled else ())

    def _phi_hook(self, layer: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if self.paused or hidden.shape[1] == 1 or layer in self.phi:
                return None
            x = hidden.float()
            phi = x.abs().amax(-1) / x.pow(2).mean(-1).add(1e-6).sqrt()  # (B, L')
            idx = self.kept_index(layer)
            if idx is not None and idx.shape[1] == phi.shape[1] and phi.shape[1] != self.prefill_len:
                full = torch.zeros(phi.shape[0], self.prefill_len, device=phi.device)
                self.phi[layer] = full.scatter_(1, idx, phi)
            else:
                self.phi[layer] = phi
            return None

        return hook

    @contextmanager
    def pause(self) -> Iterator[None]:
        """Record nothing inside the block (for extra decode branches that run under the same session)."""
        before, self.paused = self.paused, True
        try:
            yield
        finally:
            self.paused = before

    def _observer(self, layer: int):
        def observe(module, query, key, mask):
            if self.paused:
                return
            if query.shape[2] > 1:
                self._prefill(layer, module, query, key, mask)
            else:
                self._decode(layer, module, query, key, mask)

        return observe

    def _columns(self, layer: int, n_keys: int) -> torch.Tensor:
        """(B, n_keys) positions in the full sequence (prefill, then decode steps) of a layer's key columns."""
        b, n = self.valid.shape
        idx = self.kept_index(layer)
        if idx is None:
            idx = torch.arange(n, device=self.valid.device).expand(b, n)
        tail = torch.arange(n, n + n_keys - idx.shape[1], device=idx.device).expand(b, -1)
        return torch.cat([idx, tail], 1)

    def _prefill(self, layer: int, module, query, key, mask) -> None:
        if layer in self.prefill:
            raise RuntimeError(
                f"grounding captured a second prefill at layer {layer}; run extra branches inside "
                "`capture.pause()` so only the main request is recorded"
            )
        b, h, n_q, _ = query.shape
        n_k = key.shape[2]
        cols = self._columns(layer, n_k)
        image = self.image.gather(1, cols[:, :n_k])  # (B, K) which key columns are image tokens
        text_rows = self.valid.gather(1, cols[:, :n_q]) & ~image[:, :n_q]
        rows = (torch.arange(n_q, device=query.device) if self.all_rows
                else text_rows.any(0).nonzero().flatten())  # direct maps only read text queries
        step = max(1, CHUNK_ELEMENTS // max(1, b * h * n_k))
        chunks = [rows[s:s + step] for s in range(0, len(rows), step)]

        def row_max(p: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            if self.head_weighting == "image-mean-max":  # text queries' largest attention on one image token
                m = p.masked_fill(~image[:, None, None, :], 0).amax(-1)
                return m * text_rows[:, None, c]
            return p.amax(-1)

        if len(chunks) <= 1:
            probs = attention_probs(module, query, key, mask, rows)
            w = (torch.ones(b, h, device=probs.device) if self.head_weighting == "mean" or not len(rows)
                 else head_weights(None, row_max=row_max(probs, rows)))
            agg = aggregate_heads(probs, w)
        else:  # two passes: the head weights need every row first
            if self.head_weighting == "mean":
                w = torch.ones(b, h, device=query.device)
            else:
                w = head_weights(None, row_max=torch.cat(
                    [row_max(attention_probs(module, query, key, mask, c), c) for c in chunks], -1))
            agg = torch.cat([aggregate_heads(attention_probs(module, query, key, mask, c), w) for c in chunks], 1)
        self.weights[layer] = w
        if len(rows) == n_q == self.prefill_len and self.kept_index(layer) is None:
            self.prefill[layer] = agg
            return
        full = torch.zeros(b, self.prefill_len, self.prefill_len, dtype=agg.dtype, device=agg.device)
        r = torch.arange(b, device=agg.device)[:, None, None]
        full[r, cols[:, rows, None], cols[:, None, :n_k]] = agg
        self.prefill[layer] = full

    def _decode(self, layer: int, module, query, key, mask) -> None:
        if layer not in self.weights:
            raise RuntimeError(f"grounding saw a decode step at layer {layer} before its prefill")
        n_k = key.shape[2]
        idx = self.kept_index(layer)
        held = self.prefill_len if idx is None else idx.shape[1]
        expected = held + len(self.rows[layer]) + 1
        if n_k != expected:
            raise RuntimeError(
                f"grounding expected {expected} keys at layer {layer}, decode step {len(self.rows[layer])}, got "
                f"{n_k}: the KV cache no longer holds one entry per token (an evicting cache such as ZipVL's "
                "mode=evict cannot be grounded), or an extra branch ran outside `capture.pause()`"
            )
        agg = aggregate_heads(attention_probs(module, query, key, mask), self.weights[layer])[:, 0]  # (B, K)
        cols = self._columns(layer, n_k)
        full = torch.zeros(agg.shape[0], self.prefill_len + len(self.rows[layer]) + 1, dtype=agg.dtype,
                           device=agg.device)
        full.scatter_(1, cols, agg)
        self.rows[layer].append(full)

    @property
    def decode_steps(self) -> int:
        return len(self.rows[0]) if self.rows else 0

    def matrices(self, b: int, n: int | None = None) -> list[torch.Tensor]:
        """Sample ``b``'s head-aggregated attention, one (n, n) matrix per layer over the full sequence
        (prefill then the fed decode tokens); ``n`` defaults to all captured positions."""
        if len(self.prefill) != self.n_layers:
            raise RuntimeError(f"grounding captured {len(self.prefill)} of {self.n_layers} layers; the attention "
                               "function did not run for every layer")
        length = self.prefill_len + self.decode_steps
        n = length if n is None else n
        if not self.prefill_len <= n <= length:
            raise ValueError(f"n = {n} outside [{self.prefill_len}, {length}]")
        out = []
        for layer in range(self.n_layers):
            m = torch.zeros(n, n, dtype=torch.float32, device=self.valid.device)
            m[: self.prefill_len, : self.prefill_len] = self.prefill[layer][b]
            for t, row in enumerate(self.rows[layer][: n - self.prefill_len]):
                m[self.prefill_len + t, : row.shape[1]] = row[b]
            out.append(m)
        return out
