"""Decode branches: DAMRO's outlier-only view and AGLA's augmented image, each a full second request through the
language model with **its own KV cache** (never shared, never aliased), decoded in lock-step with the main one.

Per request: ``Branches(request, policy)`` holds the request (:class:`vlmfast.request.Request`: DAMRO reads the
tower's own features and [CLS] attention in ``request.encoded.visual``, AGLA re-encodes its augmented images with
``request.encode``); ``prefill()`` runs after the main prefill, inside the main call's attention installation;
every decode step ``combine(main_logits)`` gives the logits the token is chosen from and ``step(tokens)`` feeds
the chosen tokens to every branch (:func:`vlmfast.request.decode_step`, each branch with its own cache).
Weights: main 1 + sum(DAMRO alpha); DAMRO's branch -alpha; AGLA's branch +alpha; the plausibility cutoff uses
the largest beta, against the main branch. Each branch forward runs with its own
attention session (VAR in positive branches only; spec §7.2), so the main call's observers and wrappers
(grounding capture, VAR's main-branch sinks) never see a branch.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch

from .. import attention
from .._compat import cache_of
from ..request import Request, decode_step, next_positions, prefill
from .base import BranchInputs, combine


@dataclass
class Branch:
    name: str
    weight: float
    built: BranchInputs
    mask: torch.Tensor
    next_pos: torch.Tensor
    cache: Any = None
    logits: torch.Tensor | None = None
    session: Any = None
    var_run: Any = None
    prefill_s: float = 0.0


class Branches:
    """The extra branches of one request and how their logits combine with the main branch's."""

    def __init__(self, request: Request, policy):
        self.request = request
        self.methods = list(policy.branch_methods)
        self.var = policy.reweighters[0] if policy.reweighters else None
        self.main_weight = 1.0 + sum(m.main_weight() for m in self.methods)
        self.beta = max((m.beta for m in self.methods), default=0.0)
        self.branches: list[Branch] = []

    def prefill(self) -> None:
        """Build and prefill every branch (inside the main call's attention installation)."""
        req = self.request
        adapter, model = req.adapter, req.model
        for m in self.methods:
            t0 = time.perf_counter()
            built = m.build(req)
            seq = built.seq
            br = Branch(name=m.method_name, weight=m.branch_weight(), built=built, mask=seq.mask,
                        next_pos=next_positions(seq.positions, seq.valid))
            if self.var is not None and m.positive_branch:
                br.var_run = self.var.run_for(adapter, built.inputs, seq.image_mask, seq.valid)
                br.session = attention.AttentionSession(base="")
                br.var_run.register(br.session)
            with ExitStack() as stack:
                stack.enter_context(attention.use(model, br.session))
                if br.var_run is not None:
                    stack.enter_context(br.var_run.hooks(adapter.decoder_layers))
                out = prefill(model, adapter, seq)
            br.cache, br.logits = cache_of(out), out.logits[:, -1].float()
            br.prefill_s = time.perf_counter() - t0
            self.branches.append(br)

    def combine(self, main_logits: torch.Tensor) -> torch.Tensor:
        weighted = [(br.weight, br.logits) for br in self.branches if br.logits is not None]
        assert len(weighted) == len(self.branches), "combine() before prefill()"
        return combine(main_logits, weighted, self.main_weight, self.beta)

    def step(self, tokens: torch.Tensor) -> None:
        """Feed the chosen tokens to every branch (each with its own cache, mask and positions)."""
        req = self.request
        for br in self.branches:
            with attention.use(req.model, br.session):
                br.logits, br.mask, br.next_pos = decode_step(req.model, req.adapter, tokens, br.cache, br.mask,
                                                              br.next_pos)

    def report(self, b: int) -> list[dict]:
        rows = []
        own = self.request.own(b)  # branches take images only: sample b's visual inputs are its images
        for br in self.branches:
            built = br.built
            row = {"stage": "decoding", "method": br.name, "layer": None, "branch_weight": br.weight,
                   "main_weight": self.main_weight, "beta": self.beta,
                   "branch_visual_tokens": sum(int(built.kept[i].numel()) for i in own) if built.kept else 0,
                   "branch_prefill_s": round(br.prefill_s, 4)}
            if built.similarity is not None and built.kept_fraction is not None:  # per image (not per view)
                first = sum(len(x) for x in self.request.batch_images[:b])
                mine = range(first, first + len(self.request.batch_images[b]))
                row["similarity"] = [round(built.similarity[i], 4) for i in mine]
                row["kept_fraction"] = [round(built.kept_fraction[i], 4) for i in mine]
            row["summary"] = (f"branch x{br.weight:+g} (main x{self.main_weight:g}, beta {self.beta:g}): "
                              f"{row['branch_visual_tokens']} visual tokens; {built.info}; "
                              f"branch prefill {br.prefill_s:.3f} s")
            if br.var_run is not None:
                row["var"] = br.var_run.report(b)
            rows.append(row)
        return rows
