"""Attention capture for grounding: an observer on vlmfast's attention function, one per decoder layer.

It reads each layer's queries and keys (before any method changes the weights: observers run before a
layer's override, so VAR-style reweighting never reaches the maps) and never changes the output: the model keeps
its own attention implementation (SDPA) for every layer. Nothing is computed while the model runs: at prefill
the observer keeps the query rows the maps can read (only the text rows for direct maps, every row for the
flows), the keys and the mask; at each decode step the step's query and mask, and the latest keys (the cache
only appends, so the last step's keys hold every earlier step's). After decoding the softmax attention is
recomputed from those, batched over layers and steps, only where it is read:

* :meth:`AttentionCapture.row_attention` -- the head-mean attention of a few query rows (a phrase's tokens, the
  positions that chose the answer's words) in chosen layers: what the direct maps (``flow: none``) need;
* :meth:`AttentionCapture.matrices` -- every captured row, head-aggregated (mean-max or mean,
  :func:`~.maps.head_weights`), per layer, in the coordinates of the full sequence: when a ``layer`` pruner has
  shortened a layer (FastV), its rows and columns are scattered back to where they belong and the dropped tokens
  read 0. The flows and the ``mean-max`` head weights need it. Memory: one (B, L, L) float32 matrix per layer
  plus the decode rows, built on first use.

Until then the capture holds, per layer, the captured query rows and the prefill keys (at most one more copy of
the prefill keys) and one query per decode step.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from ..hooks import layer_pre_hooks
from .maps import aggregate_heads, head_weights

#: prefill attention is computed at once below this many (B * H * Q * K) elements, else in query chunks
CHUNK_ELEMENTS = 1 << 26


def softmax_rows(scaling, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
                 limit: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T * scaling), float32, for queries (..., H, R, D) and keys (..., H_kv, K, D) (GQA keys are
    repeated). ``mask`` (broadcast to (..., H, R, K)): bool (True = attend), additive float, or None. ``limit``
    (R,): row r attends to keys < limit[r] only (causal), or None. ``scaling``: a float or a tensor broadcast
    over the logits. Fully masked rows (left padding) are 0."""
    groups = query.shape[-3] // key.shape[-3]
    k = key.repeat_interleave(groups, dim=-3) if groups > 1 else key
    logits = torch.matmul(query.float(), k.float().transpose(-1, -2)) * scaling
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.float()
    if limit is not None:
        causal = torch.arange(k.shape[-2], device=logits.device)[None, :] < limit.to(logits.device)[:, None]
        logits = logits.masked_fill(~causal, float("-inf"))
    return torch.nan_to_num(logits.softmax(-1), nan=0.0)


def attention_probs(module, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
                    rows: slice | torch.Tensor = slice(None)) -> torch.Tensor:
    """softmax(q k^T * scaling) with the layer's mask, float32, (B, H, Q', K) for query rows ``rows``.

    ``query`` (B, H, Q, D), ``key`` (B, H_kv, K, D) (GQA keys are repeated). ``mask``: bool (True = attend),
    additive float, or None (causal: query i is position K - Q + i). Fully masked rows (left padding) are 0.
    ``rows``: a slice or an index tensor of query rows.
    """
    scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
    return _Prefill(scaling, query, None, query.shape[2], key, mask).probs(rows)


@dataclass
class _Prefill:
    """What one layer's prefill left to compute its attention from (references, no copies except ``query``)."""

    scaling: float
    query: torch.Tensor
    """(B, H, R, D): the captured query rows"""
    rows: torch.Tensor | None
    """(R,) their indices among the layer's queries, None for all of them"""
    n_q: int
    key: torch.Tensor
    mask: torch.Tensor | None

    def probs(self, local: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """(B, H, R', K) attention of the captured rows ``local`` (indices into ``query``)."""
        absolute = (torch.arange(self.n_q, device=self.query.device) if self.rows is None else self.rows)[local]
        n_k = self.key.shape[2]
        if self.mask is not None:
            return softmax_rows(self.scaling, self.query[:, :, local], self.key,
                                self.mask[:, :, absolute, :n_k], None)
        return softmax_rows(self.scaling, self.query[:, :, local], self.key, None, absolute + (n_k - self.n_q + 1))


def _step_mask(mask: torch.Tensor | None, n_keys: int, width: int, b: int | None) -> torch.Tensor:
    """A decode step's mask row (sample ``b``, or all samples for None) as an additive float mask
    (B', 1|H, 1, ``width``): its ``n_keys`` columns, the rest 0 (the causal limit masks them). A bool mask becomes
    0 / -inf, which gives the same softmax."""
    if mask is None:
        return torch.zeros(1, 1, 1, width)
    m = mask if b is None or mask.shape[0] == 1 else mask[b:b + 1]
    m = m[:, :, -1:, :n_keys]
    m = torch.zeros(m.shape, device=m.device).masked_fill(~m, float("-inf")) if m.dtype == torch.bool else m.float()
    return torch.nn.functional.pad(m, (0, width - n_keys))


class AttentionCapture:
    """Per-request recorder of the attention of every decoder layer (see the module docstring).

    ``valid``: (B, L) the prefill sequence the language model receives (False for left padding).
    ``kept_index(layer)``: (B, L') indices into that sequence of the tokens a shortened layer holds, or None
    when the layer holds all of them (layer-stage pruning). ``layers``: the layers to record (default all; the
    direct maps need only the ones they read). ``phi_layers``: the layers whose inputs are scored for massive
    activations (:meth:`hooks`; default all).
    """

    def __init__(self, n_layers: int, valid: torch.Tensor, head_weighting: str = "mean-max",
                 kept_index: Callable[[int], torch.Tensor | None] | None = None, image: torch.Tensor | None = None,
                 all_rows: bool = True, layers: Sequence[int] | None = None,
                 phi_layers: Sequence[int] | None = None):
        self.n_layers = n_layers
        self.layers = list(range(n_layers)) if layers is None else sorted(set(layers))
        self.all_rows = all_rows
        """record every query row (attention flow, VL-SAM head weights) or only the text rows (direct maps)"""
        self.valid = valid
        self.image = image if image is not None else torch.zeros_like(valid)
        """(B, L) image-token positions (for the ``image-mean-max`` head weights)"""
        self.prefill_len = valid.shape[1]
        self.head_weighting = head_weighting
        self.kept_index = kept_index or (lambda layer: None)
        self.phi_layers = list(range(n_layers)) if phi_layers is None else list(phi_layers)
        self.phi: dict[int, torch.Tensor] = {}
        self.paused = False
        self._pre: dict[int, _Prefill] = {}
        self._dec_q: dict[int, list[torch.Tensor]] = {i: [] for i in self.layers}
        self._dec_mask: dict[int, list[torch.Tensor | None]] = {i: [] for i in self.layers}
        self._dec_key: dict[int, torch.Tensor] = {}
        self._text_rows: torch.Tensor | None = None
        self._prefill: dict[int, torch.Tensor] = {}
        self._weights: dict[int, torch.Tensor] = {}
        self._decoded: dict[int, torch.Tensor] = {}

    def register(self, session) -> None:
        for layer in self.layers:
            session.observe(layer, self._observer(layer))

    def hooks(self, layers, enabled: bool = True):
        """Forward pre-hooks on the decoder layers ``phi_layers`` that record, at prefill, each token's
        massive-activation score ``phi = max_d |x_d| / rms(x)`` of the layer's input (VAR's sink criterion without
        a model-specific list of sink dimensions: a sink token's residual stream is dominated by a few huge
        dimensions, so the ratio approaches sqrt(d); ordinary tokens stay near 3-6). Installed for the call,
        removed after it."""
        return layer_pre_hooks(layers, self._phi_hook, self.phi_layers if enabled else ())

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
                self._observe_prefill(layer, module, query, key, mask)
            else:
                self._observe_decode(layer, query, key, mask)

        return observe

    # -- recording (no attention is computed here) ------------------------------------------------------------
    def _columns(self, layer: int, n_keys: int) -> torch.Tensor:
        """(B, n_keys) positions in the full sequence (prefill, then decode steps) of a layer's key columns."""
        b, n = self.valid.shape
        idx = self.kept_index(layer)
        if idx is None:
            idx = torch.arange(n, device=self.valid.device).expand(b, n)
        tail = torch.arange(n, n + n_keys - idx.shape[1], device=idx.device).expand(b, -1)
        return torch.cat([idx, tail], 1)

    def _captured_rows(self, layer: int, n_q: int) -> torch.Tensor | None:
        """The query rows a layer's prefill keeps: None (all) for the flows, else the text rows of any sample."""
        if self.all_rows:
            return None
        if self.kept_index(layer) is None and n_q == self.prefill_len:
            if self._text_rows is None:
                self._text_rows = (self.valid & ~self.image).any(0).nonzero().flatten()
            return self._text_rows
        cols = self._columns(layer, n_q)
        return (self.valid.gather(1, cols) & ~self.image.gather(1, cols)).any(0).nonzero().flatten()

    def _observe_prefill(self, layer: int, module, query, key, mask) -> None:
        if layer in self._pre:
            raise RuntimeError(
                f"grounding captured a second prefill at layer {layer}; run extra branches inside "
                "`capture.pause()` so only the main request is recorded"
            )
        rows = self._captured_rows(layer, query.shape[2])
        self._pre[layer] = _Prefill(getattr(module, "scaling", query.shape[-1] ** -0.5),
                                    query if rows is None else query[:, :, rows], rows, query.shape[2], key, mask)

    def _observe_decode(self, layer: int, query, key, mask) -> None:
        if layer not in self._pre:
            raise RuntimeError(f"grounding saw a decode step at layer {layer} before its prefill")
        steps = len(self._dec_q[layer])
        idx = self.kept_index(layer)
        held = self.prefill_len if idx is None else idx.shape[1]
        if key.shape[2] != held + steps + 1:
            raise RuntimeError(
                f"grounding expected {held + steps + 1} keys at layer {layer}, decode step {steps}, got "
                f"{key.shape[2]}: the KV cache no longer holds one entry per token (an evicting cache such as "
                "ZipVL's mode=evict cannot be grounded), or an extra branch ran outside `capture.pause()`"
            )
        self._dec_q[layer].append(query)
        self._dec_mask[layer].append(mask)
        self._dec_key[layer] = key

    @property
    def decode_steps(self) -> int:
        return len(self._dec_q[self.layers[0]]) if self.layers else 0

    def _check_complete(self, layers: Sequence[int] | None = None) -> None:
        if len(self._pre) != len(self.layers):
            raise RuntimeError(f"grounding captured {len(self._pre)} of {len(self.layers)} layers; the attention "
                               "function did not run for every layer")
        missing = sorted(set(range(self.n_layers) if layers is None else layers) - set(self._pre))
        if missing:
            raise RuntimeError(f"grounding did not record layers {missing} (it recorded {self.layers}: the "
                               "layers the policy's direct map reads)")

    # -- every captured row, head-aggregated (flows, mean-max head weights, inspection) ------------------------
    def _materialise(self, layer: int) -> None:
        """Layer ``layer``'s prefill matrix (B, L, L), head weights (B, H) and decode rows (B, T, L + T)."""
        if layer in self._prefill:
            return
        p = self._pre[layer]
        b, h = p.query.shape[:2]
        n_q, n_k = p.n_q, p.key.shape[2]
        cols = self._columns(layer, n_k)
        image = self.image.gather(1, cols[:, :n_k])  # (B, K) which key columns are image tokens
        text_rows = self.valid.gather(1, cols[:, :n_q]) & ~image[:, :n_q]
        rows = torch.arange(n_q, device=p.query.device) if p.rows is None else p.rows
        step = max(1, CHUNK_ELEMENTS // max(1, b * h * n_k))
        chunks = [torch.arange(s, min(s + step, len(rows)), device=rows.device) for s in range(0, len(rows), step)]

        def row_max(probs: torch.Tensor, c: torch.Tensor | slice) -> torch.Tensor:
            if self.head_weighting == "image-mean-max":  # text queries' largest attention on one image token
                m = probs.masked_fill(~image[:, None, None, :], 0).amax(-1)
                return m * text_rows[:, None, rows[c]]
            return probs.amax(-1)

        if len(chunks) <= 1:
            probs = p.probs()
            w = (torch.ones(b, h, device=probs.device) if self.head_weighting == "mean" or not len(rows)
                 else head_weights(None, row_max=row_max(probs, slice(None))))
            agg = aggregate_heads(probs, w)
        else:  # two passes: the head weights need every row first
            if self.head_weighting == "mean":
                w = torch.ones(b, h, device=p.query.device)
            else:
                w = head_weights(None, row_max=torch.cat([row_max(p.probs(c), c) for c in chunks], -1))
            agg = torch.cat([aggregate_heads(p.probs(c), w) for c in chunks], 1)
        self._weights[layer] = w
        if len(rows) == n_q == self.prefill_len and self.kept_index(layer) is None:
            self._prefill[layer] = agg
        else:
            full = torch.zeros(b, self.prefill_len, self.prefill_len, dtype=agg.dtype, device=agg.device)
            r = torch.arange(b, device=agg.device)[:, None, None]
            full[r, cols[:, rows, None], cols[:, None, :n_k]] = agg
            self._prefill[layer] = full
        steps = self.decode_steps
        width = self.prefill_len + steps
        decoded = torch.zeros(b, steps, width, device=agg.device)
        if steps:
            key = self._dec_key[layer]
            held = key.shape[2] - steps
            probs = softmax_rows(p.scaling, torch.cat(self._dec_q[layer], 2), key,
                                 self._decode_mask(layer, range(steps), key.shape[2], None),
                                 torch.arange(held + 1, held + steps + 1, device=key.device))
            dcols = self._columns(layer, key.shape[2])
            decoded.scatter_(2, dcols[:, None, :].expand(-1, steps, -1), aggregate_heads(probs, w))
        self._decoded[layer] = decoded

    def _decode_mask(self, layer: int, steps, width: int, b: int | None) -> torch.Tensor | None:
        """The masks of decode ``steps`` of a layer as one additive (B', 1, S, width) mask (None: no masks)."""
        masks = [self._dec_mask[layer][s] for s in steps]
        if all(m is None for m in masks):
            return None
        held = self._dec_key[layer].shape[2] - self.decode_steps
        parts = [_step_mask(m, held + s + 1, width, b).to(self._dec_key[layer].device) for m, s in zip(masks, steps)]
        shape = (max(x.shape[0] for x in parts), max(x.shape[1] for x in parts), 1, width)
        return torch.cat([x.expand(shape) for x in parts], 2)

    @property
    def prefill(self) -> dict[int, torch.Tensor]:
        """layer -> (B, L, L) head-aggregated prefill attention (captured rows; others 0)."""
        for layer in self.layers:
            self._materialise(layer)
        return self._prefill

    @property
    def weights(self) -> dict[int, torch.Tensor]:
        """layer -> (B, H) head weights."""
        self.prefill  # noqa: B018  (builds them)
        return self._weights

    def matrix(self, b: int, layer: int, n: int | None = None) -> torch.Tensor:
        """Sample ``b``'s head-aggregated attention in ``layer``, (n, n) over the full sequence (prefill then the
        fed decode tokens); ``n`` defaults to all captured positions."""
        self._check_complete([layer])
        length = self.prefill_len + self.decode_steps
        n = length if n is None else n
        if not self.prefill_len <= n <= length:
            raise ValueError(f"n = {n} outside [{self.prefill_len}, {length}]")
        self._materialise(layer)
        m = torch.zeros(n, n, dtype=torch.float32, device=self.valid.device)
        m[: self.prefill_len, : self.prefill_len] = self._prefill[layer][b]
        m[self.prefill_len:] = self._decoded[layer][b, : n - self.prefill_len, :n]
        return m

    def matrices(self, b: int, n: int | None = None) -> list[torch.Tensor]:
        """:meth:`matrix` of every layer."""
        self._check_complete()
        return [self.matrix(b, layer, n) for layer in range(self.n_layers)]

    # -- a few rows (direct maps) ------------------------------------------------------------------------------
    def row_attention(self, b: int, positions: Sequence[int], layers: Sequence[int]) -> torch.Tensor:
        """Sample ``b``'s head-aggregated attention of query ``positions`` (prefill positions, then
        ``prefill_len + t`` for decode step t) in ``layers``: (len(layers), len(positions), prefill_len +
        decode_steps), the same rows as :meth:`matrices` gives. With plain head means and full-length layers only
        those rows are computed (batched over layers); otherwise the matrices are built and read."""
        self._check_complete(layers)
        n = self.prefill_len + self.decode_steps
        pos = torch.as_tensor(list(positions), dtype=torch.long)
        if len(pos) and (int(pos.min()) < 0 or int(pos.max()) >= n):
            raise ValueError(f"positions outside [0, {n})")
        if self.head_weighting != "mean" or any(self.kept_index(layer) is not None for layer in layers):
            return torch.stack([self.matrix(b, layer)[pos.to(self.valid.device)] for layer in layers])
        device = self.valid.device
        out = torch.zeros(len(layers), len(pos), n, device=device)
        scaling = [self._pre[layer].scaling for layer in layers]
        scale = scaling[0] if len(set(scaling)) == 1 else torch.tensor(scaling, device=device)[:, None, None, None]
        pre = (pos < self.prefill_len).nonzero().flatten()
        if len(pre) and layers:
            absolute = pos[pre].to(device)
            local = absolute
            first = self._pre[layers[0]]
            if first.rows is not None:  # captured text rows only: where each asked-for row sits among them
                where = torch.full((self.prefill_len,), -1, dtype=torch.long, device=device)
                where[first.rows] = torch.arange(len(first.rows), device=device)
                local = where[absolute]
                if bool((local < 0).any()):
                    raise ValueError("row_attention: a prefill row that was not captured (an image token's row; "
                                     "record every row with all_rows=True)")
            q = torch.stack([self._pre[layer].query[b][:, local] for layer in layers])  # (nL, H, P, D)
            k = torch.stack([self._pre[layer].key[b] for layer in layers])
            given = [m for layer in layers if (m := self._pre[layer].mask) is not None]
            if not given:
                mask, limit = None, absolute + 1
            else:
                assert len(given) == len(layers), "row_attention: only some of the layers' prefills had a mask"
                mask, limit = torch.stack([m[b if m.shape[0] > 1 else 0][:, absolute, :self.prefill_len]
                                           for m in given]), None
            out[:, pre.to(device), : self.prefill_len] = softmax_rows(scale, q, k, mask, limit).mean(-3)
        dec = (pos >= self.prefill_len).nonzero().flatten()
        if len(dec) and layers:
            steps = (pos[dec] - self.prefill_len).tolist()
            q = torch.stack([self._dec_q[layer][s][b, :, 0] for layer in layers for s in steps])  # (nL*S, H, D)
            q = q.view(len(layers), len(steps), *q.shape[1:]).transpose(1, 2)  # (nL, H, S, D)
            k = torch.stack([self._dec_key[layer][b] for layer in layers])  # (nL, H_kv, n, D)
            masks = [self._decode_mask(layer, steps, n, b) for layer in layers]
            mask = None if all(m is None for m in masks) else torch.cat(
                [m if m is not None else torch.zeros(1, 1, len(steps), n, device=device) for m in masks])
            limit = torch.tensor(steps, device=device) + self.prefill_len + 1
            out[:, dec.to(device)] = softmax_rows(scale, q, k, mask, limit).mean(-3)
        return out
