"""Model-family adapters. ``adapter_for(model)`` picks the one that supports the model's class."""

from __future__ import annotations

from ..errors import UnsupportedModelError
from .base import Adapter, ImageTokens, ModelInfo
from .internvl import InternVLAdapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen2_5_vl import Qwen25VLAdapter
from .qwen2_vl import Qwen2VLAdapter
from .qwen3_vl import Qwen3VLAdapter

ADAPTERS: list[type[Adapter]] = [LlavaAdapter, LlavaNextAdapter, LlavaOnevisionAdapter, Qwen2VLAdapter, Qwen25VLAdapter,
                                 Qwen3VLAdapter, InternVLAdapter]


def supported_families() -> str:
    """The families vlmfast has an adapter for, with their transformers classes (for error messages)."""
    return ", ".join(f"{c.family} ({'/'.join(c.model_classes)})" for c in ADAPTERS)


def adapter_class_for(model_class: type) -> type[Adapter] | None:
    """The adapter whose family includes ``model_class`` (a transformers model class), or None."""
    for cls in ADAPTERS:
        if any(c.__name__ in cls.model_classes for c in model_class.__mro__):
            return cls
    return None


def adapter_for(model) -> Adapter:
    cls = adapter_class_for(type(model))
    if cls is None:
        raise UnsupportedModelError(
            f"vlmfast has no adapter for {type(model).__name__}; supported families: {supported_families()}. "
            "Load the model with its transformers class (e.g. LlavaForConditionalGeneration)."
        )
    return cls(model)


__all__ = ["Adapter", "ImageTokens", "ModelInfo", "adapter_for", "adapter_class_for", "supported_families",
           "ADAPTERS"]
