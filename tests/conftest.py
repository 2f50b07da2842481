"""Shared fixtures: tiny random-weight LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL and InternVL
built from configs (no downloads)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from vlmfast.zoo.tiny import (
    tiny_internvl,
    tiny_llava,
    tiny_llava_next,
    tiny_llava_onevision,
    tiny_qwen2_5_vl,
    tiny_qwen2_vl,
    tiny_qwen3_vl,
)

torch.set_num_threads(min(2, torch.get_num_threads()))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BUILDERS = {"llava": tiny_llava, "llava_next": tiny_llava_next, "llava_onevision": tiny_llava_onevision,
            "qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl, "qwen3_vl": tiny_qwen3_vl,
            "internvl": tiny_internvl}


@pytest.fixture(scope="session", params=sorted(BUILDERS))
def family(request):
    return request.param


@pytest.fixture(scope="session")
def models():
    return {name: fn() for name, fn in BUILDERS.items()}


@pytest.fixture
def tiny(models, family):
    """(model, processor) of the parametrised family."""
    return models[family]


def make_image(seed: int = 0, size: int = 112, width: int | None = None) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size, width or size, 3)) * 255).astype("uint8"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("VLMFAST_CACHE", str(tmp_path_factory.getbasetemp() / "vlmfast-cache"))


def reference_generate(model, processor, images, prompt, max_new_tokens=8):
    """What plain transformers gives: ``model.generate`` with the model's own processor and chat format. The images
    go to the processor as one sample's (nested: LLaVA-OneVision tiles only the image of a one-image sample; the
    other processors read a nested list as the flat one)."""
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=[list(images)] if images else None, text=[text], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    ids = out[0, inputs["input_ids"].shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    return ids[: ids.index(eos)] if eos in ids else ids
