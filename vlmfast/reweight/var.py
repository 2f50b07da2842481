"""VAR — visual attention redistribution ("See What You Are Told: Visual Attention Sink in LMMs", arXiv 2503.03321,
ICLR 2025). Spec: shared/reference/hallucination_grounding.md §3; docs/methods/var.md.

1. **Sink dimensions** D_sink are discovered from data, per model: the first token of the prompt (BOS for
   LLaVA) carries the model's massive activations and its hidden states depend on nothing else, so the
   language model runs once on that token alone; m_d = max over layers >= ``first_layer`` of
   |RMSNorm(h)[d]| (RMSNorm without weight); the sink dimensions are the (at most ``max_dims``) d with
   m_d > median(m) + ``dim_z`` * 1.4826 * MAD(m) (a robust z-score). Cached per (model, token). ``sink_dims``
   overrides the discovery (e.g. [1415, 2533] for LLaVA-1.5-7B, the reference code's values).
2. **Sink tokens**, per layer, during prefill: phi(x) = max over D_sink of |RMSNorm(x)[d]| of the layer's
   input; phi > ``tau`` marks a sink; inside the image span a visual sink, elsewhere a text sink (BOS).
   Note phi <= sqrt(hidden size): tau = 20 presumes a wide model (Llama-2-7B: sqrt(4096) = 64).
3. **Image-centric heads**, per (layer, head, query row): total visual attention >= ``min_visual`` and
   visual non-sink share r >= ``rho`` (the paper's form; the reference code tests the sink share <= rho,
   the same only at rho = 0.5).
4. **Redistribution** in those rows: every sink (visual and text) keeps ``p`` of its weight; the removed
   (1 - p) share goes to the visual non-sink tokens in proportion to their weights. Rows still sum to 1.
   Prefill: query rows after the image span; decode: every new token. Layers ``first_layer`` .. n-1-
   ``skip_last``. Values and the KV cache are untouched.

In vlmfast's attention function VAR *wraps* a layer's attention: during prefill the layer's own computation
(SDPA, or a sparse-prefill override) runs for every row, then only the rows after the image span are
recomputed with explicit weights; during decode the one new row is computed with explicit weights.
"""

from __future__ import annotations

import weakref
from typing import Annotated

import torch
from pydantic import Field

from .. import attention
from ..adapters.base import ModelInfo
from ..errors import PolicyError
from ..hooks import layer_pre_hooks
from ..method import Run
from ..registry import register
from .base import Reweighter, method_dataclass

_DIMS_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def rms_normalise(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the last axis, in float32 (RMSNorm without its weight)."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def sink_dims_from_magnitudes(m: torch.Tensor, z: float, max_dims: int) -> list[int]:
    """Dimensions far above the rest: m_d > median(m) + z * 1.4826 * MAD(m) (robust: the outliers themselves do
    not inflate the spread), the ``max_dims`` largest, ascending."""
    med = m.median()
    thr = med + z * 1.4826 * (m - med).abs().median()
    order = torch.argsort(m, descending=True)[:max_dims]
    return sorted(int(d) for d in order if m[d] > thr)


def sink_magnitudes(adapter, token_id: int, first_layer: int) -> torch.Tensor:
    """m_d = max over decoder layers >= first_layer of |RMSNorm(h)[d]| of one token alone at position 0."""
    lm = adapter.language_model
    device = adapter.model.device
    ids = torch.tensor([[token_id]], device=device)
    out = lm(input_ids=ids, position_ids=torch.zeros_like(ids), output_hidden_states=True, use_cache=False)
    n = len(adapter.decoder_layers)
    hs = out.hidden_states[first_layer:n]  # hidden_states[l] is the input of decoder layer l
    return torch.stack([rms_normalise(h[0, 0]).abs() for h in hs]).amax(0)


def phi(x: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """max over ``dims`` of |RMSNorm(x)[d]|; x: (..., D) -> (...). Zero when there are no sink dimensions."""
    if not dims:
        return torch.zeros(x.shape[:-1], device=x.device)
    return rms_normalise(x)[..., dims].abs().amax(-1)


def redistribute(attn: torch.Tensor, visual: torch.Tensor, visual_sinks: torch.Tensor, text_sinks: torch.Tensor,
                 rows: torch.Tensor, p: float, rho: float, min_visual: float) -> tuple[torch.Tensor, torch.Tensor]:
    """VAR on post-softmax weights.

    attn: (B, H, Q, K) rows summing to 1; visual, visual_sinks, text_sinks: (B, K) bool; rows: (B, Q) bool, the
    query rows VAR may change. Returns the new weights and the (B, H, Q) mask of rows that were changed.
    """
    a = attn.float().clone()
    chosen = _redistribute_(a, *_float_masks(visual, visual_sinks, text_sinks), rows, p, rho, min_visual)
    return a.to(attn.dtype), chosen


def _float_masks(visual, visual_sinks, text_sinks) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, 1, P, 3) [visual, visual non-sink, sink] columns for one matmul, and the (B, 1, 1, P) non-sink visual
    and sink masks, as float32."""
    vis_ns = (visual & ~visual_sinks).float()
    sinks = (visual_sinks | text_sinks).float()
    stacked = torch.stack([visual.float(), vis_ns, sinks], -1)[:, None]
    return stacked, vis_ns[:, None, None, :], sinks[:, None, None, :]


def _redistribute_(a: torch.Tensor, stacked, vis_ns, sinks, rows, p: float, rho: float, min_visual: float):
    """In place on a (B, H, Q, >=P) float32 weights tensor; only its first P columns (the masks' width) can hold
    visual tokens or sinks (decode tokens are neither). Returns the (B, H, Q) mask of changed rows."""
    ap = a[..., : stacked.shape[-2]]
    sums = torch.matmul(ap, stacked)  # (B, H, Q, 3): visual, visual non-sink and sink mass of each row
    a_vis, a_vns, a_sink = sums.unbind(-1)
    chosen = rows[:, None, :] & (a_vis >= min_visual) & (a_vns >= rho * a_vis) & (a_vns > 0) & (a_sink > 0)
    take = chosen.float() * (1 - p)  # sinks keep p of their weight ...
    gain = take * a_sink / a_vns.clamp_min(torch.finfo(a.dtype).tiny)  # ... and visual non-sinks share it
    ap.mul_(1 - take[..., None] * sinks + gain[..., None] * vis_ns)
    return chosen


def _explicit_weights(module, query, key, mask, q_offset: int) -> torch.Tensor:
    """softmax(q k^T * scaling + mask) in float32, (B, H, Q, K); GQA keys repeated; ``mask`` additive (float),
    boolean (True = attend) or None (causal, queries sitting at the last Q of the K positions)."""
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1) if groups > 1 else key
    scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
    logits = torch.matmul(query.float(), k.float().transpose(-1, -2)) * scaling
    if mask is None and query.shape[2] == 1:
        pass  # one query at the last position sees every key
    elif mask is None:
        q_pos = torch.arange(query.shape[2], device=query.device)[:, None] + q_offset
        causal = torch.arange(key.shape[2], device=query.device)[None, :] <= q_pos
        logits = logits.masked_fill(~causal, float("-inf"))
    else:
        m = mask[..., : key.shape[2]]
        logits = logits.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else logits + m.float()
    return logits.softmax(-1)


@register("var")
@method_dataclass
class VAR(Reweighter):
    p: Annotated[float, Field(ge=0, le=1)] = 0.6
    """share of its attention each sink keeps (0.6: 40% is moved)"""
    rho: Annotated[float, Field(ge=0, le=1)] = 0.5
    """minimum visual non-sink share of a row's visual attention (image-centric heads); 0.5 for hallucination"""
    min_visual: Annotated[float, Field(ge=0, le=1)] = 0.2
    """minimum total visual attention of a row (the reference code's ``summ``)"""
    tau: Annotated[float, Field(gt=0)] = 20.0
    """sink threshold on phi = max over the sink dimensions of |RMSNorm(x)|; phi <= sqrt(hidden size)"""
    first_layer: Annotated[int, Field(ge=0)] = 2
    """sink detection and redistribution start at this decoder layer"""
    skip_last: Annotated[int, Field(ge=0)] = 1
    """the last ``skip_last`` decoder layers are left alone"""
    sink_dims: list[int] | None = None
    """the sink dimensions; None = discovered from the model's first prompt token (see the module docstring)"""
    dim_z: Annotated[float, Field(gt=0)] = 10.0
    """discovery: a dimension is a sink dimension when its magnitude is > median + dim_z * (1.4826 MAD) over dims"""
    max_dims: Annotated[int, Field(ge=1)] = 3

    def layers(self, n_layers: int) -> range:
        return range(self.first_layer, n_layers - self.skip_last)

    def check(self, info: ModelInfo) -> None:
        if not self.layers(info.num_layers):
            raise PolicyError(f"var.first_layer = {self.first_layer} with skip_last = {self.skip_last} leaves no "
                              f"decoder layer to act on (the language model has {info.num_layers}); expected "
                              f"first_layer < {info.num_layers - self.skip_last}")

    def dims_for(self, adapter, token_id: int) -> tuple[list[int], float]:
        """(sink dimensions, largest magnitude) for a prompt's first token; discovered once per model."""
        if self.sink_dims is not None:
            return list(self.sink_dims), float("nan")
        per_model = _DIMS_CACHE.setdefault(adapter.model, {})
        key = (token_id, self.first_layer, self.dim_z, self.max_dims)
        if key not in per_model:
            m = sink_magnitudes(adapter, token_id, self.first_layer)
            per_model[key] = (sink_dims_from_magnitudes(m, self.dim_z, self.max_dims), float(m.max()))
        return per_model[key]

    def start(self, request) -> "VARRun":
        return self.run_for(request.adapter, request.inputs, request.image_mask, request.valid)

    def run_for(self, adapter, inputs: dict, image_mask: torch.Tensor, valid: torch.Tensor) -> "VARRun":
        """A run over any sequence: ``inputs`` (the processor's; its first real token decides the sink dimensions),
        ``image_mask`` / ``valid`` over the sequence the language model receives (a decode branch's too)."""
        hidden = adapter.text_config.hidden_size
        if self.sink_dims is not None and any(not 0 <= d < hidden for d in self.sink_dims):
            raise PolicyError(f"var.sink_dims = {self.sink_dims}: every dimension must be in [0, {hidden}) "
                              f"(the language model's hidden size)")
        mask = inputs["attention_mask"].bool()
        first = mask.to(torch.int8).argmax(1)
        ids = inputs["input_ids"].gather(1, first[:, None])[:, 0].tolist()
        with torch.inference_mode():
            dims = [self.dims_for(adapter, t) for t in ids]
        return VARRun(self, dims, image_mask, valid, len(adapter.decoder_layers))


class VARRun(Run):
    """Per-request state of VAR: sink dimensions per row, sinks per layer (prefill), the attention wrappers."""

    def __init__(self, m: VAR, dims: list[tuple[list[int], float]], image_mask: torch.Tensor, valid: torch.Tensor,
                 n_layers: int):
        self.m = m
        self.dims = [d for d, _ in dims]
        self.magnitude = [mag for _, mag in dims]
        self.image_mask = image_mask & valid
        self.valid = valid
        self.prefill_len = valid.shape[1]
        self.layers = list(m.layers(n_layers))
        self.sinks: dict[int, torch.Tensor] = {}  # layer -> (B, L) bool over the prefill sequence
        self.session = None
        self.changed = torch.zeros(valid.shape[0], dtype=torch.long, device=valid.device)  # per row: (head, query)
        self.candidates = torch.zeros_like(self.changed)  # rows changed, and that VAR could have changed
        self._mask_cache: dict[int, tuple | None] = {}
        self._ones: dict[int, torch.Tensor] = {}
        # per row: queries after the image span may be changed during prefill (none when a row has no image)
        pos = torch.arange(self.prefill_len, device=valid.device)
        last_img = torch.where(self.image_mask, pos, torch.full_like(pos, -1)).amax(1)  # (B,)
        self.text_rows = (pos[None] > last_img[:, None]) & (last_img[:, None] >= 0) & valid

    # -- the contract ----------------------------------------------------------------------------------------
    def register(self, session) -> None:
        self.session = session
        for layer in self.layers:
            session.wrap(layer, self._attention)

    def hooks(self, layers):
        return layer_pre_hooks(layers, self._sink_hook, self.layers)

    def transform_cache(self, cache) -> None:
        """VAR leaves the KV cache as it is."""

    def report(self, b: int) -> dict:
        vis = [int((s[b] & self.image_mask[b]).sum()) for s in self.sinks.values()]
        txt = [int((s[b] & ~self.image_mask[b]).sum()) for s in self.sinks.values()]
        changed, total = int(self.changed[b]), int(self.candidates[b])
        return {"stage": "reweight", "method": "var", "layer": None, "sink_dims": self.dims[b],
                "visual_sinks_per_layer": vis, "text_sinks_per_layer": txt,
                "rows_changed_share": round(changed / total, 4) if total else 0.0,
                "summary": f"sink dims {self.dims[b]}, visual sinks/layer {vis}, text sinks/layer {txt}, "
                           f"{100 * (changed / total if total else 0):.1f}% of head-rows redistributed"}

    # -- sinks (prefill) -------------------------------------------------------------------------------------
    def _sink_hook(self, layer_idx: int):
        def hook(module, args, kwargs):
            if attention.active_session() is not self.session:
                return None  # another branch's forward
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.shape[1] != self.prefill_len or layer_idx in self.sinks:
                return None  # decode step: sinks are found once, in prefill
            sinks = torch.zeros(self.valid.shape, dtype=torch.bool, device=hidden.device)
            for b, dims in enumerate(self.dims):
                sinks[b] = phi(hidden[b], dims) > self.m.tau
            self.sinks[layer_idx] = sinks & self.valid
            return None

        return hook

    # -- attention -------------------------------------------------------------------------------------------
    def _attention(self, module, query, key, value, mask, inner, **kwargs):
        layer = module.layer_idx
        masks = self._masks(layer)
        if masks is None:  # no sinks in this layer (for any row): the layer's own attention
            return inner(module, query, key, value, mask, **kwargs)
        b, h, q_len, _ = query.shape
        if q_len == 1:  # decode: the new token's row, always a candidate
            rows = self._ones.get(b)
            if rows is None:
                rows = self._ones[b] = torch.ones(b, 1, dtype=torch.bool, device=query.device)
            w = _explicit_weights(module, query, key, mask, key.shape[2] - 1)
            chosen = _redistribute_(w, *masks, rows, self.m.p, self.m.rho, self.m.min_visual)
            self._count(chosen, rows, h)
            return self._apply(w, value, query.dtype), None
        out, attn_w = inner(module, query, key, value, mask, **kwargs)
        rows_all = self.text_rows
        if q_len != self.prefill_len or not bool(rows_all.any()):
            return out, attn_w
        q0 = int(rows_all.to(torch.int8).argmax(1)[rows_all.any(1)].min())  # first changeable row of any sample
        rows = rows_all[:, q0:]
        m = None if mask is None else mask[:, :, q0:q_len]
        w = _explicit_weights(module, query[:, :, q0:], key, m, q0)
        chosen = _redistribute_(w, *masks, rows, self.m.p, self.m.rho, self.m.min_visual)
        self._count(chosen, rows, h)
        tail = self._apply(w, value, out.dtype)  # (B, Q', H, d)
        out = out.clone()
        sel = chosen.transpose(1, 2)[..., None]  # (B, Q', H, 1): only changed (row, head) pairs are replaced
        out[:, q0:] = torch.where(sel, tail, out[:, q0:])
        return out, None

    def _masks(self, layer: int):
        """The layer's float masks over the prefill columns (computed once), or None when it has no sinks."""
        if layer not in self._mask_cache:
            sinks = self.sinks.get(layer)
            if sinks is None:
                return None  # not seen in prefill (yet): nothing to cache
            self._mask_cache[layer] = (_float_masks(self.image_mask, sinks & self.image_mask, sinks & ~self.image_mask)
                                       if bool(sinks.any()) else None)
        return self._mask_cache[layer]

    @staticmethod
    def _apply(w: torch.Tensor, value: torch.Tensor, dtype) -> torch.Tensor:
        groups = w.shape[1] // value.shape[1]
        v = value.repeat_interleave(groups, dim=1) if groups > 1 else value
        return torch.matmul(w.to(v.dtype), v).transpose(1, 2).contiguous().to(dtype)

    def _count(self, chosen: torch.Tensor, rows: torch.Tensor, heads: int) -> None:
        self.changed += chosen.sum((1, 2))  # stays on the device: no sync per step
        self.candidates += rows.sum(1) * heads
