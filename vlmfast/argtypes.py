"""argparse value types with the range in the error (``--repeats 0``: "expected an integer >= 1, got '0'"), and
a parser whose every error is one ``vlmfast: error: ...`` line with exit code 2. Used by every command line of
the package (cli, demo, search, eval, lmms-eval task export)."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


def _int(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _int(text, 1, "an integer >= 1")


def nonnegative_int(text: str) -> int:
    return _int(text, 0, "an integer >= 0")


def port(text: str) -> int:
    value = _int(text, 1, "a port number in 1-65535")
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number in 1-65535, got {text!r}")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value:  # NaN
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A share in (0, 1] (keep ratios, budgets, recall targets)."""
    value = _float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return value


def nonnegative_float(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, ``vlmfast: error: <prog>: <message>``, exit code 2 (the usage
    is one ``--help`` away); its subparsers are Parsers too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"vlmfast: error: {self.prog}: {message} (see {self.prog} --help)\n")


def one_line(text: str) -> str:
    """An error message on one line."""
    return " ".join(str(text).split())


def fail(message: str) -> int:
    print(f"vlmfast: error: {one_line(message)}", file=sys.stderr)
    return 2
