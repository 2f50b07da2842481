"""``vlmfast eval hallucination``: baseline vs. VAR, DAMRO, AGLA and combinations on ShapesWorld, in one table.

    vlmfast eval hallucination --model tiny-llava-shapes --split test --limit 100 \\
        --json docs/results/hallucination.json --markdown

For every configuration (a shipped policy file), ``vlmfast eval shapes``'s evaluation (VQA, POPE random /
popular / adversarial, CHAIR), all with one loaded model, greedy decoding; then the decode cost measured side by
side: caption decoding at batch 1 on ``--timing-scenes`` scenes, configurations interleaved, ``--repeats``
rounds, median ms/token and the ratio to the baseline measured in the same run. ``--ablation`` adds "VAR forced
sinks": VAR with sink dimensions and threshold taken from the model's own visual tokens (the two dimensions with
the largest normalised activation on dev scenes, tau at the 95th percentile of phi), to show what VAR does and
costs when it acts on a model that has no sink dimensions of its own. ``--diagnose`` (on by default) records why
a method can or cannot act on this model: the first token's activation magnitudes (VAR's sink dimensions), the
concentration of the vision tower's [CLS] attention (DAMRO's outliers), the matcher's retrieval and pointing
accuracy and the pixels AGLA kept.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from ..argtypes import nonnegative_int, positive_int
from ..datasets.shapes.scene import SPLITS

CONFIGS: tuple[tuple[str, str | None], ...] = (
    ("baseline", None),
    ("VAR", "tiny-llava-shapes-var"),
    ("DAMRO", "tiny-llava-shapes-damro"),
    ("AGLA", "tiny-llava-shapes-agla"),
    ("VAR + DAMRO", "tiny-llava-shapes-var-damro"),
    ("FoPru 25% + VAR", "tiny-llava-shapes-fopru-var"),
)
"""(label, shipped policy) of each row; the policies are in vlmfast/policies/."""
FOPRU_ONLY = ("FoPru 25%", "tiny-llava-shapes")  # the reference row for FoPru + VAR


def add_arguments(p):
    p.add_argument("--model", default="tiny-llava-shapes")
    p.add_argument("--split", default="test", choices=SPLITS,
                   help="ShapesWorld split (default test; final for reported numbers)")
    p.add_argument("--limit", type=positive_int, default=100, help="scenes per configuration")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--timing-scenes", type=nonnegative_int, default=8, help="scenes for the side-by-side decode timing")
    p.add_argument("--repeats", type=positive_int, default=3, help="interleaved timing rounds")
    p.add_argument("--only", default="", help="comma-separated labels to run (default: all)")
    p.add_argument("--no-ablation", dest="ablation", action="store_false", help="skip the forced-sinks VAR row")
    p.add_argument("--no-diagnose", dest="diagnose", action="store_false")
    p.add_argument("--no-timing", dest="timing", action="store_false", help="skip the side-by-side decode timing")
    p.add_argument("--timing-only", action="store_true", help="only the decode timing (no accuracy runs)")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="instead of running: merge results of earlier runs (e.g. --only groups run in parallel and "
                        "a --timing-only run) into one table; later files win for the same row")
    p.add_argument("--json", help="write everything as JSON to this path")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    return p


# --------------------------------------------------------------------------- diagnostics


def var_diagnostics(acc, scenes, tau: float) -> dict:
    """Does the model have VAR's sink dimensions and visual sink tokens? On ``scenes`` with POPE-style prompts."""
    import torch

    from ..reweight.var import rms_normalise, sink_dims_from_magnitudes, sink_magnitudes

    ad = acc.adapter
    inputs = ad.prepare(acc.processor, [[s.image] for s in scenes], ["is there a red circle ?"] * len(scenes))
    first = int(inputs["input_ids"][0, int(inputs["attention_mask"][0].to(torch.int8).argmax())])
    with torch.inference_mode():
        m = sink_magnitudes(ad, first, 0)
        out = acc.model(**inputs, output_hidden_states=True, use_cache=False)
    med = float(m.median())
    mad = float((m - med).abs().median()) * 1.4826
    top = torch.argsort(m, descending=True)[:5]
    img = ad.image_token_mask(inputs) & inputs["attention_mask"].bool()
    layers = []
    vis_dims = None
    for layer, h in enumerate(out.hidden_states[: len(ad.decoder_layers)]):
        r = rms_normalise(h).abs()[img]  # (n_visual, D)
        dm = r.amax(0)
        if layer == 2 or vis_dims is None:
            vis_dims = torch.argsort(dm, descending=True)[:2].tolist()
        layers.append({"layer": layer, "max_visual": round(float(r.max()), 3),
                       "p99_visual": round(float(r.amax(1).quantile(0.99)), 3),
                       "top_visual_dims": torch.argsort(dm, descending=True)[:3].tolist()})
    hidden = ad.text_config.hidden_size
    return {
        "first_token": acc.processor.tokenizer.convert_ids_to_tokens([first])[0],
        "hidden_size": hidden, "phi_upper_bound": round(hidden ** 0.5, 3), "tau": tau,
        "first_token_top_dims": top.tolist(), "first_token_top_magnitudes": [round(float(m[d]), 3) for d in top],
        "first_token_median": round(med, 3), "first_token_robust_z": [round((float(m[d]) - med) / mad, 2) for d in top],
        "discovered_sink_dims": sink_dims_from_magnitudes(m, 10.0, 3),
        "visual_per_layer": layers, "visual_top_dims_layer2": vis_dims,
    }


def damro_diagnostics(acc, scenes, k: int) -> dict:
    """Are DAMRO's outliers what the paper says they are? How concentrated the vision tower's [CLS] attention is
    (its mass on the top-k tokens vs. k/N), and whether the top-k tokens sit on the background (no object pixel
    under the token) or on objects, against the share of background tokens overall; and the outliers' feature
    norm relative to the image's mean token norm (the paper: high-norm background tokens)."""
    import numpy as np
    import torch

    from ..reweight.damro import select_outliers

    ad = acc.adapter
    inputs = ad.prepare(acc.processor, [[s.image] for s in scenes], ["is there a red circle ?"] * len(scenes))
    with torch.inference_mode():
        images = ad.image_tokens(inputs, ad.resolve_vision_layer(None))
    shares, uniform, on_bg, bg, norm_ratio = [], [], [], [], []
    for s, im in zip(scenes, images):
        if im.cls_attention is None:
            continue
        a = im.cls_attention.float() / im.cls_attention.float().sum()
        shares.append(float(a.topk(k).values.sum()))
        uniform.append(k / a.numel())
        _, gh, gw = im.grid
        objects = np.zeros((s.size, s.size), dtype=bool)
        for o in s.objects:
            objects |= o.mask
        cells = objects[: s.size // gh * gh, : s.size // gw * gw].reshape(gh, s.size // gh, gw, s.size // gw)
        background = ~cells.any(axis=(1, 3)).reshape(-1)  # (gh * gw,) no object pixel under the token
        top = select_outliers(im, k).cpu().numpy()
        on_bg.append(float(background[top].mean()))
        bg.append(float(background.mean()))
        norms = im.features.float().norm(dim=-1)
        norm_ratio.append(float(norms[torch.as_tensor(top)].mean() / norms.mean()))
    if not shares:
        return {"cls": False}
    return {"cls": True, "k": k, "top_k_share_of_cls_attention": round(statistics.mean(shares), 4),
            "uniform_share": round(statistics.mean(uniform), 4),
            "outliers_on_background": round(statistics.mean(on_bg), 4),
            "background_tokens": round(statistics.mean(bg), 4),
            "outlier_norm_over_mean_norm": round(statistics.mean(norm_ratio), 4)}


def agla_diagnostics(method, n_scenes: int) -> dict:
    """The matcher's dev retrieval / pointing accuracy, and what AGLA's mask keeps: on dev POPE questions about
    objects that are present, the share of the named object's pixels kept vs. the share of all pixels kept."""
    import numpy as np

    from ..datasets.shapes import iter_scenes, pope_items
    from ..reweight.agla import _matcher, keep_fraction, keep_mask, prompt_query, saliency
    from .clip import evaluate as clip_eval

    matcher = _matcher(method.matcher)
    out = {"matcher": method.matcher, "matcher_dev": clip_eval(matcher, 100, split="dev")}
    obj_kept, all_kept, sims = [], [], []
    for s in iter_scenes("dev", n_scenes):
        for it in pope_items(s, "random"):
            if it.answer != "yes":
                continue
            sim, dense = matcher.match([s.image], [prompt_query(it.question, method.template)])
            k = method.keep if method.keep is not None else keep_fraction(float(sim[0]))
            mask = keep_mask(saliency(dense[0], s.size, s.size, method.blur), k).numpy()
            target = np.zeros_like(mask)
            for o in s.objects:
                if (o.color, o.shape) == (it.color, it.shape):
                    target |= o.mask
            if target.any():
                obj_kept.append(float(mask[target].mean()))
                all_kept.append(float(mask.mean()))
                sims.append(float(sim[0]))
    out.update({"n": len(obj_kept), "similarity_mean": round(float(np.mean(sims)), 4),
                "pixels_kept": round(float(np.mean(all_kept)), 4),
                "named_object_pixels_kept": round(float(np.mean(obj_kept)), 4)})
    return out


def forced_var(acc, scenes):
    """VAR whose sinks come from the model's visual tokens (ablation): the two dimensions with the largest
    normalised activation over visual tokens at layer 2, tau = 95th percentile of phi on those dimensions."""
    import torch

    from ..reweight import VAR
    from ..reweight.var import phi

    diag = var_diagnostics(acc, scenes, 0.0)
    dims = diag["visual_top_dims_layer2"]
    ad = acc.adapter
    inputs = ad.prepare(acc.processor, [[s.image] for s in scenes], ["is there a red circle ?"] * len(scenes))
    with torch.inference_mode():
        out = acc.model(**inputs, output_hidden_states=True, use_cache=False)
    img = ad.image_token_mask(inputs) & inputs["attention_mask"].bool()
    vals = phi(out.hidden_states[2], dims)[img]
    tau = float(vals.quantile(0.95))
    return VAR(sink_dims=dims, tau=round(tau, 3), first_layer=2, skip_last=1)


# --------------------------------------------------------------------------- the run


def _timing(accs: dict, scenes, repeats: int) -> dict:
    """Median caption decode ms/token per configuration at batch 1, configurations interleaved per scene."""
    from ..datasets.shapes import CAPTION_PROMPT

    per: dict[str, list[float]] = {label: [] for label in accs}
    for _ in range(repeats):
        for s in scenes:
            for label, acc in accs.items():
                st = acc.generate(images=[s.image], prompt=CAPTION_PROMPT, max_new_tokens=24).stats
                if st.decode_ms_per_token is not None:
                    per[label].append(st.decode_ms_per_token)
    med = {label: statistics.median(v) for label, v in per.items() if v}
    base = med.get("baseline")
    return {label: {"decode_ms_per_token": round(v, 3), "ratio": round(v / base, 3) if base else None,
                    "n": len(per[label])} for label, v in med.items()}


def run_all(model_name: str = "tiny-llava-shapes", split: str = "test", limit: int = 100, batch: int = 16,
            timing_scenes: int = 8, repeats: int = 3, only: list[str] | None = None, ablation: bool = True,
            diagnose: bool = True, progress: bool = True, timing: bool = True, accuracy: bool = True) -> dict:
    from ..accelerator import VLMAccelerator
    from ..datasets.shapes import CAPTION_PROMPT, iter_scenes
    from ..policy import Policy, load_policy
    from ..reweight import DAMRO, VAR
    from .shapes import evaluate

    base = VLMAccelerator.from_pretrained(model_name, policy=None)
    model, processor = base.model, base.processor
    dev = list(iter_scenes("dev", 8))
    configs: list[tuple[str, object]] = [(label, load_policy(p) if p else None) for label, p in CONFIGS]
    configs.insert(5, (FOPRU_ONLY[0], load_policy(FOPRU_ONLY[1])))
    if ablation:
        configs.append(("VAR forced sinks (ablation)", Policy([forced_var(base, dev)], name="var-forced")))
    if only:
        unknown = set(only) - {c[0] for c in configs}
        if unknown:
            from ..errors import InputError

            raise InputError(f"--only: unknown row(s) {sorted(unknown)}; expected some of {[c[0] for c in configs]}")
        configs = [c for c in configs if c[0] in only or (timing and c[0] == "baseline")]
    accs = {label: VLMAccelerator(model, processor, policy=pol) for label, pol in configs}
    if only and "baseline" not in only:  # the baseline only serves as the timing reference
        configs = [c for c in configs if c[0] != "baseline"]
    result: dict = {"model": model_name, "split": split, "limit": limit, "decoding": "greedy", "batch": batch,
                    "rows": []}
    for label, pol in configs if accuracy else ():
        t0 = time.perf_counter()
        res = evaluate(accs[label], split=split, limit=limit, batch=batch, progress=progress)
        res["label"] = label
        res["policy"] = accs[label].policy.to_dict() if pol is not None else "none"
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        result["rows"].append(res)
        if progress:
            print(f"{label}: {_row_text(res)}", flush=True)
    if timing:
        result["timing"] = _timing(accs, list(iter_scenes(split, timing_scenes)), repeats)
        result["timing_protocol"] = (f"caption decoding ('{CAPTION_PROMPT}', max 24 tokens) at batch 1 on "
                                     f"{timing_scenes} {split} scenes, configurations interleaved, {repeats} "
                                     "rounds, median ms/token; ratio to the baseline of this run")
    if diagnose:
        var = load_policy("tiny-llava-shapes-var").reweighters[0]
        damro = load_policy("tiny-llava-shapes-damro").branch_methods[0]
        assert isinstance(var, VAR) and isinstance(damro, DAMRO)  # the shipped policies' one method each
        diag = {"var": var_diagnostics(base, dev, var.tau)}
        diag["damro"] = damro_diagnostics(base, dev, damro.k)
        diag["agla"] = agla_diagnostics(load_policy("tiny-llava-shapes-agla").branch_methods[0], 50)
        result["diagnostics"] = diag
    return result


def _row_text(res: dict) -> str:
    p = res.get("pope", {})
    return (f"VQA {res['vqa']['overall']:.3f}  POPE F1 " + " / ".join(f"{p[s]['f1']:.3f}" for s in p)
            + f"  CHAIR_s {res['chair']['chair_s']:.3f} CHAIR_i {res['chair']['chair_i']:.3f}  ({res['wall_s']} s)")


def table(result: dict, markdown: bool = True) -> str:
    head = ["method", "VQA", "POPE random acc / F1 / yes", "popular acc / F1 / yes", "adversarial acc / F1 / yes",
            "CHAIR_s / CHAIR_i", "recall", "decode ms/tok", "x baseline"]
    rows = []
    for r in result["rows"]:
        t = result.get("timing", {}).get(r["label"], {})
        p = r["pope"]
        rows.append([r["label"], f"{r['vqa']['overall']:.3f}"]
                    + [f"{p[s]['accuracy']:.3f} / {p[s]['f1']:.3f} / {p[s]['yes_ratio']:.2f}"
                       for s in ("random", "popular", "adversarial")]
                    + [f"{r['chair']['chair_s']:.3f} / {r['chair']['chair_i']:.3f}", f"{r['chair']['recall']:.3f}",
                       f"{t.get('decode_ms_per_token', float('nan')):.2f}", f"{t.get('ratio') or float('nan'):.2f}"])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(r, widths)) for r in [head] + rows)


def merge(paths: list[str]) -> dict:
    """One result from several runs: rows in the order of CONFIGS, timing and diagnostics from the run(s) that
    have them; the inputs are listed under ``merged_from``."""
    result: dict = {"rows": [], "merged_from": list(paths)}
    rows: dict = {}
    for path in paths:
        part = json.loads(Path(path).read_text())
        for k, v in part.items():
            if k not in ("rows", "merged_from"):
                result[k] = v
        rows.update({r["label"]: r for r in part.get("rows", [])})
    order = [c[0] for c in CONFIGS[:5]] + [FOPRU_ONLY[0]] + [c[0] for c in CONFIGS[5:]]
    result["rows"] = [rows[k] for k in order if k in rows] + [r for k, r in rows.items() if k not in order]
    return result


def run(a) -> int:
    only = [s.strip() for s in a.only.split(",") if s.strip()] or None
    if a.merge:
        result = merge(a.merge)
    else:
        result = run_all(a.model, a.split, a.limit, a.batch_size, a.timing_scenes, a.repeats, only, a.ablation,
                         a.diagnose, timing=a.timing, accuracy=not a.timing_only)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result, markdown=a.markdown))
    if a.json:
        print(f"\nwrote {a.json}")
    return 0
