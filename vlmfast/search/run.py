"""``vlmfast search``: find the policy that keeps a model closest to unpruned under a visual-token budget.

One Optuna study: each trial picks a method and its hyper-parameters (:mod:`.space`), runs the calibration
batches through ``VLMAccelerator`` and scores them (:mod:`.objective`, ``--objective``), reporting the running
objective after every batch; a trial is stopped early once it is *confidently* worse than the best finished
trial (its running mean plus ``PRUNE_Z`` standard errors of the per-sample values is below the best
objective), or once its measured visual share is clearly over the budget. The budget is an Optuna constraint
(TPE ranks trials over budget after all others), so over-budget trials still teach the sampler.

Seeding: the study's first trials are the ``--baselines`` (vision pruners at their defaults with ``keep`` = the
budget: :func:`.space.baseline`), run with the same objective on the same samples and chosen like any other
trial, so the policy found is never below them on the calibration data. They are trials without a ``method``
parameter (the method is the ``baseline`` attribute), so they need not be in ``--methods`` and TPE does not
resample them; they do not count towards ``--trials``.

Resuming: with ``--storage`` (e.g. ``sqlite:///search.db``) the study is stored under a name derived from
model, budget, methods and data; re-running the same command continues it until ``--trials`` trials have
finished (the TPE sampler is seeded with ``seed + trials already in the study``, so a resumed run is
reproducible and does not replay the first run's random start). A policy met twice is not run again: the
trial reuses the first one's result.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..argtypes import fraction, nonnegative_int, positive_int
from ..errors import InputError
from ..policy import Policy
from .data import load_data
from .objective import OBJECTIVES, Reference, Running, run_batch
from .space import SpaceContext, baseline, parse_methods, space_for

log = logging.getLogger("vlmfast")

#: stop a trial early once its running visual share is this far over the budget
EARLY_BUDGET_MARGIN = 0.02
#: stop a trial early once mean + PRUNE_Z * standard error of its similarities is below the best finished trial
PRUNE_Z = 2.0
#: ... but never before this many calibration samples (the standard error needs a few)
PRUNE_MIN_SAMPLES = 16


@dataclass
class SearchConfig:
    model: str
    budget: float
    methods: list[str]
    data: str = "shapes:dev"
    objective: str = OBJECTIVES[0]
    baselines: str = "divprune,cdpruner,fopru,vflowopt,fastervlm,visionzip"
    """comma-separated vision pruners run first at their defaults (``keep`` = budget); "" or "none" for none"""
    trials: int = 60
    out: str = "policy.yaml"
    storage: str | None = None
    seed: int = 0
    study: str | None = None
    batch_size: int = 8
    max_new_tokens: int = 4
    sparse: bool = False
    sparse_images: int = 8  # images per calibration prompt of the head search (multi-image prompts)
    sparse_prompts: int = 4
    sparse_recall: float = 0.95
    sparse_min_length: int = 512  # the policy's dense fallback below this many tokens
    dry_run: bool = False
    local_files_only: bool = False
    device: str = "auto"  # cuda if available, else cpu; or a device_map for transformers ("cuda:1", "cpu")
    dtype: str = "auto"
    progress: bool = True
    command: str = ""

    def validate(self) -> None:
        if not isinstance(self.budget, (int, float)) or not 0 < self.budget <= 1 or math.isnan(self.budget):
            raise InputError(f"--budget {self.budget!r}: expected the share of visual tokens to keep, 0 < budget <= 1 "
                             "(e.g. 0.25)")
        if self.trials < 1:
            raise InputError(f"--trials {self.trials}: expected at least 1")
        if self.batch_size < 1:
            raise InputError(f"--batch-size {self.batch_size}: expected at least 1")
        if self.objective not in OBJECTIVES:
            raise InputError(f"--objective {self.objective!r}: expected one of {', '.join(OBJECTIVES)}")
        if self.max_new_tokens < 1:
            raise InputError(f"--max-new-tokens {self.max_new_tokens}: expected at least 1")
        if not 0 < self.sparse_recall <= 1:
            raise InputError(f"--sparse-recall {self.sparse_recall}: expected a share of attention, 0 < recall <= 1")
        if Path(self.out).suffix not in (".yaml", ".yml"):
            raise InputError(f"--out {self.out!r}: expected a .yaml path (the policy file; the CSV and PNG are "
                             "written next to it)")

    @property
    def study_name(self) -> str:
        return self.study or (f"vlmfast-search:{self.model}:budget={self.budget:g}:methods={','.join(self.methods)}"
                              f":data={self.data}:objective={self.objective}")

    def identity(self) -> dict:
        """What must match for a stored study to be resumed."""
        return {"model": self.model, "budget": self.budget, "methods": list(self.methods), "data": self.data,
                "seed": self.seed, "batch_size": self.batch_size, "max_new_tokens": self.max_new_tokens,
                "objective": self.objective, "baselines": self.baseline_names()}

    def baseline_names(self) -> list[str]:
        spec = self.baselines if isinstance(self.baselines, str) else ",".join(self.baselines)
        return [] if spec.strip() in ("", "none") else parse_methods(spec, "--baselines")


@dataclass
class SearchResult:
    policy: Policy
    best: dict
    reference: dict
    per_method: dict
    trials: list[dict]
    paths: dict
    elapsed_s: float
    new_trials: int
    space: dict = field(default_factory=dict)


def _import_optuna():
    try:
        import optuna
    except ImportError:
        raise InputError("vlmfast search needs Optuna: pip install 'vlmfast[search]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def sparse_calibration(samples, images_per_prompt: int, prompts: int) -> list[tuple[list, str]]:
    """Multi-image calibration requests for the sparse head search: consecutive samples' images joined
    into prompts of ``images_per_prompt`` images (the long inputs sparse prefill is for), each asked with
    its first sample's prompt."""
    if images_per_prompt < 1 or prompts < 1:
        raise InputError(f"--sparse-images {images_per_prompt} / --sparse-prompts {prompts}: expected >= 1 each")
    out, images, prompt = [], [], None
    for s in samples:
        prompt = prompt or s.prompt
        images += list(s.images)
        if len(images) >= images_per_prompt:
            out.append((images[:images_per_prompt], prompt))
            images, prompt = [], None
            if len(out) == prompts:
                break
    if not out:
        n = sum(len(s.images) for s in samples)
        raise InputError(f"--sparse: the calibration data holds {n} images, fewer than --sparse-images "
                         f"{images_per_prompt} for one prompt; give more data or fewer images per prompt")
    return out


def _sparse_search(cfg: SearchConfig, base, samples: list[tuple[list, str]]) -> tuple[str, dict]:
    """MMInference's offline per-head pattern search on :func:`sparse_calibration`'s ``samples``; returns the
    head-pattern file's path and the ``mminference`` policy entry that points to it."""
    from .heads import search_heads

    heads = Path(cfg.out).with_suffix(".heads.json")
    heads.parent.mkdir(parents=True, exist_ok=True)
    res = search_heads(base.model, base.processor, samples, target_recall=cfg.sparse_recall, model_name=cfg.model,
                       path=heads, progress=cfg.progress)
    recall = [s["recall"] for layer in res.scores for s in layer.values()]
    density = [s["density"] for layer in res.scores for s in layer.values()]
    log.info("vlmfast search --sparse: %d heads, mean recall %.3f, mean density %.3f -> %s", len(recall),
             sum(recall) / len(recall), sum(density) / len(density), heads)
    return str(heads), {"method": "mminference", "heads": str(heads), "min_length": cfg.sparse_min_length}


def _storage(optuna, url: str | None):
    if url is None:
        return None
    if url.startswith(("sqlite:", "postgresql", "mysql")):
        try:
            return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180)
        except Exception as e:  # sqlalchemy's errors: bad URL, missing folder
            raise InputError(f"--storage {url!r}: cannot open it: {e}") from None
    raise InputError(f"--storage {url!r}: expected a database URL such as sqlite:///search.db")


def _context(acc, budget: float, reference_tokens: int) -> SpaceContext:
    info = acc.adapter.info()
    return SpaceContext(budget=budget, n_layers=info.num_layers, n_vision_layers=info.num_vision_layers,
                        feature_layer=acc.adapter.resolve_vision_layer(None), tokens_per_image=reference_tokens,
                        multi_view=acc.adapter.multi_view)


def describe_space(ctx: SpaceContext, methods: list[str]) -> dict:
    out = {}
    for m in methods:
        sp = space_for(m)
        why = sp.infeasible(ctx)
        out[m] = {"infeasible": why} if why else {"params": sp.describe(ctx)}
    return out


def run(cfg: SearchConfig) -> SearchResult:
    cfg.validate()
    cfg.methods = parse_methods(cfg.methods if isinstance(cfg.methods, str) else ",".join(cfg.methods))
    baselines = cfg.baseline_names()
    data = load_data(cfg.data)
    optuna = _import_optuna()
    # built (and checked) before the expensive part
    sparse_samples = sparse_calibration(data.samples, cfg.sparse_images, cfg.sparse_prompts) if cfg.sparse else None
    from ..accelerator import VLMAccelerator

    t0 = time.perf_counter()
    base = VLMAccelerator.from_pretrained(cfg.model, policy=None, local_files_only=cfg.local_files_only,
                                          **_placement(cfg))
    batches = data.batches(cfg.batch_size)

    # the unpruned model: reference hidden states, answers and their log-probabilities, accuracy, tokens
    reference, ref_run = [], Running(kind=cfg.objective)
    for batch in tqdm(batches, desc="reference (unpruned)", disable=not cfg.progress, leave=False):
        ref, res = Reference.of(base, batch, cfg.max_new_tokens, answer=cfg.objective == "answer")
        reference.append(ref)
        ref_run.add(res, ref, batch)
    tokens_per_image = round(sum(ref_run.visual_tokens) / max(1, sum(len(s.images) for s in data.samples)))
    ctx = _context(base, cfg.budget, tokens_per_image)
    space = describe_space(ctx, cfg.methods)
    methods = [m for m in cfg.methods if "infeasible" not in space[m]]
    for m in cfg.methods:
        if m not in methods:
            log.warning("vlmfast search: %s left out: %s", m, space[m]["infeasible"])
    if not methods:
        why = "; ".join(f"{m}: {v['infeasible']}" for m, v in space.items())
        raise InputError(f"--methods {','.join(cfg.methods)}: none can meet budget {cfg.budget:g} on this model "
                         f"({why})")
    if cfg.dry_run:
        return SearchResult(Policy(), {}, ref_run.summary(), {}, [], {}, time.perf_counter() - t0, 0, space)

    study = _open_study(optuna, cfg)
    done_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    finished = [t for t in study.trials if t.state in done_states]
    queued = {t.user_attrs["baseline"] for t in study.trials if "baseline" in t.user_attrs}
    for name in baselines:  # first in the queue; once per study (a resumed study has them already)
        if name not in queued:
            study.enqueue_trial({}, user_attrs={"baseline": name})
    waiting = [t for t in study.trials if t.state == optuna.trial.TrialState.WAITING and "baseline" in t.user_attrs]
    remaining = max(0, cfg.trials - sum("baseline" not in t.user_attrs for t in finished)) + len(waiting)
    study.sampler = optuna.samplers.TPESampler(
        seed=cfg.seed + len(study.trials), multivariate=True, group=True,
        n_startup_trials=min(10, max(4, cfg.trials // 4)),
    )
    if finished:
        log.info("vlmfast search: resuming study %r: %d trials finished, %d to go", cfg.study_name, len(finished),
                 remaining)
    seen = {t.user_attrs["policy_key"]: t for t in finished if "policy_key" in t.user_attrs}
    spaces = {m: space_for(m) for m in methods}

    def objective(trial):
        name = trial.user_attrs.get("baseline")
        if name is not None:
            policy = Policy([baseline(name, cfg.budget)], source=f"baseline {name}")
        else:
            name = trial.suggest_categorical("method", methods)
            policy = Policy([spaces[name].suggest(trial, ctx)], source=f"trial {trial.number}")
        entries = policy.to_dict()["methods"]
        key = json.dumps(entries, sort_keys=True)
        trial.set_user_attr("policy", entries)
        trial.set_user_attr("policy_key", key)
        if key in seen:  # the sampler proposed a policy already measured: reuse its result
            return _replay(optuna, trial, seen[key])
        acc = VLMAccelerator(base.model, base.processor, policy=policy)
        run_ = Running(kind=cfg.objective)
        best = _best(optuna, trial.study.trials)
        for step, (batch, ref) in enumerate(zip(batches, reference)):
            score = ref.answers if cfg.objective == "answer" else None
            run_.add(run_batch(acc, batch, cfg.max_new_tokens, score=score), ref, batch)
            _record(trial, run_, cfg.budget, step)
            trial.report(run_.objective, step)
            last = step == len(batches) - 1  # at the last batch stopping saves nothing: finish the trial
            stop = None if last else ("over budget" if run_.share > cfg.budget + EARLY_BUDGET_MARGIN
                                      else "confidently worse" if _confidently_worse(run_, best) else None)
            if stop:
                trial.set_user_attr("stopped", stop)
                _constrain(trial)
                raise optuna.TrialPruned()
        _constrain(trial)
        return run_.objective

    def remember(study_, trial):
        if "policy_key" in trial.user_attrs and trial.user_attrs.get("duplicate_of") is None:
            seen.setdefault(trial.user_attrs["policy_key"], trial)

    bar = tqdm(total=cfg.trials, initial=cfg.trials - remaining, desc="search", disable=not cfg.progress)

    def progress(study_, trial):
        bar.update(1)
        best = _best(optuna, study_.trials)
        if best is not None:
            bar.set_postfix(best=f"{best.value:.4f}", method=_method(best))

    try:
        if remaining:
            study.optimize(objective, n_trials=remaining, callbacks=[remember, progress], gc_after_trial=False)
    finally:
        bar.close()
    new_trials = remaining

    best = _best(optuna, study.trials)
    if best is None:
        raise InputError(f"no trial of study {cfg.study_name!r} met budget {cfg.budget:g} over all calibration "
                         "samples; raise --trials or --budget, or add a method whose token count follows the budget "
                         "(e.g. fopru)")
    entries, heads = list(best.user_attrs["policy"]), None
    if sparse_samples is not None:  # sparse prefill over the tokens the found pruning keeps
        heads, entry = _sparse_search(cfg, base, sparse_samples)
        entries.append(entry)
    policy = Policy.from_dict({"name": Path(cfg.out).stem,
                               "description": f"found by vlmfast search (budget {cfg.budget:g}, {cfg.data})",
                               "models": _model_patterns(cfg.model), "methods": entries},
                              source=cfg.out)
    rows = [_row(optuna, t) for t in study.trials]
    elapsed = time.perf_counter() - t0
    result = SearchResult(policy, _row(optuna, best), ref_run.summary(), _per_method(rows), rows, {}, elapsed,
                          new_trials, space)
    from .report import write_outputs

    result.paths = write_outputs(cfg, result, base)
    if heads is not None:
        result.paths["heads"] = heads
    return result


def _placement(cfg: SearchConfig) -> dict:
    import torch

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.dtype not in ("auto", "float32", "float16", "bfloat16"):
        raise InputError(f"--dtype {cfg.dtype!r}: expected auto, float32, float16 or bfloat16")
    return {"device_map": device, "dtype": cfg.dtype if cfg.dtype == "auto" else getattr(torch, cfg.dtype)}


def _open_study(optuna, cfg: SearchConfig):
    storage = _storage(optuna, cfg.storage)
    study = optuna.create_study(storage=storage, study_name=cfg.study_name, direction="maximize",
                                load_if_exists=True,
                                pruner=optuna.pruners.NopPruner())  # early stops: _confidently_worse
    stored = study.user_attrs.get("config")
    mine = cfg.identity()
    if stored is None:
        study.set_user_attr("config", mine)
    elif stored != mine:
        diff = ", ".join(f"{k}: stored {stored.get(k)!r}, given {v!r}" for k, v in mine.items() if stored.get(k) != v)
        raise InputError(f"--storage {cfg.storage}: study {cfg.study_name!r} was created with other settings ({diff}); "
                         "re-run with the stored settings to resume it, or pass --study NAME for a new study")
    return study


def _confidently_worse(run_: Running, best) -> bool:
    """True when the trial's running objective is below the best finished trial's by more than ``PRUNE_Z``
    standard errors of its per-sample objective values (needs ``PRUNE_MIN_SAMPLES`` samples). A rank rule such as
    Optuna's median pruner stops good trials on an unlucky first batch; this one only stops what the samples
    seen so far already rule out."""
    sims = run_.values
    if best is None or len(sims) < PRUNE_MIN_SAMPLES:
        return False
    mean = sum(sims) / len(sims)
    se = math.sqrt(sum((x - mean) ** 2 for x in sims) / (len(sims) - 1) / len(sims))
    return mean + PRUNE_Z * se < best.value


def _record(trial, run_: Running, budget: float, step: int) -> None:
    s = run_.summary()
    for k, v in s.items():
        trial.set_user_attr(k, v)
    trial.set_user_attr("step", step)
    trial.set_user_attr("budget_excess", round(run_.share - budget, 6) if run_.share > budget + 1e-9 else 0.0)


def _replay(optuna, trial, first):
    for k, v in first.user_attrs.items():
        if k not in ("policy", "policy_key", "duplicate_of", "baseline"):
            trial.set_user_attr(k, v)
    trial.set_user_attr("duplicate_of", first.number)
    _constrain(trial)
    if first.state == optuna.trial.TrialState.COMPLETE:
        return first.value
    if first.intermediate_values:
        step = max(first.intermediate_values)
        trial.report(first.intermediate_values[step], step)
    raise optuna.TrialPruned()


def _constrain(trial) -> None:
    """The budget as an Optuna constraint (feasible when <= 0): TPE ranks trials over budget after the others."""
    trial.set_constraint("budget", float(trial.user_attrs.get("budget_excess", 0.0)))


def _best(optuna, trials):
    ok = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE
          and t.user_attrs.get("budget_excess", 0.0) <= 0]
    return max(ok, key=lambda t: (t.value, -t.number)) if ok else None


def _model_patterns(model: str) -> list[str]:
    """The model as given, and a pattern on its last path component (what ``default_policy_for`` matches)."""
    stem = Path(model.rstrip("/")).name or model
    return [model, f"*{stem}*"]


def _method(t) -> str | None:
    """A trial's method: its ``method`` parameter, or the baseline it ran."""
    return t.params.get("method", t.user_attrs.get("baseline"))


def _row(optuna, t) -> dict:
    a = t.user_attrs
    return {"number": t.number, "state": t.state.name, "method": _method(t), "baseline": "baseline" in a,
            "objective": t.value if t.state == optuna.trial.TrialState.COMPLETE else a.get("objective"),
            "similarity": a.get("similarity"), "answer_kl": a.get("answer_kl"), "agreement": a.get("agreement"),
            "visual_share": a.get("visual_share"), "visual_tokens": a.get("visual_tokens"),
            "accuracy": a.get("accuracy"), "budget_excess": a.get("budget_excess"),
            "feasible": t.state == optuna.trial.TrialState.COMPLETE and a.get("budget_excess", 0.0) <= 0,
            "samples": a.get("n"), "stopped": a.get("stopped"), "duplicate_of": a.get("duplicate_of"),
            "prefill_s": a.get("prefill_s"),
            "duration_s": round(t.duration.total_seconds(), 3) if t.duration else None,
            "policy": a.get("policy"), "params": t.params}


def _per_method(rows: list[dict]) -> dict:
    out: dict[str, dict] = {}
    for r in rows:
        if r["feasible"] and (r["method"] not in out or r["objective"] > out[r["method"]]["objective"]):
            out[r["method"]] = r
    return out


# -- command line ----------------------------------------------------------------------------------------------
def add_arguments(p):
    p.add_argument("--model", required=True, help="hub id, local folder, or zoo name (tiny-llava-shapes, ...)")
    p.add_argument("--budget", type=fraction, required=True,
                   help="share of visual tokens the LLM may see, averaged over its layers (e.g. 0.25)")
    p.add_argument("--methods", default="fopru,vflowopt,zipvl,fastv",
                   help="comma-separated methods to search over (default: fopru,vflowopt,zipvl,fastv)")
    p.add_argument("--data", default="shapes:dev",
                   help="calibration data: shapes:dev[:N] (default N=32), shapes:train:N, or jsonl:PATH "
                        "(ShapesWorld test and final are refused: they are held out)")
    p.add_argument("--objective", default=OBJECTIVES[0], choices=OBJECTIVES,
                   help="answer (default): minus the KL divergence of the policy's next-token distributions from "
                        "the unpruned model's along its answers (teacher-forced); hidden: VFlowOpt's cosine of the "
                        "last prompt token's final hidden state")
    p.add_argument("--baselines", default=SearchConfig.baselines,
                   help="vision pruners run first at their defaults with keep = the budget, chosen like any trial "
                        f"(default: {SearchConfig.baselines}; 'none' for none)")
    p.add_argument("--trials", type=positive_int, default=60,
                   help="trials in the study (a resumed study runs the rest)")
    p.add_argument("--out", required=True, help="policy YAML to write; PATH.trials.csv and PATH.pareto.png beside")
    p.add_argument("--storage", default=None, help="Optuna storage to resume from, e.g. sqlite:///search.db "
                                                   "(default: in memory, not resumable)")
    p.add_argument("--study", default=None, help="study name in the storage (default: from model/budget/methods/data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=8,
                   help="calibration samples per batch (one pruning check each)")
    p.add_argument("--max-new-tokens", type=positive_int, default=4, help="answer length for the accuracy column")
    p.add_argument("--sparse", action="store_true",
                   help="also run MMInference's per-head sparse-pattern search on multi-image prompts built from "
                        "--data, write PATH.heads.json and add an mminference entry pointing to it to the policy")
    p.add_argument("--sparse-images", type=positive_int, default=8, help="images per calibration prompt of --sparse")
    p.add_argument("--sparse-prompts", type=positive_int, default=4, help="calibration prompts of --sparse")
    p.add_argument("--sparse-recall", type=fraction, default=0.95,
                   help="attention recall each head's pattern must reach")
    p.add_argument("--sparse-min-length", type=nonnegative_int, default=512,
                   help="the policy runs dense attention below this many prefill tokens")
    p.add_argument("--dry-run", action="store_true", help="print the search space for this model and budget, and stop")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cuda, cuda:1, cpu, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="weights dtype (auto: the checkpoint's)")
    p.add_argument("--local-files-only", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(a) -> int:
    import sys

    cfg = SearchConfig(model=a.model, budget=a.budget, methods=a.methods, data=a.data, objective=a.objective,
                       baselines=a.baselines, trials=a.trials, out=a.out,
                       storage=a.storage, seed=a.seed, study=a.study, batch_size=a.batch_size,
                       max_new_tokens=a.max_new_tokens, sparse=a.sparse,
                       sparse_images=a.sparse_images, sparse_prompts=a.sparse_prompts, sparse_recall=a.sparse_recall,
                       sparse_min_length=a.sparse_min_length, dry_run=a.dry_run,
                       local_files_only=a.local_files_only, device=a.device, dtype=a.dtype,
                       progress=not a.no_progress,
                       command="vlmfast " + " ".join(sys.argv[1:]) if sys.argv else "")
    res = run(cfg)
    from .report import summary

    print(summary(cfg, res))
    return 0

