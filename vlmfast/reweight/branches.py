"""Decode branches: DAMRO's outlier-only view and AGLA's augmented image, each a full second request through the
language model with **its own KV cache** (never shared, never aliased), decoded in lock-step with the main one.

Per request (``VLMAccelerator._run``): ``Branches(...)`` is created after the vision tower ran and before the
vision pruner rewrites the features (DAMRO reads the original features and the tower's [CLS] attention);
``prefill()`` runs after the main prefill, inside the main call's attention installation; every decode step
``combine(main_logits)`` gives the logits the token is chosen from and ``step(tokens)`` feeds the chosen tokens
to every branch. Weights: main 1 + sum(DAMRO alpha); DAMRO's branch -alpha; AGLA's branch +alpha; the
plausibility cutoff uses the largest beta, against the main branch. Each branch forward runs with its own
attention session (VAR in positive branches only; spec §7.2), so the main call's observers and wrappers
(grounding capture, VAR's main-branch sinks) never see a branch.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import attention
from .._compat import cache_of
from .base import combine


def vision_attention_layer(policy, adapter) -> int | None:
    """The vision layer whose attention the request captures: the vision pruner's (when it needs attention), else
    DAMRO's, else None. Raises PolicyError when both need attention from different layers (one is captured)."""
    from ..errors import PolicyError

    vp = policy.vision_pruners[0] if policy.vision_pruners else None
    layer = adapter.resolve_vision_layer(vp.attention_layer()) if vp and vp.needs_attention else None
    for m in policy.branch_methods:
        if not m.needs_vision_attention:
            continue
        own = adapter.resolve_vision_layer(m.attention_layer())
        if layer is not None and own != layer:
            raise PolicyError(f"{policy.source}: {vp.method_name} reads vision layer {layer} and {m.method_name} "
                              f"vision layer {own}; only one layer's attention is captured per request, so set "
                              f"both to the same layer (None = the layer that feeds the language model)")
        layer = own
    return layer


@dataclass
class Branch:
    name: str
    method: Any
    weight: float
    mask: torch.Tensor
    next_pos: torch.Tensor
    image_mask: torch.Tensor
    cache: Any = None
    logits: torch.Tensor | None = None
    session: Any = None
    var_run: Any = None
    prefill_s: float = 0.0
    built: dict = field(default_factory=dict)


class BranchContext:
    """What a branch method may use to build its branch's inputs (the main request's pieces)."""

    def __init__(self, acc, batch_images, prompts, inputs, images, image_mask, positions, vp, attn_layer):
        self.acc, self.batch_images, self.prompts = acc, batch_images, prompts
        self.inputs, self.image_mask, self.positions = inputs, image_mask, positions
        # the vision pruner rebinds ``features`` on these objects; keep the tower's own features
        self.images = [dataclasses.replace(im) for im in images]
        self.vp, self.attn_layer = vp, attn_layer

    def assemble(self, kept: list[torch.Tensor]):
        """The main request with each image reduced to ``kept`` (its own features, original positions)."""
        return self.acc._assemble(self.inputs, self.images, kept, self.image_mask, self.positions)

    def encode(self, batch_images: list[list]) -> dict:
        """A request with other images and the same prompts, through the same vision stage (the same pruner)."""
        adapter = self.acc.adapter
        saved = adapter.last_attention_s
        try:
            inputs = adapter.prepare(self.acc.processor, batch_images, self.prompts)
            image_mask = adapter.image_token_mask(inputs)
            positions = adapter.positions(inputs)
            images = adapter.image_tokens(inputs, self.attn_layer)
        finally:
            adapter.last_attention_s = saved
        kept = []
        for im in images:
            if self.vp is None:
                kept.append(torch.arange(im.n_tokens, device=im.features.device))
                continue
            res = self.vp.prune(im)
            im.features = im.features.index_copy(0, res.keep, res.features.to(im.features.dtype))
            kept.append(res.keep)
        embeds, mask, positions, image_mask = self.acc._assemble(inputs, images, kept, image_mask, positions)
        return {"embeds": embeds, "mask": mask, "positions": positions, "image_mask": image_mask, "kept": kept,
                "inputs": inputs}


class Branches:
    """The extra branches of one request and how their logits combine with the main branch's."""

    def __init__(self, acc, policy, ctx: BranchContext):
        self.acc = acc
        self.ctx = ctx
        self.methods = list(policy.branch_methods)
        self.var = policy.reweighters[0] if policy.reweighters else None
        self.main_weight = 1.0 + sum(m.main_weight() for m in self.methods)
        self.beta = max((m.beta for m in self.methods), default=0.0)
        self.branches: list[Branch] = []

    def prefill(self) -> None:
        """Build and prefill every branch (inside the main call's attention installation)."""
        acc = self.acc
        adapter, model = acc.adapter, acc.model
        for m in self.methods:
            t0 = time.perf_counter()
            built = m.build(self.ctx)
            mask, positions, image_mask = built["mask"], built["positions"], built["image_mask"]
            valid = mask.bool()
            br = Branch(name=m.method_name, method=m, weight=m.branch_weight(), mask=mask, image_mask=image_mask,
                        next_pos=positions.masked_fill(~valid[None], -1).amax(-1, keepdim=True) + 1, built=built)
            if self.var is not None and m.positive_branch:
                br.var_run = self.var.start(adapter, built.get("inputs", self.ctx.inputs), image_mask, valid)
                br.session = attention.AttentionSession(base="")
                br.var_run.register(br.session, len(adapter.decoder_layers))
            with ExitStack() as stack:
                stack.enter_context(attention.use(model, br.session))
                if br.var_run is not None:
                    stack.enter_context(br.var_run.hooks(adapter.decoder_layers))
                out = model(inputs_embeds=built["embeds"], attention_mask=mask,
                            position_ids=adapter.model_position_ids(positions), use_cache=True, logits_to_keep=1)
            br.cache, br.logits = cache_of(out), out.logits[:, -1].float()
            br.prefill_s = time.perf_counter() - t0
            self.branches.append(br)

    def combine(self, main_logits: torch.Tensor) -> torch.Tensor:
        return combine(main_logits, [(br.weight, br.logits) for br in self.branches], self.main_weight, self.beta)

    def step(self, tokens: torch.Tensor) -> None:
        """Feed the chosen tokens to every branch (each with its own cache, mask and positions)."""
        for br in self.branches:
            with attention.use(self.acc.model, br.session):
                br.logits, br.mask, br.next_pos = self.acc._step(tokens, br.cache, br.mask, br.next_pos)

    def report(self, b: int) -> list[dict]:
        rows = []
        for br in self.branches:
            kept = br.built.get("kept", [])
            first = sum(len(x) for x in self.ctx.batch_images[:b])
            own = range(first, first + len(self.ctx.batch_images[b]))
            row = {"stage": "decoding", "method": br.name, "layer": None, "branch_weight": br.weight,
                   "main_weight": self.main_weight, "beta": self.beta,
                   "branch_visual_tokens": sum(int(kept[i].numel()) for i in own) if kept else 0,
                   "branch_prefill_s": round(br.prefill_s, 4)}
            if "similarity" in br.built:
                row["similarity"] = [round(br.built["similarity"][i], 4) for i in own]
                row["kept_fraction"] = [round(br.built["kept_fraction"][i], 4) for i in own]
            row["summary"] = (f"branch x{br.weight:+g} (main x{self.main_weight:g}, beta {self.beta:g}): "
                              f"{row['branch_visual_tokens']} visual tokens; {br.built.get('info', '')}; "
                              f"branch prefill {br.prefill_s:.3f} s")
            if br.var_run is not None:
                row["var"] = br.var_run.report(b)
            rows.append(row)
        return rows
