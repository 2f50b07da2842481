"""Every command-line mistake is one ``vlmfast: error: ...`` line and exit code 2 (issues 22 and 23): bad options,
bad paths, a busy port, any exception while loading a model; ``--debug`` shows the traceback instead."""

from __future__ import annotations

import socket

import pytest

from vlmfast.cli import main


def _run(argv, capsys) -> tuple[int, list[str], str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse: --help, and its own errors
        rc = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return rc, [ln for ln in out.err.splitlines() if ln.strip()], out.out


@pytest.mark.parametrize("argv, message", [
    (["bench", "prefill", "--repeats", "0"], "argument --repeats: expected an integer >= 1, got '0'"),
    (["bench", "prefill", "--keep", "0"], "argument --keep: expected a fraction in (0, 1], got '0'"),
    (["bench", "prune", "--keep", "1.5"], "expected a fraction in (0, 1], got '1.5'"),
    (["eval", "shapes", "--limit", "0"], "argument --limit: expected an integer >= 1, got '0'"),
    (["eval", "shapes", "--batch-size", "0"], "argument --batch-size: expected an integer >= 1"),
    (["eval", "hallucination", "--repeats", "x"], "argument --repeats: expected an integer >= 1, got 'x'"),
    (["search", "--model", "m", "--out", "o.yaml", "--budget", "2"], "argument --budget: expected a fraction"),
    (["demo", "--port", "99999"], "expected a port number in 1-65535"),
    (["generate", "--model", "tiny-random-llava", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", "--prompt", "hi"], "the following arguments are required: --model"),
    (["nosuch"], "invalid choice: 'nosuch'"),
    (["generate", "--model", "/no/such/folder", "--prompt", "hi"], "no such folder '/no/such/folder'"),
    (["generate", "--model", "tiny-random-llava", "--prompt", "hi", "--image", "/no/such.png"], "cannot open image"),
    (["generate", "--model", "tiny-random-llava", "--prompt", "hi", "--policy", "nope"], "neither a shipped policy"),
    (["generate", "--model", "tiny-random-llava", "--prompt", "  "], "prompt is empty"),
])
def test_a_bad_option_or_path_is_one_error_line(argv, message, capsys):
    rc, err, _ = _run(argv, capsys)
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("vlmfast: error: "), err
    assert message in err[0]


def test_every_help_prints(capsys):
    for argv in (["--help"], ["bench", "--help"], ["bench", "prune", "--help"], ["eval", "shapes", "--help"],
                 ["search", "--help"], ["demo", "--help"]):
        rc, err, out = _run(argv, capsys)
        assert rc == 0 and not err and "usage:" in out, argv  # `bench --help` crashed on a '%' in a help string


def test_a_busy_port_is_refused_before_the_model_loads(capsys, monkeypatch):
    from vlmfast.demo import engine

    def no_load(*a, **k):
        raise AssertionError("the model must not load when the port is taken")

    monkeypatch.setattr(engine.DemoEngine, "load", staticmethod(no_load))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        rc, err, _ = _run(["demo", "--model", "tiny-random-llava", "--port", str(port)], capsys)
    assert rc == 2 and len(err) == 1 and f"cannot serve on 127.0.0.1:{port}" in err[0] and "--port" in err[0]


def test_any_exception_while_loading_is_one_line_and_debug_shows_the_traceback(capsys, monkeypatch):
    from transformers import AutoProcessor

    def broken(*a, **k):
        raise ValueError("a processor config this transformers cannot read\n(second line)")

    monkeypatch.setattr(AutoProcessor, "from_pretrained", broken)
    argv = ["generate", "--model", "tiny-random-llava", "--prompt", "hi"]
    rc, err, _ = _run(argv, capsys)
    assert rc == 2 and len(err) == 1
    assert err[0] == ("vlmfast: error: ValueError: a processor config this transformers cannot read (second line) "
                      "(--debug shows the traceback)")
    with pytest.raises(ValueError, match="cannot read"):
        main(["--debug", *argv])
    monkeypatch.setenv("VLMFAST_DEBUG", "1")
    with pytest.raises(ValueError, match="cannot read"):
        main(argv)
