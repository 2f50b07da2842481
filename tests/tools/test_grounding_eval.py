"""The grounding evaluations: the ShapesWorld section's fields and the real-ratio time bench."""

import math

import numpy as np
import pytest

from vlmfast.bench import grounding as bench_grounding
from vlmfast.bench import prefill as bench_prefill


def test_encoder_flops_match_the_published_sam_sizes():
    # SAM ViT-H's image encoder "requires 2973 GMACs per image" (EfficientViT-SAM, arXiv 2402.05008, section 1)
    flops = {t: bench_grounding.encoder_flops(t) for t in bench_grounding.SAM_TYPES}
    assert flops["vit_h"] / 2 == pytest.approx(2973e9, rel=0.01)
    assert flops["vit_b"] < flops["vit_l"] < flops["vit_h"]


def test_llava_7b_prefill_flops_known_answer():
    # 32 Vicuna layers at 646 tokens: 2 n (4 d^2 + 3 d ff) + 2 n^2 d each; the CLIP tower's 23 layers up to the
    # feature layer at 577 tokens after the patch embedding (a 3 x 14 x 14 -> 1024 linear map per patch); the
    # 2-layer projector on 576
    n, d, ff = 646, 4096, 11008
    decoder = 32 * (2 * n * (4 * d * d + 3 * d * ff) + 2 * n * n * d)
    tower = 2 * 576 * (3 * 14 * 14) * 1024 + 23 * (2 * 577 * (4 * 1024 ** 2 + 2 * 1024 * 4096) + 4 * 577 ** 2 * 1024)
    projector = 2 * 576 * (1024 * 4096 + 4096 * 4096)
    assert bench_grounding.llava_7b_prefill_flops(70) == decoder + tower + projector


def test_matched_layout_is_the_closest_width():
    target = 0.05 * bench_grounding.encoder_flops("vit_b")
    layout = bench_grounding.matched_layout(target)
    err = abs(math.log(bench_grounding.encoder_flops(layout) / target))
    for w in (layout.embed_dim - 64, layout.embed_dim + 64):
        if w >= 64:
            other = bench_grounding.SamLayout(w, layout.depth)
            assert err <= abs(math.log(bench_grounding.encoder_flops(other) / target))
    assert layout.global_attn_indexes == (2, 5) and layout.num_heads == max(1, layout.embed_dim // 64)


def test_bench_grounding_quick_row():
    rows = bench_grounding.run(None, spec=bench_prefill.QUICK, sam_types=("vit_b",), repeats=1, decode_tokens=2,
                               progress=False)
    (row,) = rows
    assert row["sam_type"] == "vit_b" and 0 < row["sam_encoder_share_of_llava7b_prefill"] < 1
    assert row["generate_s"] > 0 and row["generate_ground_s"] > 0 and row["phrases"] >= 1
    assert row["overhead"] + 1 == pytest.approx(row["generate_ground_s"] / row["generate_s"], rel=0.01)
    assert "vit_b" in bench_grounding.table(rows, markdown=True)


def test_evaluate_grounding_fields_on_one_scene():
    from vlmfast import VLMAccelerator
    from vlmfast.datasets.shapes import iter_scenes, referring_expressions
    from vlmfast.eval.grounding import evaluate_grounding

    acc = VLMAccelerator.from_pretrained("tiny-llava-shapes", policy=None)
    scenes = list(iter_scenes("dev", 1))
    res = evaluate_grounding(acc, scenes, lambda s: s.image, progress=False, timing=1)
    assert res["n"] == len(referring_expressions(scenes[0])) > 0
    for k in ("miou", "pointing", "peak_point_miou", "peak_positive_miou", "vlsam_map_miou", "upper_bound_miou",
              "pruned_miou"):
        assert 0 <= res[k] <= 1, k
    assert res["ratio_to_upper_bound"] == pytest.approx(res["miou"] / res["upper_bound_miou"])
    assert res["config"]["positive_point"] == "centroid"
    assert res["upper_bound_miou"] > 0.5  # one point at the true centre segments a flat shape
    n_kinds = sum(v["n"] for v in res["by_kind"].values())
    assert n_kinds == res["n"]
    t = res["time"]
    assert t["n"] == 1 and t["generate_s"] > 0 and "caption_overhead" in t and np.isfinite(t["overhead"])


def test_bench_grounding_cli(tmp_path, capsys):
    import json

    from vlmfast.cli import main

    path = tmp_path / "g.json"
    rc = main(["bench", "grounding", "--quick", "--repeats", "1", "--sam-type", "vit_b", "--decode-tokens", "1",
               "--json", str(path), "--markdown"])
    data = json.loads(path.read_text())
    assert rc == 0 and [r["sam_type"] for r in data["rows"]] == ["vit_b"]
    assert data["llava7b_prefill_flops"] > 1e12 and data["proxy_prefill_flops"] > 0
    assert "| vit_b (11.1%) |" in capsys.readouterr().out
