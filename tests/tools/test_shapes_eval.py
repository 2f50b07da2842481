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


def test_final_split_is_accepted_where_a_split_is_named(tmp_path):
    """`final` (the split kept for reported numbers) for eval shapes, eval hallucination and bench prune, whose
    default it is; the ablation that chooses grounding settings refuses it."""
    from vlmfast.cli import build_parser
    from vlmfast.datasets.shapes import iter_scenes, vqa_items

    path = tmp_path / "r.json"
    assert main(["eval", "shapes", "--model", "tiny-random-llava", "--policy", "none", "--split", "final",
                 "--limit", "1", "--task", "vqa", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    scene = next(iter_scenes("final", 1))
    assert data["split"] == "final" and data["n"] == 1 and data["vqa"]["n"] == len(vqa_items(scene, max_per_type=1))
    parser = build_parser()
    assert parser.parse_args(["bench", "prune"]).split == "final"
    assert parser.parse_args(["eval", "hallucination", "--split", "final"]).split == "final"
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "shapes", "--split", "val"])
    from vlmfast.eval import grounding_ablation

    with pytest.raises(SystemExit):
        grounding_ablation.main(["--split", "final"])
