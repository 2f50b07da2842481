"""In-LLM token dropping (FastV and other ``layer`` pruners) with forward pre-hooks, no forked forward.

The decoder loop hands every layer the same full-length kwargs (mask, position embeddings, position ids).
Before the first layer of a drop stage the pruner says which tokens stay; the hook slices the hidden
states and, for that layer and every later one, replaces those kwargs with sliced copies (computed once).
The KV cache of layers >= K is therefore shorter while layer 0 keeps the full length (which transformers
reads for mask sizes); during decoding the hook maps each shortened layer's mask onto its kept columns.
Kept tokens keep their original positions.

Rows of a batch may keep different counts; shorter rows are filled with "ghost" columns (dropped tokens
that stay in the tensor but are masked out everywhere), so each row gets what it gets alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ._compat import cache_from_kwargs
from .attention import AttentionSession, last_query_attention
from .hooks import layer_pre_hooks

if TYPE_CHECKING:
    from .pruners.base import LayerPruner


def gather_seq(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x: (B, L) or (..., B, L, D); idx: (B, L'). Gather along the sequence axis, per batch row."""
    rows = torch.arange(idx.shape[0], device=idx.device)[:, None]
    if x.dim() == 2:
        return x[rows, idx]
    return x[..., rows, idx, :]


@dataclass
class _Stage:
    pruner: LayerPruner
    layer: int
    index: int  # which of the pruner's drop layers
    keep: torch.Tensor | None = None  # (B, L') indices into the prefill sequence
    valid: torch.Tensor | None = None  # (B, L') False for padding and ghost columns
    ghosts: bool = False
    cached: dict | None = None  # sliced prefill kwargs

    def selected(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(keep, valid): set by ``LayerStage._select`` at prefill, before anything reads them."""
        assert self.keep is not None and self.valid is not None, f"layer {self.layer}'s stage has not selected yet"
        return self.keep, self.valid


class LayerStage:
    """Drives the ``layer`` pruners of one request (prefill and decode)."""

    def __init__(self, pruners: list[LayerPruner], image_mask: torch.Tensor, valid: torch.Tensor,
                 vision_scores: torch.Tensor | None = None):
        self.stages = sorted((_Stage(p, layer, i) for p in pruners for i, layer in enumerate(p.drop_layers())),
                             key=lambda st: st.layer)
        self.image_mask0 = image_mask  # (B, L) over the prefill sequence the LLM receives
        self.valid0 = valid  # (B, L) False for left padding
        self.prefill_len = image_mask.shape[1]
        self.scores: dict[int, torch.Tensor] = {}
        self.vision_scores = vision_scores  # (B, L) per-token scores from the vision stage (VFlowOpt)
        self.report: list[dict] = []

    @property
    def needs_attention(self) -> bool:
        return any(not st.pruner.uses_vision_scores for st in self.stages)

    def register(self, session: AttentionSession) -> None:
        for st in self.stages:
            if not st.pruner.uses_vision_scores:
                session.observe(st.layer - 1, self._score_observer(st.layer - 1))

    def _score_observer(self, layer_idx: int):
        def observe(module, query, key, mask):
            if query.shape[2] > 1:  # prefill only
                self.scores[layer_idx] = last_query_attention(module, query, key, mask)

        return observe

    def columns(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The prefill columns the output of layer ``layer_idx`` holds: ((B, L') indices into the prefill sequence,
        False for padding and ghosts), or None when no stage has shortened the sequence by then."""
        held = self._started(layer_idx)
        return held[-1].selected() if held else None

    def _started(self, layer_idx: int) -> list[_Stage]:
        """The stages that start at or before ``layer_idx``, in layer order."""
        return [st for st in self.stages if st.layer <= layer_idx]

    def _stage_for(self, layer_idx: int) -> _Stage:
        return self._started(layer_idx)[-1]

    def _select(self, st: _Stage) -> torch.Tensor:
        """Ask the pruner; return the indices (into the previous stage's columns) that stay."""
        i = self.stages.index(st)
        if i == 0:
            b, n = self.image_mask0.shape
            keep_prev = torch.arange(n, device=self.image_mask0.device).expand(b, n)
            valid_prev = self.valid0
        else:
            keep_prev, valid_prev = self.stages[i - 1].selected()
        image = gather_seq(self.image_mask0, keep_prev)
        padding = ~gather_seq(self.valid0, keep_prev)
        if st.pruner.uses_vision_scores:
            if self.vision_scores is None:
                raise RuntimeError(f"{st.pruner.method_name} ranks by vision-stage scores, but none were produced")
            scores = gather_seq(self.vision_scores, keep_prev)
        else:
            scores = self.scores.pop(st.layer - 1)
        chosen = st.pruner.select_layer(scores, image, valid_prev, st.index)
        real = (chosen & valid_prev) | (~image & ~padding) | padding
        width = int(real.sum(1).max())
        # stable sort puts each row's kept columns first, then its dropped ones (used as ghosts)
        idx = torch.argsort((~real).to(torch.int8), dim=1, stable=True)[:, :width].sort(dim=1).values
        is_real = real.gather(1, idx)
        st.keep = keep_prev.gather(1, idx)
        st.valid = valid_prev.gather(1, idx) & is_real
        st.ghosts = bool((~is_real).any())
        self.report.append({
            "stage": "layer", "method": st.pruner.method_name, "layer": st.layer,
            "visual_tokens_in": (image & valid_prev).sum(1).tolist(),
            "visual_tokens_kept": (gather_seq(self.image_mask0, st.keep) & st.valid).sum(1).tolist(),
        })
        return idx

    def _ghost_cols(self, st: _Stage, total: int) -> torch.Tensor:
        """(B, 1, 1, total) True where a column is a ghost (decode columns never are)."""
        keep, valid = st.selected()
        b, n = keep.shape
        ghost = ~valid & gather_seq(self.valid0, keep)
        pad = torch.zeros(b, total - n, dtype=torch.bool, device=ghost.device)
        return torch.cat([ghost, pad], 1)[:, None, None, :]

    def _mask(self, mask: torch.Tensor | None, st: _Stage, prefill: bool, kv_len: int) -> torch.Tensor | None:
        """Restrict a (B,1,Q,K) mask to the stage's kept columns (rows too at prefill); mask out ghosts."""
        if mask is None and not st.ghosts:
            return None
        keep, _ = st.selected()
        b, n = keep.shape
        if mask is None:
            if prefill:
                m = torch.ones(n, n, dtype=torch.bool, device=keep.device).tril()[None, None].expand(b, 1, n, n)
            else:
                m = torch.ones(b, 1, 1, kv_len, dtype=torch.bool, device=keep.device)
        else:
            mask = mask.expand(b, *mask.shape[1:])
            tail = torch.arange(self.prefill_len, mask.shape[-1], device=keep.device).expand(b, -1)
            cols = torch.cat([keep, tail], 1)
            m = mask.gather(3, cols[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1))
            if prefill:
                m = m.gather(2, keep[:, None, :, None].expand(-1, m.shape[1], -1, m.shape[3]))
        if st.ghosts:
            ghost = self._ghost_cols(st, m.shape[-1])
            m = m & ~ghost if m.dtype == torch.bool else m.masked_fill(ghost, torch.finfo(m.dtype).min)
        return m

    def hooks(self, layers):
        first = self.stages[0].layer if self.stages else len(layers)
        return layer_pre_hooks(layers, self._make_hook, range(first, len(layers)))

    def _make_hook(self, layer_idx: int):
        def hook(module, args, kwargs):
            st = self._stage_for(layer_idx)
            hidden = args[0] if args else kwargs["hidden_states"]
            new = dict(kwargs)
            if hidden.shape[1] > 1:  # prefill
                if layer_idx == st.layer:
                    hidden = gather_seq(hidden, self._select(st))
                    st.cached = self._slice_kwargs(kwargs, st)
                new.update(st.cached)
            else:
                kv_len = cache_from_kwargs(kwargs).get_seq_length(0) - self.prefill_len + st.keep.shape[1]
                new["attention_mask"] = self._mask(kwargs.get("attention_mask"), st, False, kv_len)
            if args:
                return (hidden, *args[1:]), new
            new["hidden_states"] = hidden
            return args, new

        return hook

    def _slice_kwargs(self, kwargs: dict, st: _Stage) -> dict:
        keep, _ = st.selected()
        out: dict[str, Any] = {"attention_mask": self._mask(kwargs.get("attention_mask"), st, True, keep.shape[1])}
        if kwargs.get("position_embeddings") is not None:
            out["position_embeddings"] = tuple(gather_seq(t, keep) for t in kwargs["position_embeddings"])
        if kwargs.get("position_ids") is not None:
            out["position_ids"] = gather_seq(kwargs["position_ids"], keep)
        return out
