"""Hooks installed for the duration of a call and removed after it, even on error."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator


@contextmanager
def layer_pre_hooks(layers, make_hook: Callable, indices: Iterable[int]) -> Iterator[None]:
    """Install ``make_hook(i)`` as a forward pre-hook (with kwargs) on ``layers[i]`` for each i in ``indices``."""
    handles = [layers[i].register_forward_pre_hook(make_hook(i), with_kwargs=True) for i in indices]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
