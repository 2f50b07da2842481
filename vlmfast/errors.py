"""vlmfast's exceptions: each names what was wrong and what was expected."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class VlmfastError(Exception):
    """Base class of every error vlmfast raises on purpose."""


class PolicyError(VlmfastError, ValueError):
    """A policy (file, dict or object) is invalid: unknown method, bad field, bad value."""

    #: pydantic's own error, set only when a method's field was bad (see ``vlmfast.method.method_dataclass``)
    validation: ValidationError


class UnsupportedModelError(VlmfastError, TypeError):
    """The model's class is not one of the families vlmfast has an adapter for."""


class InputError(VlmfastError, ValueError):
    """A request (images, prompt, generation arguments) is malformed."""
