"""The method contract: what every vlmfast method is, and how it takes part in one request.

A method is a pydantic dataclass whose fields are its hyper-parameters (printable, comparable, serialisable,
searchable; wrong types, out-of-range values and unknown fields fail when it is built). Per request it starts
at most one :class:`Run` from the request's :class:`~vlmfast.request.Request`:

    run = method.start(request)          # None: the method acts only through its stage's own call
    run.register(session)                # attention observers / overrides / wrappers / kernels
    with run.hooks(decoder_layers): ...  # forward pre-hooks for the call, removed after it
    run.transform_cache(cache)           # once, after prefill (ZipVL's KV quantization)
    run.report(b)                        # sample b's row of Stats.stages (None: no row)

The stage a method acts at (``stage``) decides where else the accelerator calls it: a ``vision`` pruner's
``prune`` after the vision tower, a ``layer`` pruner's ``select_layer`` inside the language model, a
``decoding`` method's ``build`` for its decode branch. See docs/architecture.md (Contracts).
"""

from __future__ import annotations

import dataclasses
import sys
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass

from .errors import PolicyError

if sys.version_info >= (3, 11):
    from typing import dataclass_transform
else:  # pydantic depends on typing_extensions
    from typing_extensions import dataclass_transform

if TYPE_CHECKING:
    from .adapters.base import ModelInfo
    from .request import Request

#: Every method dataclass is validated by pydantic: wrong types, out-of-range values and unknown fields fail
#: when the method is built (as a PolicyError naming the field, see :func:`method_dataclass`).
METHOD_CONFIG = ConfigDict(extra="forbid", validate_assignment=True)


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """pydantic's errors as one line: ``where: what (got value); ...``."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        where = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
        got = e.get("input")
        got_s = "" if isinstance(got, dict) else f" (got {got!r})"
        parts.append(f"{where}: {e['msg']}{got_s}")
    return "; ".join(parts)


_C = TypeVar("_C", bound=type)


# dataclass_transform: type checkers see the fields as __init__'s parameters (it only marks the function)
@dataclass_transform(field_specifiers=(dataclasses.field, Field))
def method_dataclass(cls: _C) -> _C:
    """Make ``cls`` a validated method dataclass. Building it (or assigning a field) with a bad value raises a
    :class:`PolicyError` naming the method and the field (``FoPru(keep=0)``: ``fopru.keep: ...``), as loading
    the same value from a policy file does; the error's ``validation`` holds pydantic's own error."""
    dc: Any = dataclass(config=METHOD_CONFIG)(cls)  # the class itself, now a pydantic dataclass
    init, setattr_ = dc.__init__, dc.__setattr__

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except ValidationError as e:
            raise _field_error(type(self), e) from None

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            setattr_(self, name, value)
        except ValidationError as e:
            raise _field_error(type(self), e) from None

    def __repr__(self) -> str:  # the method's own fields; the shared keyword-only ones (view_budget) when set
        fields = [f for f in dataclasses.fields(self) if not f.kw_only or getattr(self, f.name) != f.default]
        fields.sort(key=lambda f: f.kw_only is True)
        return f"{type(self).__name__}({', '.join(f'{f.name}={getattr(self, f.name)!r}' for f in fields)})"

    __init__.__wrapped__ = init  # type: ignore[attr-defined]  # a function attribute: inspect.signature shows the fields
    dc.__init__ = __init__
    dc.__setattr__ = __setattr__
    dc.__repr__ = __repr__
    return dc


def _field_error(cls: type, err: ValidationError) -> PolicyError:
    e = PolicyError(format_validation_error(err, getattr(cls, "method_name", "") or cls.__name__))
    e.validation = err
    return e


class Run:
    """What a method does during one request. Every part is optional; the defaults do nothing."""

    def register(self, session) -> None:
        """Register observers, overrides, wrappers or kernels on the call's attention session."""

    def hooks(self, layers) -> AbstractContextManager:
        """Forward pre-hooks on the decoder layers for the call (a context manager that removes them)."""
        return nullcontext()

    def transform_cache(self, cache) -> None:
        """Rewrite the KV cache once, after prefill."""

    def report(self, b: int) -> dict | None:
        """Sample ``b``'s row of ``Stats.stages`` (None: no row)."""
        return None


@method_dataclass
class Method:
    method_name: ClassVar[str] = ""
    """the name policies use (set by :func:`vlmfast.registry.register`)"""
    stage: ClassVar[str] = ""
    """where the method acts: vision, layer, attention, prefill, reweight or decoding"""

    def check(self, info: ModelInfo) -> None:
        """Validate against a concrete model (layer ranges); raise PolicyError naming the field."""

    def start(self, request: Request) -> Run | None:
        """This method's run for one request (None: nothing to do beyond its stage's own call)."""
        return None
