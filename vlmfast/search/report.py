"""What ``vlmfast search`` writes: the policy YAML (with a comment header), a CSV of all trials, a PNG of
objective vs. visual tokens kept with the Pareto front, a JSON summary; and the summary it prints."""

from __future__ import annotations

import csv
import json
from datetime import datetime, timezone
from pathlib import Path

from ..policy import load_policy

CSV_FIELDS = ["number", "state", "method", "baseline", "objective", "similarity", "answer_kl", "agreement",
              "visual_share", "visual_tokens", "accuracy", "budget_excess", "feasible", "samples", "stopped",
              "duplicate_of", "prefill_s", "duration_s", "policy", "params"]

OBJECTIVE_TEXT = {
    "answer": "minus the mean KL divergence of the policy's next-token distributions from the unpruned model's "
              "along the unpruned answers",
    "hidden": "mean cosine similarity of the last prompt token's final hidden state with vs. without the policy",
}


def output_paths(out: str | Path) -> dict[str, Path]:
    out = Path(out)
    return {"policy": out, "csv": out.with_suffix(".trials.csv"), "plot": out.with_suffix(".pareto.png"),
            "summary": out.with_suffix(".search.json")}


def _fmt(x, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def header(cfg, res) -> str:
    b, ref = res.best, res.reference
    lines = [
        "vlmfast search: the policy closest to the unpruned model under the budget",
        f"model: {cfg.model}",
        f"data: {cfg.data} ({ref['n']} samples)",
        f"budget: {cfg.budget:g} of the visual tokens, averaged over decoder layers (docs/search.md); "
        f"used: {_fmt(b['visual_share'])} ({_fmt(b['visual_tokens'], 1)} tokens)",
        f"objective ({cfg.objective}): {_fmt(b['objective'])} ({OBJECTIVE_TEXT[cfg.objective]})",
        f"hidden-state cosine: {_fmt(b['similarity'])}; agreement with the unpruned answers: "
        f"{_fmt(b['agreement'], 3)}",
        f"accuracy on the calibration data: {_fmt(b['accuracy'], 3)} (unpruned: {_fmt(ref['accuracy'], 3)})",
        f"trials: {len(res.trials)} (seed {cfg.seed}, methods {','.join(cfg.methods)}, baselines "
        f"{','.join(cfg.baseline_names()) or 'none'}, trial {b['number']} is best"
        f"{' (a baseline)' if b.get('baseline') else ''})",
        f"date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
    ]
    if cfg.command:
        lines.append(f"command: {cfg.command}")
    return "".join(f"# {line}\n" for line in lines)


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(r[k], sort_keys=True) if isinstance(r[k], (dict, list)) else r[k]
                        for k in CSV_FIELDS})


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (fewer tokens x, higher objective y),
    sorted by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best_y = [], float("-inf")
    for i in order:
        if points[i][1] > best_y:
            front.append(i)
            best_y = points[i][1]
    return front


def plot(rows: list[dict], budget: float, best: dict, path: Path, title: str, objective: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["duplicate_of"] is None and r["objective"] is not None
            and r["visual_share"] is not None]
    done = [r for r in rows if r["state"] == "COMPLETE"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    colours = plt.get_cmap("tab10")
    for i, m in enumerate(sorted({r["method"] for r in rows})):
        c = colours(i)
        ok = [r for r in done if r["method"] == m and r["feasible"]]
        over = [r for r in done if r["method"] == m and not r["feasible"]]
        early = [r for r in rows if r["method"] == m and r["state"] == "PRUNED"]
        ax.scatter([r["visual_share"] for r in ok], [r["objective"] for r in ok], color=c, marker="o", label=m)
        ax.scatter([r["visual_share"] for r in over], [r["objective"] for r in over], color=c, marker="x")
        ax.scatter([r["visual_share"] for r in early], [r["objective"] for r in early], facecolors="none",
                   edgecolors=c, marker="o", alpha=0.6)
    ax.scatter([], [], color="gray", marker="x", label="over budget")
    ax.scatter([], [], facecolors="none", edgecolors="gray", marker="o", label="stopped early (partial)")
    pts = [(r["visual_share"], r["objective"]) for r in done]
    front = [pts[i] for i in pareto_front(pts)]
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="black", lw=1.2, zorder=4,
                label="Pareto front (finished trials)")
    ax.axvline(budget, color="gray", ls="--", lw=1, label=f"budget {budget:g}")
    ax.scatter([best["visual_share"]], [best["objective"]], marker="*", s=220, color="gold", edgecolor="black",
               zorder=5, label=f"chosen (trial {best['number']})")
    ax.set_xlabel("visual tokens kept (share, averaged over decoder layers)")
    ax.set_ylabel(f"objective: {objective}")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(cfg, res, acc) -> dict[str, str]:
    paths = output_paths(cfg.out)
    paths["policy"].parent.mkdir(parents=True, exist_ok=True)
    res.policy.to_yaml(paths["policy"], header=header(cfg, res))
    check = load_policy(paths["policy"])  # what users will load: it must round-trip and fit the model
    check.check(acc.adapter.info())
    if check != res.policy:
        raise RuntimeError(f"{paths['policy']}: the written policy does not read back as the one found")
    write_csv(res.trials, paths["csv"])
    plot(res.trials, cfg.budget, res.best, paths["plot"],
         f"{cfg.model}, {cfg.data}, budget {cfg.budget:g}: {len(res.trials)} trials",
         {"answer": "-KL to unpruned along its answers", "hidden": "hidden-state cosine to unpruned"}[cfg.objective])
    paths["summary"].write_text(json.dumps({
        "model": cfg.model, "data": cfg.data, "budget": cfg.budget, "methods": cfg.methods, "seed": cfg.seed,
        "objective": cfg.objective, "baselines": cfg.baseline_names(),
        "trials": len(res.trials), "new_trials": res.new_trials, "elapsed_s": round(res.elapsed_s, 1),
        "reference": res.reference, "best": res.best, "best_per_method": res.per_method, "space": res.space,
        "policy": res.policy.to_dict(),
    }, indent=2, default=str))
    return {k: str(v) for k, v in paths.items()}


def summary(cfg, res) -> str:
    if cfg.dry_run:
        lines = [f"search space for {cfg.model} at budget {cfg.budget:g}:"]
        for m, sp in res.space.items():
            if "infeasible" in sp:
                lines.append(f"  {m}: left out: {sp['infeasible']}")
                continue
            lines.append(f"  {m}:")
            lines += [f"    {p}" for p in sp["params"]]
        return "\n".join(lines)
    ref = res.reference
    head = ["", f"objective ({cfg.objective})", "agreement", "visual share", "visual tokens", "accuracy", "trial"]
    body = [["unpruned", _fmt(ref["objective"]), _fmt(ref["agreement"], 3), "1.0000", _fmt(ref["visual_tokens"], 1),
             _fmt(ref["accuracy"], 3), "-"]]
    for m, r in sorted(res.per_method.items(), key=lambda kv: -kv[1]["objective"]):
        body.append([f"best {m}", _fmt(r["objective"]), _fmt(r["agreement"], 3), _fmt(r["visual_share"]),
                     _fmt(r["visual_tokens"], 1), _fmt(r["accuracy"], 3),
                     f"{r['number']}{' (baseline)' if r['baseline'] else ''}"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    table = "\n".join("  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in [head, *body])
    states: dict[str, int] = {}
    for r in res.trials:
        states[r["state"]] = states.get(r["state"], 0) + 1
    lines = [table, "",
             f"trials: {len(res.trials)} ({', '.join(f'{n} {s.lower()}' for s, n in sorted(states.items()))}; "
             f"{res.new_trials} run now) in {res.elapsed_s:.0f} s",
             f"policy: {res.policy.describe()}",
             *[f"wrote {k}: {v}" for k, v in res.paths.items()]]
    return "\n".join(lines)
