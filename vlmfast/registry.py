"""Name -> method class. Third-party methods register the same way the built-in ones do.

    from vlmfast.registry import register
    @register("mypruner")
    @dataclass
    class MyPruner(VisionPruner): ...
"""

from __future__ import annotations

from typing import Callable, TypeVar

from .errors import PolicyError

_METHODS: dict[str, type] = {}
T = TypeVar("T", bound=type)


def register(name: str) -> Callable[[T], T]:
    """Class decorator: make a method available to policies under ``name``."""

    def deco(cls: T) -> T:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method name {name!r} is already registered to {_METHODS[name].__qualname__}")
        _METHODS[name] = cls
        cls.method_name = name
        return cls

    return deco


def get_method(name: str) -> type:
    _load_builtins()
    try:
        return _METHODS[name]
    except KeyError:
        raise PolicyError(f"unknown method {name!r}; expected one of: {', '.join(available())}") from None


def available() -> list[str]:
    _load_builtins()
    return sorted(_METHODS)


def _load_builtins() -> None:
    from . import pruners, reweight  # noqa: F401  (importing registers the built-in methods)
    from . import sparse  # noqa: F401  (mminference)
