"""`vlmfast search` vs. hand-written policies at one budget, on ShapesWorld (docs/search.md, "Results").

Runs two searches (the issue's method set, and one adding VisionZip / FasterVLM / DivPrune), scores the
hand-written policies at the same budget with the same objective on the same calibration data, then evaluates
every policy on held-out ShapesWorld VQA (``--split``, default final: the split kept for reported numbers).
Prints a Markdown table and writes it as JSON.

    nice -n 19 env OMP_NUM_THREADS=1 .venv/bin/python examples/search_vs_handwritten.py \
        [--model tiny-llava-shapes] [--budget 0.25] [--trials 40] [--data shapes:dev:64] [--limit 100] \
        [--objective answer] [--split final]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vlmfast import VLMAccelerator
from vlmfast.eval import shapes_eval
from vlmfast.policy import Policy, default_policy_for
from vlmfast.pruners import DivPrune, FasterVLM, FoPru, RandomPruner, VFlowOpt, VisionZip
from vlmfast.search import SearchConfig, load_data, run
from vlmfast.search.objective import OBJECTIVES, Reference, Running, run_batch

SEARCHES = {"": "fopru,vflowopt,zipvl,fastv", "-all": "fopru,vflowopt,zipvl,fastv,visionzip,fastervlm,divprune"}


def handwritten(b: float) -> dict[str, Policy]:
    return {name: Policy([m], source=name) for name, m in [
        ("fopru rank", FoPru(keep=b)), ("fopru row", FoPru(keep=b, strategy="row")),
        ("vflowopt (defaults)", VFlowOpt(keep=b)), ("visionzip", VisionZip(keep=b)),
        ("fastervlm", FasterVLM(keep=b)), ("divprune", DivPrune(keep=b)), ("random", RandomPruner(keep=b))]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny-llava-shapes")
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--data", default="shapes:dev:64")
    p.add_argument("--limit", type=int, default=100, help="held-out ShapesWorld scenes")
    p.add_argument("--split", default="final", choices=["test", "final"], help="held-out ShapesWorld split")
    p.add_argument("--objective", default=OBJECTIVES[0], choices=OBJECTIVES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/results/search")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    rows: dict[str, dict] = {}
    for suffix, methods in SEARCHES.items():
        t0 = time.perf_counter()
        res = run(SearchConfig(model=a.model, budget=a.budget, methods=methods, data=a.data, trials=a.trials,
                               seed=a.seed, objective=a.objective,
                               out=str(out / f"{a.model}-b{a.budget:g}{suffix}.yaml"), progress=False))
        rows[f"search: {methods}"] = {"policy": res.policy, "objective": res.best["objective"],
                                      "calib_accuracy": res.best["accuracy"],
                                      "search_s": round(time.perf_counter() - t0)}
        reference = res.reference

    base = VLMAccelerator.from_pretrained(a.model, policy=None)
    shipped, _ = default_policy_for(base.model.name_or_path)
    hand = handwritten(a.budget)
    if not shipped.is_empty:
        hand = {f"shipped ({shipped.name})": shipped, **{n: pol for n, pol in hand.items() if pol != shipped}}
    data = load_data(a.data)
    batches = data.batches(8)
    ref = [Reference.of(base, b, 4, answer=a.objective == "answer")[0] for b in batches]
    for name, pol in hand.items():
        acc = VLMAccelerator(base.model, base.processor, policy=pol)
        r = Running(kind=a.objective)
        for b, h in zip(batches, ref):
            r.add(run_batch(acc, b, 4, score=h.answers if a.objective == "answer" else None), h, b)
        rows[name] = {"policy": pol, "objective": r.summary()["objective"], "calib_accuracy": r.accuracy}

    rows = {"unpruned": {"policy": Policy(), "objective": reference["objective"],
                         "calib_accuracy": reference["accuracy"]}, **rows}
    for name, r in rows.items():
        acc = VLMAccelerator(base.model, base.processor, policy=r["policy"])
        ev = shapes_eval.evaluate(acc, split=a.split, limit=a.limit, tasks=("vqa",), progress=False)
        r.update(heldout_vqa=ev["vqa"]["overall"], split=a.split, n=ev["vqa"]["n"],
                 layer_avg_tokens=ev["cost"]["layer_avg_visual_tokens"])
        print(f"{name}: {a.split} VQA {r['heldout_vqa']:.3f}", flush=True)

    lines = [f"| policy ({a.model}, budget {a.budget:g}) | objective {a.objective} ({a.data}) | calibration accuracy | "
             f"{a.split} VQA ({a.limit} scenes) | visual tokens (layer avg) |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        ca = "-" if r["calib_accuracy"] is None else f"{r['calib_accuracy']:.3f}"
        lines.append(f"| {name}: `{r['policy'].describe()}` | {r['objective']:.4f} | {ca} | {r['heldout_vqa']:.3f} | "
                     f"{r['layer_avg_tokens']:.1f} |")
    print("\n".join(lines))
    dump = {name: {**{k: v for k, v in r.items() if k != "policy"}, "policy": r["policy"].to_dict()}
            for name, r in rows.items()}
    (out / f"{a.model}-b{a.budget:g}-comparison.json").write_text(json.dumps(dump, indent=2))


if __name__ == "__main__":
    main()
