"""The ShapesWorld evaluation harness: structure, counts and the JSON shape the CLI promises."""

from __future__ import annotations

import json

import pytest

from vlmfast import FoPru, InputError, Policy, VLMAccelerator
from vlmfast.cli import main
from vlmfast.eval import shapes as shapes_eval


def test_evaluate_sections_and_counts(models):
    model, processor = models["llava"]
    acc = VLMAccelerator(model, processor, policy=Policy([FoPru(keep=0.5)]))
    res = shapes_eval.evaluate(acc, split="dev", limit=3, progress=False)
    assert res["n"] == 3 and set(res) >= {"vqa", "pope", "chair", "cost"}
    assert 0 <= res["vqa"]["overall"] <= 1 and res["vqa"]["n"] >= 3
    for sp in ("random", "popular", "adversarial"):
        m = res["pope"][sp]
        assert {"accuracy", "f1", "yes_ratio", "n"} <= set(m) and m["n"] % 2 == 0
    assert {"chair_s", "chair_i", "recall"} <= set(res["chair"])
    assert res["cost"]["visual_tokens_kept"] == res["cost"]["visual_tokens_in"] / 2
    only = shapes_eval.evaluate(acc, split="dev", limit=2, tasks=["pope"], blank=True, progress=False)
    assert "vqa" not in only and "chair" not in only and only["blank_image"] is True
    with pytest.raises(InputError, match="unknown task"):
        shapes_eval.evaluate(acc, limit=1, tasks=["vqa", "nope"])


def test_cli_eval_shapes_writes_json(tmp_path, capsys):
    path = tmp_path / "r.json"
    rc = main(["eval", "shapes", "--model", "tiny-random-llava", "--policy", "llava-1.5-7b", "--split", "dev",
               "--limit", "2", "--task", "vqa,pope", "--json", str(path)])
    assert rc == 0
    data = json.loads(path.read_text())
    assert data["model"] == "tiny-random-llava" and data["split"] == "dev" and data["n"] == 2
    assert data["policy"]["methods"][0]["method"] == "fopru"
    assert "VQA overall" in capsys.readouterr().out
