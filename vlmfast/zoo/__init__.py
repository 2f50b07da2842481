"""Models vlmfast ships or builds by name, so everything runs offline.

``resolve(name)`` returns a local folder for a zoo name (building it on first use into the cache
directory, ``$VLMFAST_CACHE`` or ``~/.cache/vlmfast``), and returns any other string unchanged (a hub
id or a path, for transformers to load).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from ..errors import InputError
from .tiny import (
    tiny_internvl,
    tiny_llava,
    tiny_llava_next,
    tiny_llava_onevision,
    tiny_qwen2_5_vl,
    tiny_qwen2_vl,
    tiny_qwen3_vl,
)

WEIGHTS = Path(__file__).parent / "weights"
#: name -> folder of committed weights (trained by the project's own scripts; see each MODEL_CARD.md)
SHIPPED: dict[str, tuple[Path, str]] = {
    "tiny-llava-shapes": (WEIGHTS / "tiny-llava-shapes", "python -m training.train_llava"),
    "tiny-sam-shapes": (WEIGHTS / "tiny-sam-shapes", "python -m training.train_sam"),  # vlmfast.zoo.sam.load_sam
    "tiny-clip-shapes": (WEIGHTS / "tiny-clip-shapes", "python -m training.train_clip"),  # vlmfast.zoo.clip.load_clip
}

#: name -> builder returning (model, processor); random weights, for mechanics and demos only.
BUILT: dict[str, Callable] = {
    "tiny-random-llava": tiny_llava,
    "tiny-random-llava-next": tiny_llava_next,
    "tiny-random-llava-onevision": tiny_llava_onevision,
    "tiny-random-qwen2-vl": tiny_qwen2_vl,
    "tiny-random-qwen2.5-vl": tiny_qwen2_5_vl,
    "tiny-random-qwen3-vl": tiny_qwen3_vl,
    "tiny-random-internvl": tiny_internvl,
}


def cache_dir() -> Path:
    return Path(os.environ.get("VLMFAST_CACHE", Path.home() / ".cache" / "vlmfast"))


def resolve(name: str) -> str:
    if name in SHIPPED:
        folder, how = SHIPPED[name]
        if not (folder / "config.json").is_file():
            raise InputError(f"zoo model {name!r} has no weights at {folder}; train them with `{how}`")
        return str(folder)
    if name not in BUILT:
        return name
    target = cache_dir() / "zoo" / name
    if not (target / "config.json").is_file():
        model, processor = BUILT[name]()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    return str(target)


def available() -> list[str]:
    return sorted([*BUILT, *SHIPPED])
