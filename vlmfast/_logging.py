"""The ``vlmfast`` logger: WARNING by default, like transformers; ``VLMFAST_VERBOSITY`` (debug, info, warning,
error, critical) or :func:`set_verbosity` changes it. An application that configured the logger itself keeps
its own handlers and level."""

from __future__ import annotations

import logging
import os

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
          "critical": logging.CRITICAL}
ENV = "VLMFAST_VERBOSITY"
_DEFAULT = logging.WARNING


def _env_level() -> int:
    value = os.environ.get(ENV, "").strip().lower()
    if not value:
        return _DEFAULT
    if value not in LEVELS:
        logging.getLogger("vlmfast").warning("vlmfast: %s=%r is not a level; expected one of %s (using warning)",
                                             ENV, value, ", ".join(LEVELS))
        return _DEFAULT
    return LEVELS[value]


def setup_logging() -> None:
    """Give the ``vlmfast`` logger a stderr handler at the environment's level unless the application did."""
    log = logging.getLogger("vlmfast")
    if not log.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(h)
        log.propagate = False
        log.setLevel(_env_level())


def set_verbosity(level: int | str) -> None:
    """Set the ``vlmfast`` logger's level: a ``logging`` level or one of debug / info / warning / error /
    critical."""
    if isinstance(level, str):
        if level.lower() not in LEVELS:
            from .errors import InputError

            raise InputError(f"verbosity {level!r}: expected one of {', '.join(LEVELS)} (or a logging level)")
        level = LEVELS[level.lower()]
    logging.getLogger("vlmfast").setLevel(level)
