"""The vlmfast logger is quiet by default (WARNING, as transformers') and VLMFAST_VERBOSITY switches it."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

import vlmfast
from vlmfast._logging import setup_logging


def test_importing_vlmfast_leaves_its_logger_at_warning():
    env = {k: v for k, v in os.environ.items() if k != "VLMFAST_VERBOSITY"}
    p = subprocess.run([sys.executable, "-c", "import logging, vlmfast; print(logging.getLogger('vlmfast').level)"],
                       env=env, capture_output=True, text=True, check=True)
    assert int(p.stdout.strip()) == logging.WARNING


def _unconfigured() -> logging.Logger:
    """The vlmfast logger as before setup_logging ran. Called inside the test: pytest adds its capture handlers to
    the logger around each test phase."""
    log = logging.getLogger("vlmfast")
    log.handlers.clear()
    log.setLevel(logging.NOTSET)
    return log


@pytest.fixture
def fresh_logger():
    """Restores the vlmfast logger after the test."""
    log = logging.getLogger("vlmfast")
    saved = (list(log.handlers), log.level, log.propagate)
    yield log
    log.handlers[:] = saved[0]
    log.setLevel(saved[1])
    log.propagate = saved[2]


@pytest.mark.parametrize("value, level", [("info", logging.INFO), ("DEBUG", logging.DEBUG), (" error ", logging.ERROR),
                                          ("", logging.WARNING)])
def test_the_environment_switch_sets_the_level(fresh_logger, monkeypatch, value, level):
    monkeypatch.setenv("VLMFAST_VERBOSITY", value)
    _unconfigured()
    setup_logging()
    assert fresh_logger.level == level and len(fresh_logger.handlers) == 1


def test_a_bad_level_warns_and_stays_quiet(fresh_logger, monkeypatch, capsys):
    monkeypatch.setenv("VLMFAST_VERBOSITY", "loud")
    _unconfigured()
    setup_logging()
    assert fresh_logger.level == logging.WARNING
    assert "VLMFAST_VERBOSITY='loud' is not a level" in capsys.readouterr().err


def test_an_application_configured_logger_is_left_alone(fresh_logger, monkeypatch):
    own = logging.NullHandler()
    _unconfigured().addHandler(own)
    fresh_logger.setLevel(logging.DEBUG)
    monkeypatch.setenv("VLMFAST_VERBOSITY", "error")
    setup_logging()
    assert fresh_logger.handlers == [own] and fresh_logger.level == logging.DEBUG


def test_set_verbosity():
    log = logging.getLogger("vlmfast")
    before = log.level
    try:
        vlmfast.set_verbosity("info")
        assert log.level == logging.INFO
        vlmfast.set_verbosity(logging.ERROR)
        assert log.level == logging.ERROR
        with pytest.raises(vlmfast.InputError, match="expected one of debug, info"):
            vlmfast.set_verbosity("loud")
    finally:
        log.setLevel(before)
