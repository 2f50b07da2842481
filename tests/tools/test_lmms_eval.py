"""lmms-eval integration: the ``vlmfast`` model classes, the exported offline ShapesWorld tasks, the real
``lmms-eval`` CLI (one process, and two data-parallel CPU processes) agreeing with ``vlmfast eval shapes``.

Skipped when lmms-eval (installed with ``pip install --no-deps lmms-eval``) or datasets is missing.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("datasets")
pytest.importorskip("lmms_eval")

from lmms_eval.api.instance import Instance, unwrap_generation_output  # noqa: E402
from loguru import logger as loguru_logger  # noqa: E402

from vlmfast import InputError, VLMAccelerator  # noqa: E402
from vlmfast.datasets.shapes import (  # noqa: E402
    CAPTION_PROMPT,
    POPE_SPLITS,
    caption_objects,
    chair,
    iter_scenes,
    pope_items,
    pope_metrics,
    vqa_accuracy,
    vqa_items,
)
from vlmfast.eval import shapes as shapes_eval  # noqa: E402
from vlmfast.integrations.lmms_eval import task_utils  # noqa: E402
from vlmfast.integrations.lmms_eval.tasks import TASK_NAMES, export_lmms  # noqa: E402
from vlmfast.zoo import SHIPPED  # noqa: E402

MODEL = "tiny-llava-shapes" if (SHIPPED["tiny-llava-shapes"][0] / "config.json").exists() else "tiny-random-llava"
POLICY = "llava-1.5-7b"  # FoPru keeping 25% of the visual tokens: the stats must show the pruning
SPLIT, SCENES = "test", 6
CLI_TASKS = ("shapes_vqa", "shapes_pope_adversarial")
CLI_TIMEOUT = 420


# --------------------------------------------------------------------------- fixtures / helpers


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Environment for lmms-eval runs: offline, 1 thread, the same zoo cache as conftest, a private HF home."""
    base = tmp_path_factory.getbasetemp()
    e = dict(os.environ)
    e.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
             MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", VLMFAST_CACHE=str(base / "vlmfast-cache"),
             HF_HOME=str(base / "hf-home"), LMMS_EVAL_DATASETS_CACHE=str(base / "hf-datasets"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        e.pop(k, None)
    return e


@pytest.fixture(scope="module")
def patched(env):
    """Apply the run environment in this process too (module-scoped; conftest's cache fixture is per test)."""
    with pytest.MonkeyPatch.context() as mp:
        for k in ("VLMFAST_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "LMMS_EVAL_DATASETS_CACHE"):
            mp.setenv(k, env[k])
        yield


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, patched):
    d = tmp_path_factory.mktemp("shapes-lmms")
    manifest = export_lmms(d, split=SPLIT, limit=SCENES)
    assert manifest["scenes"] == SCENES
    return d


@pytest.fixture(scope="module")
def chat_lm(patched):
    from vlmfast.integrations.lmms_eval.model import VlmfastChat

    return VlmfastChat(pretrained=MODEL, policy=POLICY, batch_size=3, device="cpu")


@pytest.fixture(scope="module")
def reference(patched):
    """What ``vlmfast eval shapes`` gives for the same model, policy, split and scenes."""
    acc = VLMAccelerator.from_pretrained(MODEL, policy=POLICY)
    res = shapes_eval.evaluate(acc, split=SPLIT, limit=SCENES, tasks=["vqa", "pope"], progress=False)
    scenes = list(iter_scenes(SPLIT, SCENES))
    items = [(s, it) for s in scenes for it in vqa_items(s, max_per_type=1)]
    preds = [o.text for o in acc.generate(images=[[s.image] for s, _ in items], prompt=[it.question for _, it in items],
                                          max_new_tokens=4)]
    first = acc.generate(images=[items[0][0].image], prompt=items[0][1].question, max_new_tokens=4)
    return {"res": res, "vqa_preds": preds, "first_stats": first.stats.to_dict()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lmms_args(task_dir: Path, out: Path, tasks=CLI_TASKS) -> list[str]:
    return ["-m", "lmms_eval", "--model", "vlmfast", "--model_args", f"pretrained={MODEL},policy={POLICY}",
            "--tasks", ",".join(tasks), "--include_path", str(task_dir), "--batch_size", "4",
            "--output_path", str(out), "--log_samples", "--verbosity", "WARNING"]


#: the two-process gloo run has once aborted in process teardown, after writing its results ("terminate called
#: without an active exception" from a C++ thread at interpreter exit); such a run is retried once
_TEARDOWN_ABORT = "terminate called without an active exception"


def _run(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT)
    if p.returncode != 0 and _TEARDOWN_ABORT in p.stderr:
        if "--output_path" in cmd:  # start the retry from an empty output folder
            shutil.rmtree(cmd[cmd.index("--output_path") + 1], ignore_errors=True)
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT)
    assert p.returncode == 0, f"{' '.join(cmd)}\nexit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p


def _run_lmms(cmd: list[str], env: dict, out: Path) -> tuple[dict, dict[str, list[dict]]]:
    """Run lmms-eval and read its outputs. lmms-eval 0.7.3 exits 0 even when the evaluation raised (unless
    --verbosity DEBUG), so a missing results file is the failure signal; its log is shown then."""
    p = _run(cmd, env)
    found = glob.glob(str(out / "**" / "*_results.json"), recursive=True)
    assert len(found) == 1, f"no lmms-eval results in {out}:\n{p.stdout[-3000:]}\n{p.stderr[-8000:]}"
    return _read_outputs(out)


def _read_outputs(out: Path) -> tuple[dict, dict[str, list[dict]]]:
    results = glob.glob(str(out / "**" / "*_results.json"), recursive=True)
    assert len(results) == 1, results
    samples = {}
    for f in glob.glob(str(out / "**" / "*_samples_*.jsonl"), recursive=True):
        task = f.rsplit("_samples_", 1)[1].removesuffix(".jsonl")
        samples[task] = sorted((json.loads(line) for line in open(f)), key=lambda r: r["doc_id"])
    return json.loads(Path(results[0]).read_text()), samples


@pytest.fixture(scope="module")
def single_run(task_dir, env, tmp_path_factory):
    out = tmp_path_factory.mktemp("lmms-out-1")
    return _run_lmms([sys.executable, *_lmms_args(task_dir, out)], env, out)


def _chat_messages(doc):
    return [{"role": "user", "content": [{"type": "image", "url": doc["image"]}, {"type": "text", "text": doc["q"]}]}]


def _chat_req(doc_id: int, gen_kwargs: dict, to_messages=_chat_messages) -> Instance:
    return Instance("generate_until", ("ctx", to_messages, dict(gen_kwargs), doc_id, "t", "test"), idx=0,
                    metadata={"task": "t", "doc_id": doc_id, "repeats": 1})


def _docs():
    scenes = list(iter_scenes("dev", 2))
    return [{"image": scenes[0].image, "q": "what colour is the circle ?"},
            {"image": scenes[1].image, "q": "how many objects are there ?"},
            {"image": scenes[1].image, "q": "what objects are in the image ?"}]


# --------------------------------------------------------------------------- export + task functions (fast)


def test_export_writes_same_items_as_vlmfast_eval_shapes(tmp_path):
    from datasets import load_dataset

    m = export_lmms(tmp_path / "t", split="dev", limit=3)
    d = Path(m["dir"])
    assert set(m["tasks"]) == set(TASK_NAMES) and m["scenes"] == 3 and m["split"] == "dev"
    scenes = list(iter_scenes("dev", 3))
    load = lambda t: load_dataset("parquet", data_files={"dev": str(d / "data" / f"{t}.parquet")},  # noqa: E731
                                  cache_dir=str(tmp_path / "cache"))["dev"]
    vqa = load("shapes_vqa")
    items = [it for s in scenes for it in vqa_items(s, max_per_type=1)]
    assert vqa["question"] == [it.question for it in items] and vqa["answer"] == [it.answer for it in items]
    assert vqa["type"] == [it.type for it in items] and m["tasks"]["shapes_vqa"] == len(items)
    row = vqa[0]
    assert np.array_equal(np.asarray(row["image"]), np.asarray(scenes[0].image))  # lossless PNG round trip
    for sp in POPE_SPLITS:
        pope = load(f"shapes_pope_{sp}")
        assert pope["question"] == [it.question for s in scenes for it in pope_items(s, sp)]
    cap = load("shapes_caption")
    assert cap["question"] == [CAPTION_PROMPT] * 3
    assert [set(tuple(o.split()) for o in objs) for objs in cap["objects"]] == [caption_objects(s) for s in scenes]
    y = (d / "shapes_pope_adversarial.yaml").read_text()
    assert "dataset_path: parquet" in y and str(d / "data" / "shapes_pope_adversarial.parquet") in y
    assert "max_new_tokens: 2" in y and "max_new_tokens: 4" in (d / "shapes_vqa.yaml").read_text()
    assert "max_new_tokens: 48" in (d / "shapes_caption.yaml").read_text()
    assert all(f"  - {t}" in (d / "shapes.yaml").read_text() for t in TASK_NAMES)
    assert (d / "utils.py").is_file() and json.loads((d / "manifest.json").read_text()) == m
    with pytest.raises(InputError, match="unknown split"):
        export_lmms(tmp_path / "x", split="val", limit=1)


def test_python_m_entry_point(tmp_path, env):
    p = _run([sys.executable, "-m", "vlmfast.integrations.lmms_eval.tasks", str(tmp_path / "e"), "--split", "dev",
              "--limit", "1"],
             env)
    assert "shapes_vqa" in p.stdout and (tmp_path / "e" / "shapes.yaml").is_file()


def test_task_functions_score_like_vlmfast_metrics():
    docs = [{"answer": "red", "type": "color"}, {"answer": "yes", "type": "left_of"},
            {"answer": "three", "type": "count"}]
    preds = ["Red.", "yes it is", "3"]
    per = [task_utils.vqa_process_results(d, [p]) for d, p in zip(docs, preds)]
    ref = vqa_accuracy(preds, docs)
    assert sum(r["exact_match"] for r in per) / 3 == ref["overall"] == 1.0
    assert per[1] == {"exact_match": 1.0, "acc_left_of": 1.0}
    labels, ppreds = ["yes", "no", "yes", "no"], ["yes", "yes", "no", "No."]
    items = [task_utils.pope_process_results({"answer": a}, [p])["f1"] for a, p in zip(labels, ppreds)]
    want = pope_metrics(ppreds, labels)
    assert task_utils.pope_f1(items) == want["f1"] and task_utils.pope_yes_ratio(items) == want["yes_ratio"] == 0.5
    assert task_utils.pope_accuracy(items) == want["accuracy"]
    caps, objs = ["a red circle and a blue star .", "a green square ."], [["red circle"], ["green square"]]
    items = [task_utils.caption_process_results({"objects": o}, [c])["chair_i"] for c, o in zip(caps, objs)]
    want = chair(caps, objs)
    assert task_utils.chair_s(items) == want["chair_s"] == 0.5 and task_utils.chair_i(items) == want["chair_i"]


def test_entry_point_registers_chat_and_simple_classes():
    from lmms_eval.models import get_model

    from vlmfast.integrations.lmms_eval import MANIFESTS
    from vlmfast.integrations.lmms_eval.model import VlmfastChat, VlmfastSimple

    assert MANIFESTS[0].model_id == "vlmfast"
    assert get_model("vlmfast") is VlmfastChat and not VlmfastChat.is_simple
    assert get_model("vlmfast", force_simple=True) is VlmfastSimple and VlmfastSimple.is_simple


def test_bad_model_args_fail_clearly():
    from vlmfast.integrations.lmms_eval.model import VlmfastChat

    with pytest.raises(InputError, match=r"unknown model_args \['bogus'\]"):
        VlmfastChat.create_from_arg_string("pretrained=tiny-random-llava,bogus=1", {"batch_size": 1})
    with pytest.raises(InputError, match="pretrained="):
        VlmfastChat(policy="none")
    with pytest.raises(InputError, match="batch_size"):
        VlmfastChat(pretrained="tiny-random-llava", batch_size="lots")
    with pytest.raises(InputError, match="inline JSON"):
        VlmfastChat(pretrained="tiny-random-llava", policy="{not json")
    with pytest.raises(InputError, match="dtype"):
        VlmfastChat(pretrained="tiny-random-llava", dtype="int3")


def test_inline_json_policy_from_model_args(patched):
    from vlmfast.integrations.lmms_eval.model import VlmfastChat

    lm = VlmfastChat.create_from_arg_string(
        'pretrained=tiny-random-llava,policy={"name":"fastv-half","methods":[{"method":"fastv","layer":1,"keep":0.5}]}',
        {"batch_size": "2", "device": "cpu"})
    assert lm.policy_name == "fastv-half" and lm.batch_size == 2 and lm.acc.policy.layer_pruners
    lm.task_dict = {"t": {"test": _docs()}}
    st = lm.generate_until([_chat_req(0, {"max_new_tokens": 2})])[0].token_counts.to_dict()["vlmfast"]
    assert st["visual_tokens_kept"] == st["visual_tokens_in"] and st["layer_avg_visual_tokens"] < st["visual_tokens_in"]
    assert VlmfastChat(pretrained="tiny-random-llava", policy="none").policy_name == "none"


# --------------------------------------------------------------------------- the model class on fake Instances


def test_generate_until_truncates_at_stop_strings_and_attaches_stats(chat_lm):
    docs = _docs()
    chat_lm.task_dict = {"t": {"test": docs}}
    plain = [unwrap_generation_output(r) for r in
             chat_lm.generate_until([_chat_req(i, {"max_new_tokens": 6, "temperature": 0}) for i in range(3)])]
    direct = chat_lm.acc.generate(images=[[d["image"]] for d in docs], prompt=[d["q"] for d in docs], max_new_tokens=6)
    assert [t for t, _ in plain] == [o.text for o in direct]
    for (_, counts), o in zip(plain, direct):
        st = counts.to_dict()["vlmfast"]
        assert (st["visual_tokens_in"], st["visual_tokens_kept"]) == (o.stats.visual_tokens_in,
                                                                     o.stats.visual_tokens_kept)
        assert st["visual_tokens_kept"] < st["visual_tokens_in"] and st["prefill_s"] > 0 and st["rank"] == 0
        # the three requests ran as one batch (batch_size=3): the times are the batch's, the share is a third
        assert st["batch_size"] == 3 and st["prefill_s_share"] == pytest.approx(st["prefill_s"] / 3)
    k = max(range(3), key=lambda i: len(plain[i][0].split()))  # the longest answer (the caption for a trained model)
    words = plain[k][0].split()
    assert len(words) >= 2, plain
    stop = " " + words[1]
    other = (k + 1) % 3
    # different gen kwargs in one call: grouped into separate batches, results in request order
    reqs = [_chat_req(k, {"max_new_tokens": 6, "until": [stop]}), _chat_req(other, {"max_new_tokens": 6}),
            _chat_req(k, {"max_new_tokens": 6, "until": "\n\n"})]
    texts = [unwrap_generation_output(r)[0] for r in chat_lm.generate_until(reqs)]
    assert texts == [plain[k][0].split(stop)[0], plain[other][0], plain[k][0]]
    assert texts[0] == words[0]


@pytest.mark.parametrize("name, policy", [("tiny-random-qwen2.5-vl", "qwen2.5-vl-7b"),
                                          ("tiny-random-qwen3-vl", "qwen3-vl-8b"),
                                          ("tiny-random-llava-onevision", "llava-onevision-qwen2-7b"),
                                          ("tiny-random-internvl", "internvl3-8b"),
                                          ("tiny-random-llava-next", "llava-v1.6-mistral-7b")])
def test_the_newer_families_and_their_shipped_policies(name, policy, patched):
    """Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, InternVL and LLaVA-NeXT (several views per image, the budget split
    over them) through the plugin, batched, with their shipped policies: the answers of the model class equal the
    accelerator's, and the stats show FoPru's 25%."""
    from vlmfast.integrations.lmms_eval.model import VlmfastChat

    lm = VlmfastChat(pretrained=name, policy=policy, batch_size=3, device="cpu")
    docs = _docs()
    lm.task_dict = {"t": {"test": docs}}
    got = [unwrap_generation_output(r) for r in
           lm.generate_until([_chat_req(i, {"max_new_tokens": 4, "temperature": 0}) for i in range(3)])]
    direct = lm.acc.generate(images=[[d["image"]] for d in docs], prompt=[d["q"] for d in docs], max_new_tokens=4)
    assert lm.policy_name == policy and [t for t, _ in got] == [o.text for o in direct]
    for _, counts in got:
        st = counts.to_dict()["vlmfast"]
        assert st["visual_tokens_kept"] == st["visual_tokens_in"] // 4 > 0


def test_num_beams_warns_and_decodes_greedily(chat_lm):
    chat_lm.task_dict = {"t": {"test": _docs()}}
    seen: list[str] = []
    hid = loguru_logger.add(lambda m: seen.append(str(m)), level="WARNING")
    try:
        beam = chat_lm.generate_until([_chat_req(1, {"max_new_tokens": 5, "num_beams": 3, "length_penalty": 1.0})])
    finally:
        loguru_logger.remove(hid)
    greedy = chat_lm.generate_until([_chat_req(1, {"max_new_tokens": 5})])
    assert beam[0].text == greedy[0].text
    assert any("num_beams=3 is not supported" in s for s in seen) and any("length_penalty" in s for s in seen)
    sampled = chat_lm.generate_until([_chat_req(1, {"max_new_tokens": 3, "temperature": 0.8, "top_p": 0.9,
                                                    "do_sample": True})])
    assert isinstance(sampled[0].text, str)


def test_unsupported_inputs_raise_clear_errors(chat_lm):
    chat_lm.task_dict = {"t": {"test": _docs()}}
    video = lambda doc: [{"role": "user", "content": [{"type": "video", "url": "/x/clip.mp4"},  # noqa: E731
                                                      {"type": "text", "text": "what happens ?"}]}]
    with pytest.raises(NotImplementedError, match="video"):
        chat_lm.generate_until([_chat_req(0, {}, video)])
    def multi(doc):
        return [*_chat_messages(doc), {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
                {"role": "user", "content": [{"type": "text", "text": "and the square ?"}]}]

    with pytest.raises(NotImplementedError, match="multi-turn"):
        chat_lm.generate_until([_chat_req(0, {}, multi)])
    with pytest.raises(NotImplementedError, match="generate_until_multi_round"):
        chat_lm.generate_until_multi_round([_chat_req(0, {})])
    with pytest.raises(InputError, match="until"):
        chat_lm.generate_until([_chat_req(0, {"until": 3})])


def test_simple_class_loglikelihood_uses_lmms_eval_loss_convention(patched):
    from vlmfast.integrations.lmms_eval.model import VlmfastSimple

    lm = VlmfastSimple(pretrained=MODEL, policy=POLICY, batch_size=2)
    docs = _docs()
    lm.task_dict = {"t": {"test": docs}}
    to_visual = lambda doc: [doc["image"]]  # noqa: E731
    reqs = [Instance("loglikelihood", (d["q"], " " + c, to_visual, i, "t", "test"), idx=0,
                     metadata={"task": "t", "doc_id": i, "repeats": 1})
            for i, d in enumerate(docs[:2]) for c in ("yes", "two circles")]
    got = [unwrap_generation_output(r)[0] for r in lm.loglikelihood(reqs)]
    tok = lm.tokenizer
    for r, (nll, greedy) in zip(reqs, got):
        d, cont = docs[r.args[3]], r.args[1].lstrip()
        lp, g = lm.acc.loglikelihood(images=[d["image"]], prompt=d["q"], continuation=cont)
        n = len(tok(cont, add_special_tokens=False)["input_ids"])
        assert nll == pytest.approx(-lp / n, abs=1e-5) and greedy == g
    # simple-protocol generation: <image> placeholders are dropped from the context
    gen = lm.generate_until([Instance("generate_until", ("<image>\n" + docs[0]["q"], {"max_new_tokens": 4}, to_visual,
                                                         0, "t", "test"), idx=0,
                                      metadata={"task": "t", "doc_id": 0, "repeats": 1})])
    assert gen[0].text == lm.acc.generate(images=[docs[0]["image"]], prompt=docs[0]["q"], max_new_tokens=4).text


@pytest.mark.slow
def test_multiple_choice_task_through_the_evaluator(task_dir, patched):
    """lmms-eval 0.7.3 stringifies (float, bool) loglikelihood results; the simple class works around it."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from vlmfast.integrations.lmms_eval.model import VlmfastSimple

    pope_file = task_dir / "data" / "shapes_pope_adversarial.parquet"
    (task_dir / "mc").mkdir(exist_ok=True)
    (task_dir / "mc" / "utils.py").write_text((task_dir / "utils.py").read_text())
    (task_dir / "mc" / "shapes_pope_mc.yaml").write_text(
        "task: shapes_pope_mc\ndataset_path: parquet\ndataset_kwargs:\n  data_files:\n"
        f"    test: {json.dumps(str(pope_file))}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_visual: !function utils.doc_to_visual\n"
        "doc_to_text: !function utils.doc_to_text\ndoc_to_target: answer\ndoc_to_choice: ['yes', 'no']\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    lm = VlmfastSimple(pretrained=MODEL, policy=POLICY, batch_size=4)
    out = simple_evaluate(model=lm, tasks=["shapes_pope_mc"], limit=8, log_samples=False,
                          task_manager=TaskManager(include_path=str(task_dir / "mc"), include_defaults=False))
    acc = out["results"]["shapes_pope_mc"]["acc,none"]
    from datasets import load_dataset

    ds = load_dataset("parquet", data_files={"test": str(pope_file)})["test"].select(range(8))
    tok, hits = lm.tokenizer, []
    for row in ds:  # lmms-eval picks the choice with the lowest mean per-token NLL
        nll = [-lm.acc.loglikelihood(images=[row["image"]], prompt=row["question"], continuation=c)[0]
               / len(tok(c, add_special_tokens=False)["input_ids"]) for c in ("yes", "no")]
        hits.append(("yes", "no")[min(range(2), key=lambda k: nll[k])] == row["answer"])
    assert acc == pytest.approx(sum(hits) / len(hits))


# --------------------------------------------------------------------------- the real CLI


@pytest.mark.slow
def test_cli_scores_equal_vlmfast_eval_shapes(single_run, reference):
    results, samples = single_run
    res = reference["res"]
    vqa = results["results"]["shapes_vqa"]
    assert vqa["exact_match,none"] == res["vqa"]["overall"]
    for t, v in res["vqa"].items():
        if t not in ("overall", "n"):
            assert vqa[f"acc_{t},none"] == v, t
    pope = results["results"]["shapes_pope_adversarial"]
    for k in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        assert pope[f"{k},none"] == res["pope"]["adversarial"][k], k
    assert len(samples["shapes_vqa"]) == res["vqa"]["n"]
    assert len(samples["shapes_pope_adversarial"]) == res["pope"]["adversarial"]["n"]
    # the same predictions, sample by sample
    assert [s["filtered_resps"] for s in samples["shapes_vqa"]] == reference["vqa_preds"]
    # per-sample vlmfast statistics in the logged samples
    first = samples["shapes_vqa"][0]["token_counts"][0]["vlmfast"]
    ref = reference["first_stats"]
    assert first["visual_tokens_in"] == ref["visual_tokens_in"]
    assert first["visual_tokens_kept"] == ref["visual_tokens_kept"]
    for rows in samples.values():
        for s in rows:
            st = s["token_counts"][0]["vlmfast"]
            assert st["visual_tokens_kept"] < st["visual_tokens_in"] and st["prefill_s"] > 0 and st["rank"] == 0
            # --batch_size 4: the times are the batch's, the share is theirs over the batch's samples
            assert 1 <= st["batch_size"] <= 4
            assert st["prefill_s_share"] == pytest.approx(st["prefill_s"] / st["batch_size"])
        assert max(s["token_counts"][0]["vlmfast"]["batch_size"] for s in rows) == 4
    assert results["throughput"]["avg_visual_tokens_kept"] < results["throughput"]["avg_visual_tokens_in"]


@pytest.mark.slow
def test_cli_data_parallel_two_cpu_processes(task_dir, env, single_run, tmp_path):
    """``accelerate launch`` with 2 CPU processes (gloo): each rank takes half of the documents, and the
    merged scores equal the single-process run."""
    out = tmp_path / "dp"
    e = {**env, "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), *_lmms_args(task_dir, out)]
    results, samples = _run_lmms(cmd, e, out)
    single_results, single_samples = single_run
    for task in CLI_TASKS:
        ranks = collections.Counter(s["token_counts"][0]["vlmfast"]["rank"] for s in samples[task])
        n = len(single_samples[task])
        assert set(ranks) == {0, 1} and sum(ranks.values()) == n and abs(ranks[0] - ranks[1]) <= 1, ranks
        assert [s["doc_id"] for s in samples[task]] == list(range(n))
        assert [s["filtered_resps"] for s in samples[task]] == [s["filtered_resps"] for s in single_samples[task]]
        for k, v in single_results["results"][task].items():
            if k != "alias" and not isinstance(v, str):
                assert results["results"][task][k] == pytest.approx(v, abs=1e-12), (task, k)
    key = "exact_match,none"
    assert results["results"]["shapes_vqa"][key] == single_results["results"]["shapes_vqa"][key]
