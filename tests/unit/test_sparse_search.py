"""Head search: on synthetic heads built with a known pattern it picks that pattern; on a model it writes a
head-pattern file that the ``mminference`` method loads."""

from __future__ import annotations

import json

import pytest
import torch

from vlmfast.bench.sparse import synthetic_qkv
from vlmfast.search.heads import HeadSearcher, search_heads
from vlmfast.sparse.layout import video_like
from vlmfast.sparse.method import HeadPatterns, MMInference
from vlmfast.sparse.patterns import AShape, Dense, Grid


def test_search_recovers_planted_patterns():
    lay = video_like(32, 24, 6, 8, 32)  # 1216 tokens, frames of 48 tokens
    d = 32
    q, k, _ = synthetic_qkv(lay, ["a_shape", "grid_frame"], d, seed=0)
    # a third head attends (almost) uniformly: no sparse pattern keeps enough of its mass
    q = torch.cat([q, torch.zeros(1, lay.n, d)])
    k = torch.cat([k, torch.randn(1, lay.n, d) * 0.01])
    cands = [Dense(), Grid(stride="frame", local=64, horizontal=False), AShape(sink=32, local=64)]
    searcher = HeadSearcher(cands, target_recall=0.9, block=16)
    searcher.visit(0, q, k, lay, d ** -0.5)
    res = searcher.result("synthetic")
    chosen = [type(res.patterns.layers[0][h]).__name__ for h in range(3)]
    assert chosen == ["AShape", "Grid", "Dense"], (chosen, res.table)
    assert res.scores[0][0]["recall"] >= 0.9 and res.scores[0][1]["recall"] >= 0.9
    assert res.scores[0][1]["density"] < 1.0 and res.scores[0][2]["density"] == 1.0


def test_search_heads_on_a_model_writes_a_loadable_file(models, tmp_path):
    from conftest import make_image

    model, processor = models["qwen2_vl"]
    samples = [([make_image(i), make_image(i + 1)], "what is in the image ?") for i in range(2)]
    path = tmp_path / "heads.json"
    res = search_heads(model, processor, samples, candidates=[AShape(sink=4, local=8), Dense()], target_recall=0.5,
                       block=16, model_name="tiny-random-qwen2-vl", path=path)
    data = json.loads(path.read_text())
    n_layers = model.config.get_text_config().num_hidden_layers
    assert data["format"] == "vlmfast-sparse/1" and len(data["layers"]) == n_layers
    assert set(data["layers"][0]) == {str(h) for h in range(model.config.get_text_config().num_attention_heads)}
    assert {"recall", "density"} <= set(data["layers"][0]["0"])
    assert all(0 <= s["recall"] <= 1 for layer in res.scores for s in layer.values())
    method = MMInference(heads=str(path), min_length=0)
    assert isinstance(method.pattern_for(0, 0), (AShape, Dense)) and method.block_size == 16


def test_bad_head_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "other", "layers": []}))
    with pytest.raises(Exception, match="format"):
        MMInference(heads=str(bad))
    bad.write_text(json.dumps({"format": "vlmfast-sparse/1", "layers": [{"0": {"pattern": "spiral"}}]}))
    with pytest.raises(Exception, match=r"layers\[0\]"):
        HeadPatterns.load(str(bad))
    with pytest.raises(Exception, match="neither a shipped one"):
        MMInference(heads=str(tmp_path / "missing.json"))
