"""Offline per-head pattern search by attention recall, and recall evaluation of a sparse policy.

``search_heads`` runs the model's own (dense, unchanged) prefill on calibration requests, and for every
layer and head measures each candidate pattern on that head's real queries and keys:

* **recall**: mean over query rows of the softmax mass the candidate's mask keeps (1.0 = nothing lost);
* **density**: share of the causal (query, key) pairs the mask keeps (what the kernel computes).

Per head, the winner is the *cheapest* candidate (lowest mean density over the samples) whose mean recall
reaches ``target_recall``; if none does, the one with the highest recall (``Dense`` is always a candidate,
so every head gets a pattern). This is cost-aware, unlike the research code, which keeps the first candidate
in a fixed order unless a later one is better by more than 0.01 recall. The result is a per-model
head-pattern file (JSON) that the ``mminference`` method references with ``heads:``.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..method import method_dataclass
from ..sparse.layout import Layout
from ..sparse.mask import MaskSpec
from ..sparse.method import HeadPatterns, MMInference, SparseRun
from ..sparse.patterns import AShape, BlockSparse, Boundary2D, Dense, Grid, HeadContext, QBoundary, VerticalSlash


def default_candidates() -> list:
    """The candidate menu, cheapest-first within each family; budgets are shares of the sequence so the
    same menu fits a 1k-token multi-image prompt and a 32k-token video."""
    out: list = []
    for local in (0.02, 0.05, 0.1, 0.2):
        out += [Grid(stride="frame", local=local), Grid(stride="row", local=local),
                Grid(stride="row", local=local, horizontal=False)]
        out.append(AShape(sink=0.01, local=local))
    for v, s in ((0.02, 0.02), (0.05, 0.05), (0.1, 0.1), (0.2, 0.2), (0.3, 0.3)):
        out += [VerticalSlash(vertical=v, slash=s), QBoundary(vertical=v, slash=s), Boundary2D(vertical=v / 2, slash=s)]
    out += [BlockSparse(topk=x) for x in (0.1, 0.2, 0.4)]
    out.append(Dense())
    return out


def recall_and_density(q: torch.Tensor, k: torch.Tensor, specs: list[MaskSpec], scale: float,
                       chunk: int = 512) -> list[tuple[float, float]]:
    """(recall, density) of each mask for one head (q, k: (n, d)), with the attention computed once."""
    n = q.shape[0]
    kept = torch.zeros(len(specs), dtype=torch.float64)
    count = torch.zeros(len(specs), dtype=torch.float64)
    kt = k.float().t()
    j = torch.arange(n, device=q.device)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        i = torch.arange(s, e, device=q.device)
        p = ((q[s:e].float() @ kt) * scale).masked_fill(j[None, :] > i[:, None], float("-inf")).softmax(-1)
        for c, spec in enumerate(specs):
            m = spec.dense(slice(s, e))
            kept[c] += float((p * m).sum())
            count[c] += float(m.sum())
    causal = n * (n + 1) / 2
    return [(float(kept[c]) / n, float(count[c]) / causal) for c in range(len(specs))]


@dataclass
class HeadSearch:
    """The search's result: the chosen pattern of every head and what was measured."""

    patterns: HeadPatterns
    scores: list[dict[int, dict]]
    """per layer, per head: {"recall", "density"} of the chosen pattern (means over the samples)"""
    table: list[dict] = field(default_factory=list)
    """every (layer, head, candidate) measurement"""

    def save(self, path: str | Path) -> None:
        self.patterns.save(path, self.scores)


@method_dataclass
class _Capture(MMInference):
    """Not registered: an ``mminference`` whose run only reads each layer's queries and keys."""

    def start(self, request):
        run = super().start(request)
        return _CaptureRun(self, run.layouts, run.valid, run.n_layers, run.stage)


_VISIT: ContextVar[Callable | None] = ContextVar("vlmfast_sparse_visit", default=None)


class _CaptureRun(SparseRun):
    def _attention(self, module, query, key, value, mask, base, **kwargs):
        length = query.shape[2]
        visit = _VISIT.get()
        if length > 1 and length == key.shape[2] and visit is not None:
            cols, valid = self._columns(module.layer_idx, length)
            if cols is not None:
                scale = kwargs.get("scaling") or getattr(module, "scaling", query.shape[-1] ** -0.5)
                groups = query.shape[1] // key.shape[1]
                for b in range(query.shape[0]):
                    idx = valid[b].nonzero().squeeze(1)
                    layout = self.layouts[b].subset(cols[b, idx].cpu())
                    visit(module.layer_idx, query[b, :, idx], key[b, :, idx].repeat_interleave(groups, 0), layout,
                          scale)
        return base(module, query, key, value, mask, **kwargs)


def _visit_prefill(model, processor, samples: Sequence[tuple[Any, str]], visit: Callable, progress: bool = False):
    """Run each (images, prompt) or (images, prompt, videos) sample's prefill (dense) and call
    ``visit(layer, q, k, layout, scale)``."""
    from tqdm.auto import tqdm

    from ..accelerator import VLMAccelerator
    from ..policy import Policy

    acc = VLMAccelerator(model, processor, policy=Policy([_Capture(min_length=0)], source="<sparse search>"))
    token = _VISIT.set(visit)
    try:
        for images, prompt, *videos in tqdm(samples, desc="sparse search", disable=not progress):
            acc.generate(images=images, prompt=prompt, videos=videos[0] if videos else None, max_new_tokens=1)
    finally:
        _VISIT.reset(token)


def search_heads(model, processor, samples: Sequence[tuple[Any, str]], *, candidates: list | None = None,
                 target_recall: float = 0.95, block: int = 64, model_name: str = "", path: str | Path | None = None,
                 progress: bool = False) -> HeadSearch:
    """Pick each head's sparse pattern and budget by attention recall on calibration requests.

    Args:
        model, processor: a loaded LLaVA or Qwen2-VL model and its processor (any model vlmfast supports).
        samples: calibration requests as ``(images, prompt)`` pairs (images: a list of PIL images) or
            ``(images, prompt, videos)`` triples (videos as ``generate(videos=...)`` takes them, Qwen2-VL); use the
            inputs the policy will serve (multi-image prompts, videos), long enough to show the patterns.
        candidates: pattern instances to choose from (default :func:`default_candidates`); ``Dense()`` is
            added when missing, so every head gets a pattern.
        target_recall: the recall a pattern must reach (mean over samples of the mean retained softmax mass).
        block: kernel block size the masks are built with (and stored in the file).
        model_name: written into the file (``model``).
        path: when given, the head-pattern JSON is written there.
    Returns:
        HeadSearch with ``patterns`` (reference it from a policy: ``MMInference(heads=path)``), per-head
        ``scores`` and the full measurement ``table``.
    """
    searcher = HeadSearcher(candidates, target_recall, block)
    _visit_prefill(model, processor, samples, searcher.visit, progress)
    result = searcher.result(model_name, {"samples": len(samples)})
    if path is not None:
        result.save(path)
    return result


class HeadSearcher:
    """The search's core, without a model: feed it each layer's queries and keys (``visit``), then ask for
    the choice (``result``). ``search_heads`` drives it with a model's prefill; tests drive it with
    synthetic heads."""

    def __init__(self, candidates: list | None = None, target_recall: float = 0.95, block: int = 64):
        self.cands = list(candidates or default_candidates())
        if not any(isinstance(c, Dense) for c in self.cands):
            self.cands.append(Dense())
        self.target, self.block = target_recall, block
        self.sums: dict[tuple[int, int], torch.Tensor] = {}
        self.counts: dict[tuple[int, int], int] = {}

    def visit(self, layer: int, q: torch.Tensor, k: torch.Tensor, layout, scale: float) -> None:
        """q, k: (H, n, d) of one sequence (keys repeated to the query heads)."""
        cache: dict = {}
        for h in range(q.shape[0]):
            ctx = HeadContext(q[h], k[h], layout, self.block, scale, cache)
            specs = [c.build(ctx) for c in self.cands]
            res = torch.tensor(recall_and_density(q[h], k[h], specs, scale), dtype=torch.float64)
            key = (layer, h)
            self.sums[key] = self.sums.get(key, torch.zeros_like(res)) + res
            self.counts[key] = self.counts.get(key, 0) + 1

    def result(self, model_name: str = "", meta: dict | None = None) -> HeadSearch:
        n_layers = 1 + max(layer for layer, _ in self.sums) if self.sums else 0
        layers: list[dict[int, Any]] = [{} for _ in range(n_layers)]
        scores: list[dict[int, dict]] = [{} for _ in range(n_layers)]
        table = []
        for (layer, h), total in sorted(self.sums.items()):
            mean = total / self.counts[(layer, h)]
            recall, density = mean[:, 0], mean[:, 1]
            for c, cand in enumerate(self.cands):
                table.append({"layer": layer, "head": h, "candidate": repr(cand),
                              "recall": round(float(recall[c]), 4), "density": round(float(density[c]), 4)})
            ok = (recall >= self.target).nonzero().squeeze(1)
            best = int(ok[density[ok].argmin()]) if ok.numel() else int(recall.argmax())
            layers[layer][h] = self.cands[best]
            scores[layer][h] = {"recall": round(float(recall[best]), 4), "density": round(float(density[best]), 4)}
        patterns = HeadPatterns(layers, model_name, self.block, {"target_recall": self.target, **(meta or {})},
                                "<search>")
        return HeadSearch(patterns, scores, table)


def evaluate_recall(model, processor, samples: Sequence[tuple[Any, str]], method: MMInference,
                    progress: bool = False) -> list[dict]:
    """Per layer: mean attention recall and density of ``method``'s patterns (its head file and default) on
    ``samples``, averaged over heads and samples; also the lowest head."""
    per: dict[int, list[tuple[float, float]]] = {}

    def visit(layer: int, q: torch.Tensor, k: torch.Tensor, layout: Layout, scale: float) -> None:
        cache: dict = {}
        for h in range(q.shape[0]):
            spec = method.pattern_for(layer, h).build(HeadContext(q[h], k[h], layout, method.block_size, scale, cache))
            per.setdefault(layer, []).append(recall_and_density(q[h], k[h], [spec], scale)[0])

    _visit_prefill(model, processor, samples, visit, progress)
    rows = []
    for layer in sorted(per):
        r = torch.tensor(per[layer])
        rows.append({"layer": layer, "recall": round(float(r[:, 0].mean()), 4),
                     "min_head_recall": round(float(r[:, 0].min()), 4), "density": round(float(r[:, 1].mean()), 4)})
    return rows


RECALL_PROMPT = "how many objects are there ?"
"""the calibration prompt of the sparse head search and of the recall check (multi-image ShapesWorld)"""


def shapes_samples(split: str, n_samples: int, images_per_sample: int, start: int = 0):
    from ..datasets.shapes.scene import generate_scene, split_seeds

    seeds = split_seeds(split, n_samples * images_per_sample, start)
    return [([generate_scene(s).image for s in seeds[i * images_per_sample:(i + 1) * images_per_sample]], RECALL_PROMPT)
            for i in range(n_samples)]


def main(argv: list[str] | None = None) -> int:
    """``python -m vlmfast.search.heads``: search the head patterns of a model on multi-image ShapesWorld
    prompts (the embedded model's calibration) and write the head-pattern file."""
    import argparse

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ..argtypes import fraction, positive_int
    from ..zoo import resolve

    p = argparse.ArgumentParser(prog="python -m vlmfast.search.heads", description=main.__doc__)
    p.add_argument("--model", default="tiny-llava-shapes", help="zoo name, hub id or folder")
    p.add_argument("--out", required=True, help="head-pattern JSON to write")
    p.add_argument("--prompts", type=positive_int, default=4, help="calibration prompts (ShapesWorld dev split)")
    p.add_argument("--images", type=positive_int, default=8, help="images per prompt")
    p.add_argument("--target-recall", type=fraction, default=0.97)
    p.add_argument("--block", type=positive_int, default=32)
    a = p.parse_args(argv)
    path = resolve(a.model)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    samples = shapes_samples("dev", a.prompts, a.images)
    res = search_heads(model, processor, samples, target_recall=a.target_recall, block=a.block, model_name=a.model,
                       path=a.out, progress=True)
    for layer, heads in enumerate(res.scores):
        print(layer, {h: (res.patterns.layers[layer][h].pattern, s["recall"], s["density"]) for h, s in heads.items()})
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
