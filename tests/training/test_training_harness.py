"""training/harness.py, what the trainers share: the schedule's known values, the common options, checkpoints that
load with ``weights_only=True``, the log cut back on resume, the time budget. CPU only, about a second."""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import pytest
import torch

from training.harness import (
    Budget,
    Run,
    add_optim_args,
    add_run_args,
    load_checkpoint,
    lr_at,
    parse_overrides,
    rng_state,
    save_checkpoint,
    set_lr,
    set_rng_state,
)


def _args(tmp_path, *extra: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_run_args(p, minutes=5.0, steps=4)
    add_optim_args(p, lr=1e-2, warmup=1, weight_decay=0.0, eval_every=2, eval_scenes=1)
    return p.parse_args(["--out", str(tmp_path / "run"), "--ckpt-every", "2", *extra])


class _Cfg:
    def to_dict(self) -> dict:
        return {"width": 3, "mean": [0.5, 0.5, 0.5], "name": "tiny"}


def _model_and_opt():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.98))
    model(torch.ones(1, 3)).sum().backward()
    opt.step()  # so the optimizer has state (exp_avg, step) to save
    return model, opt


def test_lr_at_known_values():
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)  # warm-up: (step + 1) / warmup of the peak
    assert lr_at(9, 100, 1.0, 10) == 1.0
    assert lr_at(10, 100, 1.0, 10) == 1.0  # cosine from the peak ...
    assert lr_at(55, 100, 1.0, 10) == pytest.approx(0.05 + 0.95 * 0.5)  # ... half-way ...
    assert lr_at(100, 100, 1.0, 10) == pytest.approx(0.05)  # ... to final_frac * peak, and it stays there
    assert lr_at(150, 100, 1.0, 10) == pytest.approx(0.05)
    assert lr_at(0, 500, 1e-3, 60) == pytest.approx(1e-3 / 60)  # train_clip's defaults
    assert lr_at(2800, 2800, 4e-4, 150) == pytest.approx(2e-5)  # train_sam's last step
    # train_llava: final_frac 0.1, the formula it had before the harness, to the bit
    for step in (0, 199, 200, 201, 1000, 2799, 2800):
        t = (step - 200) / 2600
        old = 6e-4 * (step + 1) / 200 if step < 200 else 6e-4 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1, t))))
        assert lr_at(step, 2800, 6e-4, 200, final_frac=0.1) == old
    assert lr_at(0, 5, 1.0, 0) == 1.0  # no warm-up
    assert lr_at(3, 5, 1.0, 0) == pytest.approx(0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 0.6)))


def test_common_options_and_defaults(tmp_path):
    a = _args(tmp_path)
    assert (a.minutes, a.seed, a.resume, a.steps) == (5.0, 0, False, 4)
    assert (a.lr, a.warmup, a.weight_decay, a.clip, a.threads, a.ckpt_every, a.eval_every, a.eval_scenes) == (
        1e-2, 1, 0.0, 1.0, 1, 2, 2, 1)
    assert parse_overrides("") == {}
    assert parse_overrides('depth=2, pool_type="tok",rel_pos=True,x=1.5') == {
        "depth": 2, "pool_type": "tok", "rel_pos": True, "x": 1.5}


def test_trainers_keep_their_options():
    from training import train_clip, train_sam

    clip = vars(train_clip.parse_args(["--out", "o"]))
    assert clip == {"out": "o", "minutes": 20.0, "seed": 0, "resume": False, "steps": 500, "batch": 64, "lr": 1e-3,
                    "warmup": 60, "weight_decay": 0.1, "clip": 1.0, "threads": 1, "ckpt_every": 100,
                    "eval_every": 150, "eval_scenes": 50, "final_scenes": 200, "config": ""}
    sam = vars(train_sam.parse_args(["--out", "o"]))
    assert sam == {"out": "o", "minutes": 60.0, "seed": 0, "resume": False, "steps": 2800, "images": 4,
                   "prompts": 8, "lr": 4e-4, "warmup": 150, "weight_decay": 0.05, "clip": 1.0, "threads": 1,
                   "ckpt_every": 100, "eval_every": 250, "eval_scenes": 25, "test_scenes": 200, "config": ""}


def test_checkpoint_loads_with_weights_only_and_restores(tmp_path):
    run = Run(_args(tmp_path))
    model, opt = _model_and_opt()
    run.begin(model, opt, None)
    run.step = 2
    run.log.append({"step": 2, "loss": 0.5, "dev_point": 0.25})
    np.random.seed(7)
    np.random.rand()
    run.save(model, opt, _Cfg())
    assert not list(run.out.glob("*.tmp"))  # written through a temporary file, then renamed
    ckpt = torch.load(run.ckpt_path, weights_only=True)  # no pickled Namespace, numpy array or class
    assert set(ckpt) == {"model", "optimizer", "step", "elapsed_s", "rng", "args", "config", "log"}
    assert ckpt["step"] == 2 and ckpt["config"] == _Cfg().to_dict() and ckpt["log"] == run.log
    assert ckpt["args"] == vars(run.args) and isinstance(ckpt["args"], dict)
    expected = (np.random.rand(3), torch.rand(3))

    run2 = Run(_args(tmp_path, "--resume"))
    model2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2, betas=(0.9, 0.98))
    run2.begin(model2, opt2, run2.load())
    assert run2.step == 2 and run2.log == run.log and run2.budget.before_s == ckpt["elapsed_s"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    assert np.array_equal(np.random.rand(3), expected[0]) and torch.equal(torch.rand(3), expected[1])  # RNG states


def test_rng_state_round_trip(tmp_path):
    np.random.seed(3)
    torch.manual_seed(3)
    np.random.randn()  # numpy caches the second gaussian: that is part of its state too
    save_checkpoint(tmp_path / "s.pt", {"rng": rng_state()})
    expected = np.random.randn(4), torch.rand(4)
    set_rng_state(load_checkpoint(tmp_path / "s.pt")["rng"])
    assert np.array_equal(np.random.randn(4), expected[0]) and torch.equal(torch.rand(4), expected[1])


def test_missing_checkpoint_is_reported(tmp_path, capsys):
    assert Run(_args(tmp_path, "--resume")).load() is None
    assert "--resume: no checkpoint at" in capsys.readouterr().err


@pytest.mark.parametrize("name, needs", [("train_clip", None), ("train_sam", "segment_anything")])
def test_trainers_exit_2_on_resume_without_checkpoint(tmp_path, capsys, name, needs):
    import importlib

    if needs:
        pytest.importorskip(needs)
    threads = torch.get_num_threads()
    try:
        rc = importlib.import_module(f"training.{name}").main(["--out", str(tmp_path), "--resume"])
    finally:
        torch.set_num_threads(threads)  # main() sets --threads
    assert rc == 2
    assert f"--resume: no checkpoint at {tmp_path / 'checkpoint.pt'}" in capsys.readouterr().err


def test_log_is_cut_back_to_the_checkpoint_on_resume_and_removed_on_a_fresh_run(tmp_path):
    run = Run(_args(tmp_path))
    model, opt = _model_and_opt()
    run.begin(model, opt, None)
    for step in (1, 2, 3):  # --ckpt-every 2: a checkpoint after step 2, then a crash after step 3
        run.step = step
        run.end_step({"step": step}, model, opt, _Cfg())
    assert len(run.log_path.read_text().splitlines()) == 3
    run2 = Run(_args(tmp_path, "--resume"))
    run2.begin(model, opt, run2.load())
    assert run2.step == 2
    assert [json.loads(x)["step"] for x in run2.log_path.read_text().splitlines()] == [1, 2]
    fresh = Run(_args(tmp_path))
    fresh.begin(model, opt, None)
    assert fresh.log_path.read_text() == ""


def test_budget_eval_due_and_finish(tmp_path, capsys):
    assert not Budget(None).spent() and not Budget(1.0).spent()
    assert Budget(0.0, start=time.monotonic() - 1).spent()
    assert Budget(None, before_s=60).elapsed() >= 60
    run = Run(_args(tmp_path, "--minutes", "0"))
    model, opt = _model_and_opt()
    run.begin(model, opt, None)
    assert not run.next_step() and run.stopped_early  # a zero-minute budget stops before the first step
    assert run.finish(model, opt, _Cfg()) is False
    assert "stopped at step 0/4 after 0.0 min; continue with --resume" in capsys.readouterr().err
    assert load_checkpoint(run.ckpt_path)["step"] == 0

    run = Run(_args(tmp_path))  # --eval-every 2, --steps 4
    due = []
    while run.next_step():
        run.step += 1
        due.append(run.eval_due())
    assert due == [False, True, False, True] and not run.stopped_early
    assert set_lr(opt, 0.125) == 0.125 and all(g["lr"] == 0.125 for g in opt.param_groups)
