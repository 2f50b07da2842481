"""Model-family adapters. ``adapter_for(model)`` picks the one that supports the model's class."""

from __future__ import annotations

from ..errors import UnsupportedModelError
from .base import Adapter, ImageTokens, ModelInfo
from .llava import LlavaAdapter
from .qwen2_vl import Qwen2VLAdapter

ADAPTERS: list[type[Adapter]] = [LlavaAdapter, Qwen2VLAdapter]


def adapter_for(model) -> Adapter:
    for cls in ADAPTERS:
        if cls.supports(model):
            return cls(model)
    supported = ", ".join(f"{c.family} ({'/'.join(c.model_classes)})" for c in ADAPTERS)
    raise UnsupportedModelError(
        f"vlmfast has no adapter for {type(model).__name__}; supported families: {supported}. "
        "Load the model with its transformers class (e.g. LlavaForConditionalGeneration)."
    )


__all__ = ["Adapter", "ImageTokens", "ModelInfo", "adapter_for", "ADAPTERS"]
