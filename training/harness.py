"""What the trainers of the tiny embedded models share: options, learning-rate schedule, checkpoints, time budget.

``train_clip`` and ``train_sam`` run the same loop: :func:`add_run_args` / :func:`add_optim_args` give their
common options, a :class:`Run` keeps the step, the wall clock, ``OUT/train_log.jsonl`` and
``OUT/checkpoint.pt`` (``--resume``), and only the batch, the loss and the evaluation are their own.
``train_llava`` has its own two-stage loop and uses the pieces: :func:`lr_at`, :func:`optimizer_step`,
:func:`save_checkpoint` / :func:`load_checkpoint` and a :class:`Budget`.

A checkpoint holds only what ``torch.load(..., weights_only=True)`` accepts: tensors, optimizer state, numbers,
strings and plain dicts and lists (a config as its ``to_dict()``, the arguments as a dict, numpy's RNG state
as :func:`rng_state` stores it), and :func:`load_checkpoint` loads it that way.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

# --------------------------------------------------------------------------- command line


def add_run_args(p: argparse.ArgumentParser, *, minutes: float, steps: int) -> None:
    """``--out --minutes --seed --resume --steps``: where a run writes, how long one invocation may take, how
    many optimizer steps the schedule has."""
    p.add_argument("--out", required=True, help="output folder (checkpoint, log, weights)")
    p.add_argument("--minutes", type=float, default=minutes, help="wall-clock cap of this invocation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--steps", type=int, default=steps, help="total optimizer steps (the schedule length)")


def add_optim_args(p: argparse.ArgumentParser, *, lr: float, warmup: int, weight_decay: float, eval_every: int,
                   eval_scenes: int) -> None:
    """``--lr --warmup --weight-decay --clip --threads --ckpt-every --eval-every --eval-scenes``."""
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--weight-decay", type=float, default=weight_decay)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=eval_every)
    p.add_argument("--eval-scenes", type=int, default=eval_scenes, help="dev scenes per periodic evaluation")


def parse_overrides(text: str) -> dict:
    """``--config`` text, ``"depth=2,pool_type=\\"tok\\""`` -> ``{"depth": 2, "pool_type": "tok"}``: each value is
    JSON, or Python's ``True`` / ``False``."""
    kw = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, value = item.split("=", 1)
        kw[key] = json.loads(value) if value not in ("True", "False") else value == "True"
    return kw


# --------------------------------------------------------------------------- optimisation


def lr_at(step: int, total: int, peak: float, warmup: int, final_frac: float = 0.05) -> float:
    """Linear warmup to ``peak`` over ``warmup`` steps, then cosine decay to ``final_frac * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def adamw(named_params, *, lr: float, weight_decay: float, betas: tuple[float, float], decays) -> torch.optim.AdamW:
    """AdamW over ``named_params`` (``(name, parameter)`` pairs) in two groups: ``weight_decay`` on those for
    which ``decays(name, parameter)``, none on the rest."""
    named = list(named_params)
    decay = [p for n, p in named if decays(n, p)]
    rest = [p for n, p in named if not decays(n, p)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=betas)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> float:
    """Set every parameter group's learning rate to ``lr``; returns it."""
    for g in opt.param_groups:
        g["lr"] = lr
    return lr


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, params, clip: float) -> None:
    """Backpropagate ``loss`` and step ``opt``, clipping the gradient norm of ``params`` to ``clip`` (0: no
    clipping)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, state: dict) -> None:
    """``torch.save(state)`` to ``path`` through a temporary file next to it, so a crash never leaves half of
    one."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by :func:`save_checkpoint`, on the CPU, with ``weights_only=True``."""
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict:
    """torch's and numpy's global RNG states; numpy's (a tuple holding an array) as a dict of a tensor and
    numbers, which ``weights_only=True`` loads."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": {"bit_generator": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}}


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["bit_generator"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))


# --------------------------------------------------------------------------- the loop's bookkeeping


@dataclass
class Budget:
    """The wall clock of a run: ``minutes`` caps this invocation (None: no cap); ``before_s`` is the training
    time of the invocations before it (restored on ``--resume``)."""

    minutes: float | None
    before_s: float = 0.0
    start: float = field(default_factory=time.monotonic)

    def seconds(self) -> float:
        """Seconds since this invocation started."""
        return time.monotonic() - self.start

    def elapsed(self) -> float:
        """Training seconds of the whole run, earlier invocations included."""
        return self.before_s + self.seconds()

    def spent(self) -> bool:
        """Is this invocation past its cap?"""
        return self.minutes is not None and self.seconds() > 60 * self.minutes


class Run:
    """One invocation of a trainer built on :func:`add_run_args` and :func:`add_optim_args`.

    It applies ``--threads``, creates ``--out`` and starts the clock (``--minutes``); it loads
    ``OUT/checkpoint.pt`` for ``--resume`` (:meth:`load`), restores it and prepares ``OUT/train_log.jsonl``
    (:meth:`begin`), says when to step and to evaluate (:meth:`next_step`, :meth:`eval_due`), writes each step's
    record and the periodic checkpoints (:meth:`end_step`) and the last checkpoint (:meth:`finish`). The
    checkpoint holds ``model``, ``optimizer``, ``step``, ``elapsed_s``, ``rng``, ``args``, ``config`` and
    ``log``: the records that carry an evaluation.
    """

    def __init__(self, args: argparse.Namespace):
        self.args = args
        torch.set_num_threads(args.threads)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt_path = self.out / "checkpoint.pt"
        self.log_path = self.out / "train_log.jsonl"
        self.budget = Budget(args.minutes)
        self.step = 0
        self.log: list[dict] = []
        self.stopped_early = False

    def elapsed(self) -> float:
        """Training seconds of the whole run (earlier invocations included)."""
        return self.budget.elapsed()

    def load(self) -> dict | None:
        """The checkpoint to resume from, or None, after saying so on stderr, when there is none."""
        if not self.ckpt_path.is_file():
            print(f"--resume: no checkpoint at {self.ckpt_path}", file=sys.stderr)
            return None
        return load_checkpoint(self.ckpt_path)

    def begin(self, model: torch.nn.Module, opt: torch.optim.Optimizer, ckpt: dict | None) -> None:
        """Restore ``model``, ``opt``, the step, the clock, the log and the RNG states from ``ckpt`` (None: a
        fresh run), and start ``train_log.jsonl``: cut back to the checkpoint's step on resume (dropping the
        records of a crashed invocation), empty on a fresh run."""
        kept = []
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            self.step, self.budget.before_s, self.log = ckpt["step"], ckpt["elapsed_s"], ckpt.get("log", [])
            set_rng_state(ckpt["rng"])
            print(f"resumed from {self.ckpt_path} at step {self.step} ({self.budget.before_s / 60:.1f} min trained)",
                  file=sys.stderr)
            if self.log_path.is_file():
                lines = self.log_path.read_text().splitlines()
                kept = [ln for ln in lines if ln and json.loads(ln)["step"] <= self.step]
        self.log_path.write_text("".join(ln + "\n" for ln in kept))

    def next_step(self) -> bool:
        """Is there a step to take? False at ``--steps``, or when ``--minutes`` is spent (then
        :attr:`stopped_early`)."""
        if self.step >= self.args.steps:
            return False
        if self.budget.spent():
            self.stopped_early = True
            return False
        return True

    def eval_due(self) -> bool:
        """Evaluate after this step? Every ``--eval-every`` steps and at the last (neither when
        ``--eval-every`` or ``--eval-scenes`` is 0)."""
        a = self.args
        return a.eval_every > 0 and a.eval_scenes > 0 and (self.step % a.eval_every == 0 or self.step == a.steps)

    def state(self, model: torch.nn.Module, opt: torch.optim.Optimizer, cfg) -> dict:
        """The checkpoint's contents (``cfg`` has a ``to_dict()``)."""
        return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": self.step,
                "elapsed_s": self.elapsed(), "rng": rng_state(), "args": dict(vars(self.args)),
                "config": cfg.to_dict(), "log": self.log}

    def save(self, model: torch.nn.Module, opt: torch.optim.Optimizer, cfg) -> None:
        save_checkpoint(self.ckpt_path, self.state(model, opt, cfg))

    def end_step(self, record: dict, model: torch.nn.Module, opt: torch.optim.Optimizer, cfg) -> None:
        """Append the step's ``record`` to ``train_log.jsonl``; save the checkpoint every ``--ckpt-every``
        steps."""
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.step % self.args.ckpt_every == 0:
            self.save(model, opt, cfg)

    def finish(self, model: torch.nn.Module, opt: torch.optim.Optimizer, cfg) -> bool:
        """Save the last checkpoint; True when the schedule is done, False (after saying how to continue) when
        ``--minutes`` stopped it first."""
        self.save(model, opt, cfg)
        if self.stopped_early:
            print(f"stopped at step {self.step}/{self.args.steps} after {self.args.minutes} min; continue with "
                  "--resume", file=sys.stderr)
        return not self.stopped_early
