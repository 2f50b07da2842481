"""`vlmfast search`: search spaces under the budget, the objective and budget unit, data specs, the CLI
(valid YAML, CSV, plot), resuming from storage, and clear errors. Tiny random-weight LLaVA; a few trials."""

from __future__ import annotations

import csv
import json
import math
import re

import pytest
import torch
from conftest import make_image

from vlmfast import InputError, VLMAccelerator, load_policy
from vlmfast.cli import main
from vlmfast.policy import Policy
from vlmfast.pruners import CDPruner, Downsample, FastV, FoPru, ZipVL
from vlmfast.search import SpaceContext, describe_space, load_data, space_for
from vlmfast.search.objective import last_hidden, visual_share
from vlmfast.search.report import pareto_front
from vlmfast.search.space import _layer_average
from vlmfast.stats import Stats

optuna = pytest.importorskip("optuna")

MODEL = "tiny-random-llava"
BASELINES = ["divprune", "cdpruner", "fopru", "vflowopt", "fastervlm", "visionzip"]  # --baselines' default


def _ctx(n_layers=8, budget=0.25, tokens=64, multi_view=False):
    return SpaceContext(budget=budget, n_layers=n_layers, n_vision_layers=4, feature_layer=2, tokens_per_image=tokens,
                        multi_view=multi_view)


def _trial(seed=0):
    return optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed)).ask()


# -- the space: every sampled policy spends at most the budget, by the same formula the stats use -------------------
def test_fastv_keep_solved_from_the_budget():
    ctx = _ctx(n_layers=8, budget=0.25)  # layers before K see all: K < 2, so K = 1 and keep = (2 - 1) / 7
    m = space_for("fastv").suggest(_trial(), ctx)
    assert m.layer == 1 and m.keep == pytest.approx(1 / 7, abs=1e-4) and m.keep <= 1 / 7
    assert _layer_average(1.0, [m.layer], [m.keep], 8) == pytest.approx(0.25, abs=1e-3)


def test_layer_pruners_left_out_when_the_budget_is_unreachable():
    space = describe_space(_ctx(n_layers=4, budget=0.25), ["fopru", "fastv", "pyramiddrop"])
    assert "above 1/4 = 0.25" in space["fastv"]["infeasible"] and "infeasible" in space["pyramiddrop"]
    assert "strategy: one of rank, row" in space["fopru"]["params"]
    assert "keep = 0.25" in space["fopru"]["params"][-1]


@pytest.mark.parametrize("seed", range(12))
def test_vflowopt_and_pyramiddrop_samples_meet_the_budget(seed):
    ctx = _ctx(n_layers=12, budget=0.3)
    v = space_for("vflowopt").suggest(_trial(seed), ctx)
    avg = _layer_average(v.keep, v.llm_layers, v.llm_keep, 12)
    assert v.keep >= 0.3 - 1e-9 and avg <= 0.3 + 1e-6 and avg >= 0.3 - 0.01, v
    p = space_for("pyramiddrop").suggest(_trial(seed), ctx)
    avg = _layer_average(1.0, p.layers, [p.ratio] * len(p.layers), 12)
    assert p.layers[0] <= 3 and avg <= 0.3 + 1e-6 and avg >= 0.3 - 0.01, p


def test_schema_derived_space_and_unknown_method():
    dims = {d.name: d for d in space_for("visionzip").dims(_ctx())}
    assert dims["contextual"].low == 0.0 and dims["contextual"].high == 0.5  # explicit range
    assert dims["layer"].choices == (None, -1)  # upper half of a 4-layer tower, feature layer 2 excluded
    assert space_for("random").fixed(_ctx()) == ["seed"]
    m = space_for("zipvl").suggest(_trial(), _ctx(n_layers=8, budget=0.25))
    assert isinstance(m, ZipVL) and 0.1 <= m.tau <= 0.999 and m.first_layer in (0, 1) and m.kv == "quantize"
    with pytest.raises(InputError, match="unknown method 'nope'"):
        space_for("nope")



def test_cdpruner_and_downsample_are_choices_that_spend_the_budget():
    for name, cls in (("cdpruner", CDPruner), ("downsample", Downsample)):
        m = space_for(name).suggest(_trial(), _ctx(budget=0.1))
        assert type(m) is cls and m.keep == 0.1
    assert space_for("cdpruner").fixed(_ctx()) == ["theta"]  # None: the paper's kernel


@pytest.mark.parametrize("method", ["fopru", "divprune", "vflowopt"])
def test_view_budget_is_searched_only_where_images_are_several_views(method):
    one, several = _ctx(), _ctx(multi_view=True)
    assert "view_budget" not in {d.name for d in space_for(method).dims(one)}
    assert space_for(method).suggest(_trial(), one).view_budget == "proportional"
    dims = {d.name: d for d in space_for(method).dims(several)}
    assert dims["view_budget"].choices == ("proportional", "base")
    picked = {space_for(method).suggest(_trial(seed), several).view_budget for seed in range(8)}
    assert picked == {"proportional", "base"}  # the trial's choice reaches the method


# -- the objective's pieces ---------------------------------------------------------------------------------------
def test_visual_share_for_layer_pruners_and_zipvl():
    st = Stats(visual_tokens_in=64, visual_tokens_kept=64, visual_tokens_per_layer=[64, 64, 16, 16])
    assert visual_share(st, Policy([FastV(layer=2, keep=0.25)])) == pytest.approx(0.625)
    st = Stats(visual_tokens_in=64, visual_tokens_kept=16, visual_tokens_per_layer=[16] * 4)
    assert visual_share(st, Policy([FoPru(keep=0.25)])) == pytest.approx(0.25)
    st = Stats(visual_tokens_in=64, visual_tokens_kept=64, visual_tokens_per_layer=[64] * 4,
               stages=[{"stage": "attention", "method": "zipvl", "layer": None, "important_share": 0.5, "kv": "none"}])
    assert visual_share(st, Policy([ZipVL(first_layer=1)])) == pytest.approx((1 + 3 * 0.5) / 4)


def test_last_hidden_is_the_final_hidden_state_of_the_last_prompt_token():
    acc = VLMAccelerator.from_pretrained(MODEL, policy=None)
    img, prompt = make_image(3), "what colour is the star ?"
    with last_hidden(acc.model) as seen:
        acc.generate(images=[img], prompt=prompt, max_new_tokens=3)
    assert seen and seen[0].shape == (1, acc.model.config.text_config.hidden_size)  # the first call is the prefill
    inputs = acc.adapter.prepare(acc.processor, [[img]], [prompt])
    with torch.inference_mode():
        ref = acc.model.model(**inputs).last_hidden_state[:, -1]
    torch.testing.assert_close(seen[0], ref.float(), rtol=1e-4, atol=1e-5)
    assert not acc.model.get_output_embeddings()._forward_pre_hooks  # removed after the block


def test_early_stop_only_when_confidently_worse_than_the_best():
    from types import SimpleNamespace

    from vlmfast.search.objective import Running
    from vlmfast.search.run import PRUNE_MIN_SAMPLES, _confidently_worse

    best = SimpleNamespace(value=0.95)
    run_ = Running(similarity=[0.90, 0.92] * (PRUNE_MIN_SAMPLES // 2))  # mean 0.91, s.e. ~0.0026
    assert _confidently_worse(run_, best)
    assert not _confidently_worse(run_, None)  # nothing finished yet
    assert not _confidently_worse(Running(similarity=run_.similarity[:-1]), best)  # too few samples
    noisy = Running(similarity=[0.80, 1.0] * (PRUNE_MIN_SAMPLES // 2))  # mean 0.90, s.e. 0.026: could still win
    assert not _confidently_worse(noisy, best)
    assert not _confidently_worse(Running(similarity=[0.96] * PRUNE_MIN_SAMPLES), best)  # better than the best


def test_answer_objective_separates_policies_whose_answers_and_accuracy_tie():
    """Known answer, by hand: three runs answer every sample the same (agreement and accuracy tie); the one whose
    next-token distribution stays closer to the reference's gets the higher objective, by exactly -KL."""
    from vlmfast.search.data import Sample
    from vlmfast.search.objective import BatchResult, Reference, Running

    ref_p, near_p, far_p = [0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.4, 0.4, 0.2]  # one answer token, argmax 0 in each
    logp = lambda p: torch.tensor([p]).log()  # noqa: E731  (tokens, vocab)
    batch = [Sample([], "q ?", "red", "color")]
    ref = Reference(torch.ones(1, 4), ["red"], [logp(ref_p)])
    runs = {}
    for name, p in (("same", ref_p), ("near", near_p), ("far", far_p)):
        r = Running(kind="answer")
        r.add(BatchResult(torch.ones(1, 4), ["red"], [0.25], [1.0], [0.0], [logp(p)]), ref, batch)
        runs[name] = r
    assert {r.accuracy for r in runs.values()} == {1.0} and {r.agreement[0] for r in runs.values()} == {True}
    assert {r.summary()["similarity"] for r in runs.values()} == {1.0}  # the hidden objective ties them too
    kl = lambda q: sum(a * math.log(a / b) for a, b in zip(ref_p, q))  # noqa: E731
    assert runs["same"].objective == pytest.approx(0.0, abs=1e-7)
    assert runs["near"].objective == pytest.approx(-kl(near_p), rel=1e-5)
    assert runs["far"].objective == pytest.approx(-kl(far_p), rel=1e-5)
    assert runs["same"].objective > runs["near"].objective > runs["far"].objective


def test_answer_objective_ranks_the_identity_above_pruning_on_a_tiny_model():
    """On the tiny random model every policy's accuracy on ShapesWorld is 0 (a tie); the answer objective, measured
    through generate + teacher forcing, puts keep-all (the identity: exactly 0) above keeping 1 token in 64."""
    from vlmfast.search.objective import Reference, Running, run_batch

    base = VLMAccelerator.from_pretrained(MODEL, policy=None)
    batches = load_data("shapes:dev:4").batches(2)
    refs = [Reference.of(base, b, 3)[0] for b in batches]
    scores = {}
    for keep in (1.0, 0.02):
        acc = VLMAccelerator(base.model, base.processor, policy=Policy([FoPru(keep=keep)]))
        r = Running(kind="answer")
        for b, ref in zip(batches, refs):
            r.add(run_batch(acc, b, 3, score=ref.answers), ref, b)
        assert len(r.answer_kl) == 4 and r.accuracy == 0.0
        scores[keep] = r.objective
    assert scores[1.0] == pytest.approx(0.0, abs=1e-6)
    assert scores[0.02] < -1e-4


def test_pareto_front():
    pts = [(0.5, 0.9), (0.25, 0.8), (0.25, 0.7), (0.3, 0.95), (0.9, 0.95), (1.0, 1.0)]
    assert [pts[i] for i in pareto_front(pts)] == [(0.25, 0.8), (0.3, 0.95), (1.0, 1.0)]


# -- data ----------------------------------------------------------------------------------------------------------
def test_shapes_data_cycles_question_types():
    from vlmfast.datasets.shapes import QUESTION_TYPES, iter_scenes, vqa_items

    data = load_data("shapes:dev:10")
    assert len(data.samples) == 10 and data.has_answers
    for i, (s, scene) in enumerate(zip(data.samples, iter_scenes("dev", 10))):
        items = vqa_items(scene, max_per_type=1)
        want = QUESTION_TYPES[i % 5]  # types in turn; another of the scene's questions when it has none
        assert s.type == want or want not in {it.type for it in items}
        assert (s.prompt, s.answer) in {(it.question, it.answer) for it in items}
    assert len({s.type for s in data.samples}) >= 4
    assert len(load_data("shapes:dev").samples) == 32


def test_jsonl_data(tmp_path):
    make_image(0).save(tmp_path / "a.png")
    make_image(1).save(tmp_path / "b.png")
    f = tmp_path / "calib.jsonl"
    f.write_text('{"image": "a.png", "prompt": "what is it ?", "answer": "a star"}\n\n'
                 f'{{"image": ["{tmp_path / "b.png"}", "a.png"], "prompt": "is it red ?", "answer": "yes", '
                 '"type": "yes_no"}\n')
    data = load_data(f"jsonl:{f}")
    assert [len(s.images) for s in data.samples] == [1, 2] and data.has_answers
    assert data.samples[0].images[0].size == (112, 112) and data.samples[1].type == "yes_no"
    f.write_text('{"image": "a.png", "prompt": "what is it ?"}\n')
    assert not load_data(f"jsonl:{f}").has_answers


@pytest.mark.parametrize("line, match", [
    ('{"image": "a.png"}', "missing \\['prompt'\\]"),
    ('{"image": "a.png", "prompt": "x", "label": 1}', "unknown key\\(s\\) \\['label'\\]"),
    ('{"image": "zzz.png", "prompt": "x"}', "cannot open image file"),
    ("not json", "calib.jsonl:1: not valid JSON"),
    ('{"image": "a.png", "prompt": "x", "answer": "y"}\n{"image": "a.png", "prompt": "x"}',
     "1 of 2 lines have an \"answer\""),
])
def test_jsonl_errors(tmp_path, line, match):
    make_image(0).save(tmp_path / "a.png")
    f = tmp_path / "calib.jsonl"
    f.write_text(line + "\n")
    with pytest.raises(InputError, match=match):
        load_data(f"jsonl:{f}")


# -- the CLI -------------------------------------------------------------------------------------------------------
def _search(tmp_path, *extra, trials=3, out="pol.yaml"):
    return main(["search", "--model", MODEL, "--budget", "0.25", "--methods", "fopru,vflowopt,zipvl",
                 "--data", "shapes:dev:4", "--batch-size", "2", "--trials", str(trials),
                 "--out", str(tmp_path / out), "--no-progress", *extra])


def test_search_writes_a_valid_policy_csv_and_plot(tmp_path, capsys):
    assert _search(tmp_path) == 0
    printed = capsys.readouterr().out
    text = (tmp_path / "pol.yaml").read_text()
    assert text.startswith("# vlmfast search") and "# model: tiny-random-llava" in text
    assert "# data: shapes:dev:4 (4 samples)" in text and "# budget: 0.25" in text and "# date: " in text
    pol = load_policy(tmp_path / "pol.yaml")
    assert len(pol.methods) == 1 and pol.methods[0].method_name in ("fopru", "vflowopt", "zipvl", *BASELINES)
    acc = VLMAccelerator.from_pretrained(MODEL, policy=str(tmp_path / "pol.yaml"))  # binds to the model
    out = acc.generate(images=[make_image(0)], prompt="what is it ?", max_new_tokens=2)
    assert out.stats.visual_tokens_in == 64
    with open(tmp_path / "pol.trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 + len(BASELINES) and {r["state"] for r in rows} <= {"COMPLETE", "PRUNED"}
    assert [r["method"] for r in rows if r["baseline"] == "True"] == BASELINES  # the first trials
    assert all(r["baseline"] == "True" for r in rows[:len(BASELINES)])
    best = [r for r in rows if r["feasible"] == "True"]
    assert best and all(float(r["visual_share"]) <= 0.25 + 1e-9 for r in best)
    assert all(json.loads(r["policy"])[0]["method"] in ("fopru", "vflowopt", "zipvl")
               for r in rows if r["baseline"] == "False")
    assert (tmp_path / "pol.pareto.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((tmp_path / "pol.search.json").read_text())
    assert summary["reference"]["objective"] == 0.0 and summary["reference"]["similarity"] == pytest.approx(1.0)
    assert summary["trials"] == 3 + len(BASELINES) and summary["objective"] == "answer"
    assert f"objective (answer): {summary['best']['objective']:.4f}" in text
    assert "unpruned" in printed and "wrote policy" in printed


def test_search_is_seeded_with_the_baselines_and_never_chooses_below_them(tmp_path):
    storage = f"sqlite:///{tmp_path / 'search.db'}"
    assert _search(tmp_path, "--methods", "zipvl", "--baselines", "divprune,random", "--storage", storage,
                   trials=2) == 0
    rows = list(csv.DictReader(open(tmp_path / "pol.trials.csv")))
    assert [(r["method"], r["baseline"]) for r in rows[:2]] == [("divprune", "True"), ("random", "True")]
    assert [r["method"] for r in rows[2:]] == ["zipvl", "zipvl"]  # baselines are not in the sampled methods
    assert json.loads(rows[0]["policy"]) == [{"method": "divprune", "keep": 0.25}]
    feasible = [float(r["objective"]) for r in rows if r["feasible"] == "True"]
    summary = json.loads((tmp_path / "pol.search.json").read_text())
    assert summary["best"]["objective"] == max(feasible)
    assert summary["best"]["objective"] >= max(float(r["objective"]) for r in rows[:2])
    assert summary["baselines"] == ["divprune", "random"]
    assert _search(tmp_path, "--methods", "zipvl", "--baselines", "divprune,random", "--storage", storage,
                   trials=3) == 0  # resumed: one more trial, the baselines are not run again
    again = list(csv.DictReader(open(tmp_path / "pol.trials.csv")))
    assert len(again) == 5 and sum(r["baseline"] == "True" for r in again) == 2


@pytest.mark.parametrize("objective, identity", [("answer", 0.0), ("hidden", 1.0)])
def test_full_budget_keeps_the_model_unchanged(tmp_path, objective, identity):
    """keep = 100% is the keep-all invariant: the objective is exactly that of the unpruned model (KL 0,
    cos(h, h) = 1), and so is every baseline's."""
    rc = main(["search", "--model", MODEL, "--budget", "1", "--methods", "fopru", "--data", "shapes:dev:2",
               "--trials", "2", "--objective", objective, "--out", str(tmp_path / "p.yaml"), "--no-progress"])
    assert rc == 0
    summary = json.loads((tmp_path / "p.search.json").read_text())
    best = summary["best"]
    assert best["objective"] == pytest.approx(identity, abs=1e-6) and best["visual_share"] == 1.0
    assert best["similarity"] == pytest.approx(1.0, abs=1e-6) and best["agreement"] == 1.0
    assert (best["answer_kl"] is None) == (objective == "hidden")


def test_search_resumes_from_storage(tmp_path):
    storage = f"sqlite:///{tmp_path / 'search.db'}"
    assert _search(tmp_path, "--storage", storage, "--seed", "3", trials=2) == 0
    first = list(csv.DictReader(open(tmp_path / "pol.trials.csv")))
    assert _search(tmp_path, "--storage", storage, "--seed", "3", trials=4) == 0
    second = list(csv.DictReader(open(tmp_path / "pol.trials.csv")))
    n = len(BASELINES)  # run once, first, and not counted in --trials
    assert len(first) == 2 + n and len(second) == 4 + n
    assert [r["params"] for r in second[:2 + n]] == [r["params"] for r in first]  # continued, not restarted
    assert json.loads((tmp_path / "pol.search.json").read_text())["new_trials"] == 2
    name = optuna.get_all_study_names(storage)
    assert len(name) == 1 and len(optuna.load_study(study_name=name[0], storage=storage).trials) == 4 + n
    # the study remembers its settings: another seed (or budget, data...) is refused, naming the difference
    assert _search(tmp_path, "--storage", storage, "--seed", "4", trials=5) == 2


@pytest.mark.parametrize("args, match", [
    (["--methods", "fopru,nope"], "unknown method 'nope'"),
    (["--methods", "fopru,fopru"], "listed twice"),
    (["--methods", ""], "expected a comma-separated list"),
    (["--budget", "0"], r"argument --budget: expected a fraction in \(0, 1\], got '0'"),
    (["--budget", "1.5"], r"argument --budget: expected a fraction in \(0, 1\], got '1.5'"),
    (["--budget", "nan"], r"argument --budget: expected a number, got 'nan'"),
    (["--data", "shapes:test:8"], "test split is for evaluation"),
    (["--data", "shapes:final:8"], "final split is kept for reported numbers only.*would spoil it"),
    (["--objective", "accuracy"], "argument --objective: invalid choice: 'accuracy'"),
    (["--baselines", "fastv"], "'fastv' is not a vision pruner with a 'keep' field"),
    (["--baselines", "nope"], "--baselines: unknown method 'nope'"),
    (["--data", "shapes:val"], "unknown ShapesWorld split 'val'"),
    (["--data", "shapes:dev:x"], "N must be a positive integer"),
    (["--data", "jsonl:/no/such.jsonl"], "is not a file"),
    (["--data", "coco:train"], "unknown source 'coco'"),
    (["--out", "policy.json"], "expected a .yaml path"),
    (["--trials", "0"], "argument --trials: expected an integer >= 1, got '0'"),
    (["--methods", "fastv"], "none can meet budget 0.25"),
    (["--storage", "redis://x"], "expected a database URL"),
])
def test_clear_errors(tmp_path, capsys, args, match):
    base = {"--model": MODEL, "--budget": "0.25", "--methods": "fopru", "--data": "shapes:dev:2",
            "--trials": "1", "--out": str(tmp_path / "p.yaml")}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    try:
        rc = main(["search", *[x for kv in base.items() for x in kv], "--no-progress"])
    except SystemExit as e:  # a bad option value, refused by the parser
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("vlmfast: error:") and len(err.strip().splitlines()) == 1
    assert re.search(match, err), err


def test_sparse_writes_head_patterns_the_policy_points_to(tmp_path):
    """--sparse: the head search runs on multi-image prompts built from --data, writes PATH.heads.json, and
    the written policy composes the found pruning with an mminference entry pointing to that file; the
    policy loads and runs."""
    assert _search(tmp_path, "--sparse", "--sparse-images", "2", "--sparse-prompts", "2", "--sparse-min-length",
                   "0", trials=2) == 0
    heads = tmp_path / "pol.heads.json"
    data = json.loads(heads.read_text())
    assert data["model"] == MODEL and data["samples"] == 2 and data["target_recall"] == 0.95
    pol = load_policy(tmp_path / "pol.yaml")
    sparse = pol.sparse_prefill
    assert len(sparse) == 1 and sparse[0].heads == str(heads) and sparse[0].min_length == 0
    assert len(pol.methods) == 2  # the found pruner + mminference
    n_layers = len(sparse[0].head_patterns().layers)
    acc = VLMAccelerator.from_pretrained(MODEL, policy=pol)
    assert n_layers == acc.model.config.text_config.num_hidden_layers
    out = acc.generate(images=[make_image(0), make_image(1)], prompt="what is this ?", max_new_tokens=2)
    assert out.text is not None


def test_sparse_calibration_groups_images_into_prompts():
    from vlmfast.search.data import Sample
    from vlmfast.search.run import sparse_calibration

    samples = [Sample([f"im{i}"], f"q{i}") for i in range(7)]
    assert sparse_calibration(samples, 3, 4) == [(["im0", "im1", "im2"], "q0"), (["im3", "im4", "im5"], "q3")]
    with pytest.raises(InputError, match="holds 7 images, fewer than --sparse-images 8"):
        sparse_calibration(samples, 8, 1)


def test_dry_run_prints_the_space(capsys):
    assert main(["search", "--model", MODEL, "--budget", "0.25", "--data", "shapes:dev:2", "--out", "x.yaml",
                 "--methods", "fopru,fastv", "--dry-run", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "fopru:" in out and "strategy: one of rank, row" in out and "fastv: left out" in out


@pytest.mark.parametrize("model, searched", [(MODEL, False), ("tiny-random-llava-next", True)])
def test_dry_run_searches_view_budget_on_multi_view_models_only(capsys, model, searched):
    assert main(["search", "--model", model, "--budget", "0.25", "--data", "shapes:dev:2", "--out", "x.yaml",
                 "--methods", "fopru", "--dry-run", "--no-progress"]) == 0
    assert ("view_budget: one of proportional, base" in capsys.readouterr().out) == searched
