"""Which search objective orders pruning policies as held-out accuracy does? (docs/search.md, "The objective")

For one budget, a set of pruning policies (the hand-written baselines and a few VFlowOpt settings, including
the policies earlier searches found) is scored on the calibration data with every candidate objective --
the hidden-state cosine (VFlowOpt's), minus the KL divergence from the unpruned model along its answers, the agreement
with the unpruned model's answers, calibration accuracy, the mean log-probability of the gold answer -- and
then evaluated on VQA over *other* dev scenes (held out from the calibration, never the test or final split).
Prints, per objective, the rank correlation with held-out accuracy and how many policy pairs it ties; writes
everything as JSON.

    nice -n 19 env OMP_NUM_THREADS=1 .venv/bin/python examples/objective_study.py --budget 0.1 \
        [--data shapes:dev:64] [--heldout 100] [--heldout-start 1000000] [--out docs/results/search]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vlmfast import VLMAccelerator, load_policy
from vlmfast.eval import shapes as shapes_eval
from vlmfast.policy import Policy
from vlmfast.pruners import DivPrune, FasterVLM, FoPru, RandomPruner, VFlowOpt, VisionZip
from vlmfast.search import Sample, load_data
from vlmfast.search.objective import Reference, Running, run_batch

SEARCHED = {0.25: ["docs/results/search/tiny-llava-shapes-b0.25.yaml", "tiny-llava-shapes-vflowopt-25"],
            0.1: ["docs/results/search/tiny-llava-shapes-b0.1.yaml", "tiny-llava-shapes-vflowopt-10"]}


def policies(b: float) -> dict[str, Policy]:
    out = {name: Policy([m], source=name) for name, m in [
        ("fopru", FoPru(keep=b)), ("vflowopt (defaults)", VFlowOpt(keep=b)),
        ("vflowopt m=2 t=0", VFlowOpt(keep=b, t=0.0, m=2.0)), ("visionzip", VisionZip(keep=b)),
        ("fastervlm", FasterVLM(keep=b)), ("divprune", DivPrune(keep=b)),
        ("random", RandomPruner(keep=b))]}
    for spec in SEARCHED.get(b, []):
        out[f"found: {Path(spec).stem}"] = load_policy(spec)
    return out


def answer_logprobs(acc, batch: list[Sample], answers: list[str]) -> list[float | None]:
    """log p(answer | sample) under ``acc``'s policy, teacher-forced (``VLMAccelerator.loglikelihood``); None
    where the answer is empty (nothing to score)."""
    idx = [i for i, a in enumerate(answers) if a.strip()]
    out: list[float | None] = [None] * len(batch)
    if idx:
        scored = acc.loglikelihood(images=[batch[i].images for i in idx], prompt=[batch[i].prompt for i in idx],
                                   continuation=[answers[i] for i in idx])
        for i, (lp, _) in zip(idx, scored):
            out[i] = lp
    return out


def ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    r = [0.0] * len(xs)
    i = 0
    while i < len(order):  # average ranks over ties
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2
        i = j + 1
    return r


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra) ** 0.5
    vb = sum((y - mb) ** 2 for y in rb) ** 0.5
    return cov / (va * vb) if va and vb else float("nan")


def pairs(a: list[float], b: list[float]) -> dict:
    """Policy pairs that ``a`` orders as ``b`` does (concordant), the other way (discordant), or ties."""
    out = {"concordant": 0, "discordant": 0, "tied": 0}
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            if a[i] == a[j]:
                out["tied"] += 1
            elif (a[i] - a[j]) * (b[i] - b[j]) > 0:
                out["concordant"] += 1
            elif b[i] != b[j]:
                out["discordant"] += 1
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny-llava-shapes")
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--data", default="shapes:dev:64")
    p.add_argument("--heldout", type=int, default=100, help="dev scenes for held-out VQA")
    p.add_argument("--heldout-start", type=int, default=1_000_000, help="first held-out dev scene")
    p.add_argument("--out", default="docs/results/search")
    a = p.parse_args()
    t0 = time.perf_counter()
    base = VLMAccelerator.from_pretrained(a.model, policy=None)
    batches = load_data(a.data).batches(8)
    refs = [Reference.of(base, b, 4)[0] for b in batches]
    full = shapes_eval.evaluate(base, split="dev", limit=a.heldout, start=a.heldout_start, tasks=("vqa",),
                                progress=False)["vqa"]["overall"]
    rows = {}
    for name, pol in policies(a.budget).items():
        acc = VLMAccelerator(base.model, base.processor, policy=pol)
        run_, gold = Running(kind="answer"), []
        for b, ref in zip(batches, refs):
            run_.add(run_batch(acc, b, 4, score=ref.answers), ref, b)
            gold += answer_logprobs(acc, b, [s.answer for s in b])
        ev = shapes_eval.evaluate(acc, split="dev", limit=a.heldout, start=a.heldout_start, tasks=("vqa",),
                                  progress=False)
        s = run_.summary()
        rows[name] = {"policy": pol.describe(), "hidden": s["similarity"], "answer": -s["answer_kl"],
                      "agreement": s["agreement"], "accuracy": s["accuracy"],
                      "gold_logprob": sum(gold) / len(gold), "heldout_vqa": ev["vqa"]["overall"],
                      "heldout_n": ev["vqa"]["n"], "visual_tokens": round(ev["cost"]["layer_avg_visual_tokens"], 1),
                      "per_sample": {"hidden": run_.similarity, "answer_kl": run_.answer_kl}}
        print(f"{name}: {json.dumps({k: v for k, v in rows[name].items() if k != 'per_sample'})}", flush=True)

    held = [r["heldout_vqa"] for r in rows.values()]
    metrics = ("hidden", "answer", "agreement", "accuracy", "gold_logprob")
    corr = {m: {"spearman": round(spearman([r[m] for r in rows.values()], held), 3),
                **pairs([r[m] for r in rows.values()], held)} for m in metrics}
    lines = [f"| policy ({a.model}, budget {a.budget:g}) | hidden cosine | -answer KL | agreement | "
             f"calibration accuracy | gold log-p | held-out dev VQA ({a.heldout} scenes) |",
             "|---|---|---|---|---|---|---|"]
    for name, r in sorted(rows.items(), key=lambda kv: -kv[1]["heldout_vqa"]):
        lines.append(f"| {name} | {r['hidden']:.4f} | {r['answer']:.4f} | {r['agreement']:.3f} | {r['accuracy']:.3f} | "
                     f"{r['gold_logprob']:.3f} | {r['heldout_vqa']:.3f} |")
    lines += ["", "| objective | Spearman with held-out VQA | concordant / discordant / tied pairs |", "|---|---|---|"]
    lines += [f"| {m} | {c['spearman']:.3f} | {c['concordant']} / {c['discordant']} / {c['tied']} |"
              for m, c in corr.items()]
    print("\n".join(lines))
    out = Path(a.out) / f"{a.model}-b{a.budget:g}-objective-study.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": a.model, "budget": a.budget, "data": a.data, "heldout": {
        "split": "dev", "scenes": a.heldout, "start": a.heldout_start, "unpruned_vqa": full},
        "correlation": corr, "rows": rows, "elapsed_s": round(time.perf_counter() - t0)}, indent=2))
    print(f"wrote {out} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
