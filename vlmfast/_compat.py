"""transformers 5.24 renamed the KV-cache argument and output field ``past_key_values`` to ``cache`` (the old
name still works there, with a deprecation warning, until 5.40). vlmfast supports both sides of the rename."""

from __future__ import annotations

import inspect

from transformers import LlamaModel

#: the keyword a decoder (and its layers) takes the KV cache by in the installed transformers
CACHE_KW = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def cache_from_kwargs(kwargs: dict):
    """The KV cache a decoder layer was called with (``None`` when it has none)."""
    return kwargs.get(CACHE_KW)


def cache_of(output):
    """The KV cache a model call returned."""
    return getattr(output, CACHE_KW)
