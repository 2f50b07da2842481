"""vlmfast's attention function, registered through transformers' ``AttentionInterface``.

While an accelerator call runs, the language model's attention implementation is switched to
``vlmfast_<base>`` (e.g. ``vlmfast_sdpa``): a function that lets the active session's observers look at each
layer's queries and keys (FastV's scores; later sparse patterns, VAR, grounding capture) and then calls the
model's original implementation, so outputs are bit-identical when no observer changes anything. A matching
mask function is registered under the same name (without it transformers silently drops the causal mask).
On exit the original implementation is restored. Nothing is registered or patched at import time.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Callable, Iterator, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Observer = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor | None], None]

_ACTIVE: ContextVar["AttentionSession | None"] = ContextVar("vlmfast_attention_session", default=None)
_PREFIX = "vlmfast_"


class AttentionSession:
    """Per-call state: the base implementation to delegate to and per-layer observers."""

    def __init__(self, base: str):
        self.base = base
        self.observers: dict[int, list[Observer]] = {}
        self.overrides: dict[int, Callable] = {}
        self.wrappers: dict[int, list[Callable]] = {}
        self.kernels: dict[int, Callable] = {}

    def observe(self, layer_idx: int, fn: Observer) -> None:
        self.observers.setdefault(layer_idx, []).append(fn)

    def override(self, layer_idx: int, fn: Callable) -> None:
        """Replace layer ``layer_idx``'s attention: ``fn(module, q, k, v, mask, base_fn, **kwargs)``."""
        if layer_idx in self.overrides:
            raise ValueError(f"two methods want to replace the attention of layer {layer_idx}")
        self.overrides[layer_idx] = fn

    def wrap(self, layer_idx: int, fn: Callable) -> None:
        """Wrap layer ``layer_idx``'s attention (the override, else the base implementation): ``fn(module, q, k,
        v, mask, inner, **kwargs)`` where ``inner`` has the base signature. Wrappers compose (VAR around sparse
        prefill); the first registered is the outermost."""
        self.wrappers.setdefault(layer_idx, []).append(fn)

    def kernel(self, layer_idx: int, fn: Callable) -> None:
        """Replace layer ``layer_idx``'s dense kernel, i.e. what wrappers, overrides and the default path call as
        the base implementation: ``fn(module, q, k, v, mask, base, **kwargs)`` (sparse prefill). It composes with
        overrides and wrappers, which call it in place of the model's own implementation."""
        if layer_idx in self.kernels:
            raise ValueError(f"two methods want to replace the attention kernel of layer {layer_idx}")
        self.kernels[layer_idx] = fn

    def base_function(self, module: nn.Module) -> Callable:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if self.base == "eager":  # eager is defined per model file
            return sys.modules[type(module).__module__].eager_attention_forward
        return ALL_ATTENTION_FUNCTIONS[self.base]

    def __call__(self, module, query, key, value, attention_mask=None, **kwargs):
        layer = getattr(module, "layer_idx", -1)
        for fn in self.observers.get(layer, ()):
            fn(module, query, key, attention_mask)
        base = self.base_function(module)
        if layer in self.kernels:
            base = (lambda f, b: lambda module, q, k, v, mask, **kw: f(module, q, k, v, mask, b, **kw))(
                self.kernels[layer], base)
        if layer in self.wrappers:
            return _wrapped(self.wrappers[layer], self._inner(layer, base))(module, query, key, value, attention_mask,
                                                                             **kwargs)
        if layer in self.overrides:
            return self.overrides[layer](module, query, key, value, attention_mask, base, **kwargs)
        return base(module, query, key, value, attention_mask, **kwargs)

    def _inner(self, layer: int, base: Callable) -> Callable:
        if layer not in self.overrides:
            return base
        fn = self.overrides[layer]
        return lambda module, q, k, v, mask, **kw: fn(module, q, k, v, mask, base, **kw)


def _wrapped(wrappers: list[Callable], inner: Callable) -> Callable:
    for fn in reversed(wrappers):
        inner = (lambda f, nxt: lambda module, q, k, v, mask, **kw: f(module, q, k, v, mask, nxt, **kw))(fn, inner)
    return inner


def active_session() -> "AttentionSession | None":
    """The session the attention function currently dispatches to (None outside a call)."""
    return _ACTIVE.get()


@contextmanager
def use(model: PreTrainedModel, session: "AttentionSession | None") -> Iterator[None]:
    """Run a block (one decode branch's forward) with ``session``. If vlmfast's attention is already installed on
    ``model`` (the main branch's), only the active session is swapped, to ``session`` or to a pass-through one
    (so the main branch's observers and wrappers never see another branch); otherwise it is installed."""
    if model.config.get_text_config()._attn_implementation.startswith(_PREFIX):
        active = _ACTIVE.get()
        base = active.base if active is not None else ""
        if session is None:
            session = AttentionSession(base)
        elif not session.base:
            session.base = base
        token = _ACTIVE.set(session)
        try:
            yield
        finally:
            _ACTIVE.reset(token)
        return
    with installed(model, session):
        yield


def vlmfast_attention(module, query, key, value, attention_mask=None, **kwargs):
    session = _ACTIVE.get()
    if session is None:
        raise RuntimeError(
            "the vlmfast attention implementation was called outside a VLMAccelerator call; "
            "restore the model's original attn_implementation (set_attn_implementation)"
        )
    return session(module, query, key, value, attention_mask, **kwargs)


def _register(base: str) -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = _PREFIX + base
    AttentionInterface.register(name, vlmfast_attention)
    # cast: transformers leaves the mapping unannotated, so its values infer as builtins.function (not callable)
    mask_fn = cast("Callable | None", ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(base))
    if mask_fn is None:
        raise NotImplementedError(
            f"vlmfast cannot wrap attention implementation {base!r}; use 'sdpa' or 'eager' "
            f"(known mask functions: {sorted(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping)})"
        )
    AttentionMaskInterface.register(name, mask_fn)
    return name


@contextmanager
def installed(model: PreTrainedModel, session: AttentionSession | None) -> Iterator[None]:
    """Route the language model's attention through ``session`` for the duration of the block."""
    if session is None:
        yield
        return
    text_cfg = model.config.get_text_config()
    base = text_cfg._attn_implementation
    if base.startswith(_PREFIX):
        raise RuntimeError("vlmfast attention is already installed on this model (nested accelerator calls?)")
    session.base = base
    model.set_attn_implementation({"text_config": _register(base)})
    token = _ACTIVE.set(session)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
        model.set_attn_implementation({"text_config": base})


def last_query_attention(module, query, key, attention_mask) -> torch.Tensor:
    """Head-averaged attention of the last query over all keys: (B, K). Handles GQA and bool/float masks."""
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1) if groups > 1 else key
    scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
    logits = torch.matmul(query[:, :, -1:].float(), k.float().transpose(-1, -2)) * scaling  # (B, H, 1, K)
    if attention_mask is not None:
        m = attention_mask[:, :, -1:, : k.shape[2]]
        logits = logits.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else logits + m.float()
    return logits.softmax(-1).mean(1)[:, 0]
