"""Name -> method class. Third-party methods register the same way the built-in ones do.

    from vlmfast import VisionPruner, method_dataclass, register

    @register("mypruner")
    @method_dataclass
    class MyPruner(VisionPruner):
        keep: float = 0.25
        def select(self, image): ...

The registry imports no method: each method module registers itself when imported, and the package root
(``vlmfast/__init__.py``) imports every built-in one, so ``import vlmfast`` (which any ``vlmfast.*`` import runs
first) fills the registry before a policy can name a method.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, TypeVar

from .errors import PolicyError

if TYPE_CHECKING:
    from .method import Method

_METHODS: dict[str, type[Method]] = {}
T = TypeVar("T", bound="type[Method]")


def register(name: str) -> Callable[[T], T]:
    """Class decorator: make a method available to policies under ``name``."""

    def deco(cls: T) -> T:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method name {name!r} is already registered to {_METHODS[name].__qualname__}")
        _METHODS[name] = cls
        cls.method_name = name
        return cls

    return deco


def get_method(name: str) -> type[Method]:
    try:
        return _METHODS[name]
    except KeyError:
        raise PolicyError(f"unknown method {name!r}; expected one of: {', '.join(available())}") from None


def available() -> list[str]:
    return sorted(_METHODS)
