"""The search objective: VFlowOpt's visual-information flow, measured batch by batch, with budget and accuracy.

For every calibration sample the policy's run is compared with the unpruned model's: the **cosine similarity
of the last prompt token's final hidden state** (the final norm's output that the LM head reads at prefill)
with vs. without the policy, NaN counted as 0 (``vflowopt.flow_objective``, VFlowOpt's objective). The
objective of a policy is its mean over the samples; the search maximises it.

Beside it, per sample: the **visual share** the policy spent (the budget's unit, below) from the run's
``Stats``, and the answer, scored against the sample's answer when the data has one.

Visual share of one sample = the share of its visual tokens present in each decoder layer, averaged over the
layers: ``Stats.layer_avg_visual_tokens / Stats.visual_tokens_in``. Vision pruners give their keep ratio in
every layer; layer pruners (FastV, PyramidDrop, VFlowOpt's LLM stages) count the full share before their
first drop layer. ZipVL shortens nothing: in each layer from ``first_layer`` on only its important set takes
part in attention, so its share there is the reported ``important_share`` (ZipVL's own "ratio", over all
prompt tokens, text included; a conservative stand-in for the visual share), and 1 in the layers before.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..datasets.shapes.metrics import normalize_answer
from ..policy import Policy
from ..pruners.vflowopt import flow_objective
from ..stats import Stats
from .data import Sample

YES_NO_TYPES = {"left_of", "pope", "yes_no"}


@contextmanager
def last_hidden(model) -> Iterator[list]:
    """Collect, per call of the model's LM head during the ``with`` block, its input at the last position.

    vlmfast's prefill asks for the logits of the last position only, so the first entry of a ``generate``
    call is the (B, hidden) final hidden state of the last prompt token. The hook is removed on exit."""
    seen: list[torch.Tensor] = []

    def hook(module, args):
        seen.append(args[0][:, -1].detach().float().clone())

    handle = model.get_output_embeddings().register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def visual_share(stats: Stats, policy: Policy) -> float:
    """The budget's unit for one sample (module docstring)."""
    if not stats.visual_tokens_in:
        return 0.0
    per_layer = [v / stats.visual_tokens_in for v in stats.visual_tokens_per_layer] or \
                [stats.visual_tokens_kept / stats.visual_tokens_in]
    for st in stats.stages:
        if "important_share" in st:
            first = next((getattr(m, "first_layer", 0) for m in policy.attention_methods
                          if m.method_name == st["method"]), 0)
            per_layer = [p * (st["important_share"] if i >= first else 1.0) for i, p in enumerate(per_layer)]
    return sum(per_layer) / len(per_layer)


def is_correct(pred: str, sample: Sample) -> bool | None:
    if sample.answer is None:
        return None
    yn = sample.type in YES_NO_TYPES
    return normalize_answer(pred, yes_no=yn) == normalize_answer(sample.answer, yes_no=yn)


@dataclass
class BatchResult:
    hidden: torch.Tensor
    """(B, hidden) last prompt token's final hidden state"""
    answers: list[str]
    shares: list[float]
    visual_tokens: list[float]
    """layer-averaged visual tokens per sample"""
    prefill_s: list[float]


def run_batch(acc, batch: list[Sample], max_new_tokens: int) -> BatchResult:
    with last_hidden(acc.model) as seen:
        outs = acc.generate(images=[s.images for s in batch], prompt=[s.prompt for s in batch],
                            max_new_tokens=max_new_tokens)
    if not seen:
        raise RuntimeError("the LM head was never called; cannot read the final hidden state")
    return BatchResult(seen[0], [o.text for o in outs], [visual_share(o.stats, acc.policy) for o in outs],
                       [o.stats.layer_avg_visual_tokens for o in outs], [o.stats.prefill_s for o in outs])


@dataclass
class Running:
    """Per-sample results accumulated over batches."""

    similarity: list[float] = field(default_factory=list)
    shares: list[float] = field(default_factory=list)
    visual_tokens: list[float] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)
    prefill_s: list[float] = field(default_factory=list)

    def add(self, res: BatchResult, reference: torch.Tensor, batch: list[Sample]) -> None:
        for i, s in enumerate(batch):
            self.similarity.append(flow_objective(reference[i:i + 1], res.hidden[i:i + 1]))
            c = is_correct(res.answers[i], s)
            if c is not None:
                self.correct.append(c)
        self.shares += res.shares
        self.visual_tokens += res.visual_tokens
        self.prefill_s += res.prefill_s

    @staticmethod
    def _mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    @property
    def objective(self) -> float:
        return self._mean(self.similarity)

    @property
    def share(self) -> float:
        return self._mean(self.shares)

    @property
    def accuracy(self) -> float | None:
        return self._mean(self.correct) if self.correct else None

    def summary(self) -> dict:
        return {"objective": round(self.objective, 6), "visual_share": round(self.share, 6),
                "visual_tokens": round(self._mean(self.visual_tokens), 3),
                "accuracy": None if self.accuracy is None else round(self.accuracy, 6),
                "prefill_s": round(self._mean(self.prefill_s), 6), "n": len(self.similarity)}
