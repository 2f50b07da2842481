"""The search objectives, measured batch by batch and paired with the unpruned model on the same samples,
with budget and accuracy beside them.

Two objectives (``--objective``; the search maximises the mean over the calibration samples):

* ``answer`` (the default): minus the **KL divergence of the policy's answer distributions from the unpruned
  model's**. For each sample the unpruned model answers greedily (``--max-new-tokens``); both models are then
  teacher-forced on that answer (``VLMAccelerator.loglikelihood``, with the LM head's inputs captured at each
  step and put through the LM head), and the sample's value is ``-sum_t KL(p_unpruned(. | answer_<t) ||
  p_policy(. | answer_<t))`` over the answer's tokens: 0 exactly when the policy's next-token distributions are
  the unpruned model's, negative otherwise (KL is the expected log-probability the policy loses on what the
  full model would say). Continuous and paired: two policies that give the same accuracy on a few samples
  still differ by how far their answer distributions moved, and each sample is compared with itself. It costs
  one teacher-forced pass per batch besides the ``generate`` call. A sample whose unpruned answer is empty is
  left out of this mean.
* ``hidden``: VFlowOpt's visual-information flow, the **cosine similarity of the last prompt token's final
  hidden state** (the final norm's output that the LM head reads at prefill) with vs. without the policy, NaN
  counted as 0 (``vflowopt.flow_objective``). No extra pass.

Both are recorded for every trial when ``answer`` is the objective (``similarity``, ``answer_kl``), and so is
the **agreement** with the unpruned model's answers (the share of samples answered the same, after
normalisation) and the accuracy against the sample's own answer when the data has one; neither of those two is
optimised (on a few dozen samples they are coarse: close policies tie).

Visual share of one sample (the budget's unit) = the share of its visual tokens present in each decoder layer,
averaged over the layers: ``Stats.layer_avg_visual_tokens / Stats.visual_tokens_in``. Vision pruners give
their keep ratio in every layer; layer pruners (FastV, PyramidDrop, VFlowOpt's LLM stages) count the full
share before their first drop layer. ZipVL shortens nothing: in each layer from ``first_layer`` on only its
important set takes part in attention, so its share there is the reported ``important_share`` (ZipVL's own
"ratio", over all prompt tokens, text included; a conservative stand-in for the visual share), and 1 in the
layers before.
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


OBJECTIVES = ("answer", "hidden")
"""``--objective`` choices (module docstring); the first is the default"""


def same_answer(pred: str, answer: str, type_: str) -> bool:
    """Exact match after normalisation (yes/no types: the first word only)."""
    yn = type_ in YES_NO_TYPES
    return normalize_answer(pred, yes_no=yn) == normalize_answer(answer, yes_no=yn)


def is_correct(pred: str, sample: Sample) -> bool | None:
    return None if sample.answer is None else same_answer(pred, sample.answer, sample.type)


def answer_distributions(acc, batch: list[Sample], answers: list[str]) -> list[torch.Tensor | None]:
    """Per sample, the (tokens, vocab) next-token log-probabilities ``acc``'s policy gives at each token of
    ``answers[i]``, teacher-forced (``VLMAccelerator.loglikelihood`` with the LM head's inputs captured: one
    call per answer token); None where the answer is empty."""
    idx = [i for i, a in enumerate(answers) if a.strip()]
    out: list[torch.Tensor | None] = [None] * len(batch)
    if not idx:
        return out
    with last_hidden(acc.model) as seen:
        acc.loglikelihood(images=[batch[i].images for i in idx], prompt=[batch[i].prompt for i in idx],
                          continuation=[answers[i] for i in idx])
    head = acc.model.get_output_embeddings()
    tok = acc.processor.tokenizer
    with torch.no_grad():
        steps = [head(h.to(head.weight.dtype)).float().log_softmax(-1) for h in seen]
    for j, i in enumerate(idx):
        n = len(tok(answers[i], add_special_tokens=False)["input_ids"])
        out[i] = torch.stack([steps[t][j] for t in range(n)])
    return out


def answer_kl(reference: torch.Tensor, policy: torch.Tensor) -> float:
    """sum over the answer's tokens of KL(reference || policy), from (tokens, vocab) log-probabilities."""
    return float((reference.exp() * (reference - policy)).sum())


@dataclass
class BatchResult:
    hidden: torch.Tensor
    """(B, hidden) last prompt token's final hidden state"""
    answers: list[str]
    shares: list[float]
    visual_tokens: list[float]
    """layer-averaged visual tokens per sample"""
    prefill_s: list[float]
    answer_logp: list[torch.Tensor | None] | None = None
    """per sample, this run's (tokens, vocab) log-probabilities along the reference answer (``run_batch(score=...)``)"""


def run_batch(acc, batch: list[Sample], max_new_tokens: int, score: list[str] | None = None) -> BatchResult:
    """One ``generate`` call over ``batch`` (hidden states, answers, stats); with ``score`` (one answer per
    sample, e.g. the unpruned model's) also the policy's teacher-forced distributions along them."""
    with last_hidden(acc.model) as seen:
        outs = acc.generate(images=[s.images for s in batch], prompt=[s.prompt for s in batch],
                            max_new_tokens=max_new_tokens)
    if not seen:
        raise RuntimeError("the LM head was never called; cannot read the final hidden state")
    return BatchResult(seen[0], [o.text for o in outs], [visual_share(o.stats, acc.policy) for o in outs],
                       [o.stats.layer_avg_visual_tokens for o in outs], [o.stats.prefill_s for o in outs],
                       None if score is None else answer_distributions(acc, batch, score))


@dataclass
class Reference:
    """The unpruned model on one batch: what every trial is paired with."""

    hidden: torch.Tensor
    answers: list[str]
    """its greedy answers"""
    answer_logp: list[torch.Tensor | None] | None
    """its (tokens, vocab) log-probabilities along them; None when not asked for (``answer=False``)"""

    @classmethod
    def of(cls, base, batch: list[Sample], max_new_tokens: int, answer: bool = True) -> tuple[Reference, BatchResult]:
        res = run_batch(base, batch, max_new_tokens)
        if answer:
            res.answer_logp = answer_distributions(base, batch, res.answers)
        return cls(res.hidden, res.answers, res.answer_logp), res


@dataclass
class Running:
    """Per-sample results accumulated over batches; ``kind`` names the objective (:data:`OBJECTIVES`)."""

    similarity: list[float] = field(default_factory=list)
    shares: list[float] = field(default_factory=list)
    visual_tokens: list[float] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)
    prefill_s: list[float] = field(default_factory=list)
    answer_kl: list[float] = field(default_factory=list)
    """sum over the unpruned answer's tokens of KL(unpruned || policy), per scored sample"""
    agreement: list[bool] = field(default_factory=list)
    """answered as the unpruned model did"""
    kind: str = "hidden"

    def add(self, res: BatchResult, reference: Reference, batch: list[Sample]) -> None:
        for i, s in enumerate(batch):
            self.similarity.append(flow_objective(reference.hidden[i:i + 1], res.hidden[i:i + 1]))
            c = is_correct(res.answers[i], s)
            if c is not None:
                self.correct.append(c)
            self.agreement.append(same_answer(res.answers[i], reference.answers[i], s.type))
            pol = res.answer_logp[i] if res.answer_logp else None
            ref = reference.answer_logp[i] if reference.answer_logp else None
            if pol is not None and ref is not None:
                self.answer_kl.append(answer_kl(ref, pol))
        self.shares += res.shares
        self.visual_tokens += res.visual_tokens
        self.prefill_s += res.prefill_s

    @staticmethod
    def _mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    @property
    def values(self) -> list[float]:
        """The per-sample values the objective averages."""
        return [-x for x in self.answer_kl] if self.kind == "answer" else self.similarity

    @property
    def objective(self) -> float:
        return self._mean(self.values)

    @property
    def share(self) -> float:
        return self._mean(self.shares)

    @property
    def accuracy(self) -> float | None:
        return self._mean(self.correct) if self.correct else None

    def summary(self) -> dict:
        def r(x):
            return None if x is None or x != x else round(x, 6)  # NaN (nothing measured) -> None

        return {"objective": r(self.objective), "similarity": r(self._mean(self.similarity)),
                "answer_kl": r(self._mean(self.answer_kl)) if self.answer_kl else None,
                "agreement": r(self._mean(self.agreement)), "visual_share": round(self.share, 6),
                "visual_tokens": round(self._mean(self.visual_tokens), 3), "accuracy": r(self.accuracy),
                "prefill_s": round(self._mean(self.prefill_s), 6), "n": len(self.similarity)}
