"""VAR / DAMRO / AGLA through `vlmfast eval shapes` (decode ms/token in the JSON), the shipped example policies,
and the hallucination table's merge and rendering."""

from __future__ import annotations

import json

import pytest

from vlmfast import VLMAccelerator
from vlmfast.cli import main
from vlmfast.eval import hallucination
from vlmfast.eval import shapes as shapes_eval
from vlmfast.policy import load_policy, shipped_policies

EXAMPLES = ["tiny-llava-shapes-var", "tiny-llava-shapes-damro", "tiny-llava-shapes-agla",
            "tiny-llava-shapes-var-damro", "tiny-llava-shapes-fopru-var"]


def test_example_policies_load_and_are_never_defaults():
    shipped = shipped_policies()
    for name in EXAMPLES:
        assert name in shipped
        pol = load_policy(name)
        assert not pol.models  # never chosen by "auto"
        assert pol.reweighters or pol.branch_methods
    for _label, name in hallucination.CONFIGS:
        assert name is None or name in shipped


def test_shapes_eval_runs_branch_methods_and_reports_decode_cost(models):
    pytest.importorskip("open_clip")
    model, processor = models["llava"]
    acc = VLMAccelerator(model, processor, policy="tiny-llava-shapes-var-damro")
    res = shapes_eval.evaluate(acc, split="dev", limit=2, progress=False)
    by_task = res["cost"]["decode_ms_per_token_by_task"]
    assert set(by_task) == {"vqa", "pope", "chair"} and all(v is None or v > 0 for v in by_task.values())
    assert "decode ms/token" in shapes_eval.table(res)
    agla = VLMAccelerator(model, processor, policy="tiny-llava-shapes-agla")
    res = shapes_eval.evaluate(agla, split="dev", limit=1, tasks=["pope"], progress=False)
    assert res["pope"]["random"]["n"] > 0


def test_cli_eval_shapes_with_a_reweighting_policy(tmp_path):
    path = tmp_path / "r.json"
    rc = main(["eval", "shapes", "--model", "tiny-random-llava", "--policy", "tiny-llava-shapes-fopru-var",
               "--split", "dev", "--limit", "1", "--task", "pope", "--json", str(path)])
    assert rc == 0
    data = json.loads(path.read_text())
    assert [m["method"] for m in data["policy"]["methods"]] == ["fopru", "var"]
    assert "pope" in data["cost"]["decode_ms_per_token_by_task"]


def _row(label, f1):
    pope = {s: {"accuracy": 0.5, "f1": f1, "yes_ratio": 0.5, "n": 4} for s in ("random", "popular", "adversarial")}
    return {"label": label, "vqa": {"overall": 0.25, "n": 4}, "pope": pope,
            "chair": {"chair_s": 0.5, "chair_i": 0.25, "recall": 0.75, "n": 2}}


def test_merge_and_table(tmp_path):
    a, b, t = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "t.json"
    a.write_text(json.dumps({"model": "m", "rows": [_row("DAMRO", 0.1), _row("baseline", 0.2)]}))
    b.write_text(json.dumps({"model": "m", "rows": [_row("DAMRO", 0.3)]}))
    t.write_text(json.dumps({"rows": [], "timing": {"baseline": {"decode_ms_per_token": 10.0, "ratio": 1.0},
                                                    "DAMRO": {"decode_ms_per_token": 17.5, "ratio": 1.75}}}))
    merged = hallucination.merge([str(a), str(b), str(t)])
    assert [r["label"] for r in merged["rows"]] == ["baseline", "DAMRO"]  # the CONFIGS order
    assert merged["rows"][1]["pope"]["random"]["f1"] == 0.3  # the later file wins
    md = hallucination.table(merged).splitlines()
    assert md[0].startswith("| method | VQA |") and len(md) == 4
    assert md[3] == ("| DAMRO | 0.250 | 0.500 / 0.300 / 0.50 | 0.500 / 0.300 / 0.50 | 0.500 / 0.300 / 0.50 "
                     "| 0.500 / 0.250 | 0.750 | 17.50 | 1.75 |")
