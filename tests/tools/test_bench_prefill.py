"""``vlmfast bench prefill --family qwen2.5-vl``: the windowed tower's FLOP count and the rows (no timing asserted)."""

from __future__ import annotations

from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from transformers.vision_utils import get_vision_window_index

from vlmfast.bench import prefill as bench_prefill
from vlmfast.cli import build_parser
from vlmfast.zoo.tiny import TinySpec

#: 3 blocks of width 8 (MLP 12), the last one full; windows of 56 px = 2 x 2 merged tokens = 4 x 4 patches
TINY_TOWER = NS(depth=3, hidden_size=8, intermediate_size=12, in_channels=3, patch_size=14, temporal_patch_size=2,
                spatial_merge_size=2, window_size=56, fullatt_block_indexes=[2], out_hidden_size=16)


def test_windowed_tower_flops_hand_count():
    grid = (1, 6, 10)  # patches; 3 x 5 merged tokens -> windows of 2x2, 2x2, 2x1 / 1x2, 1x2, 1x1 merged tokens
    assert bench_prefill.windows(grid, TINY_TOWER) == [16, 16, 8, 8, 8, 4]
    n = 60
    embed = 2 * n * (3 * 2 * 14 * 14) * 8                 # the patch embedding (a conv = a linear map per patch)
    linear = 2 * n * (4 * 8 * 8 + 3 * 8 * 12)             # qkv + proj, SwiGLU gate / up / down
    full = 4 * n * n * 8                                  # QK^T and AV over all 60 patches
    windowed = 4 * (16**2 + 16**2 + 8**2 + 8**2 + 8**2 + 4**2) * 8  # within each window
    merger = 2 * (n // 4) * (32 * 32 + 32 * 16)           # Linear(4d, 4d) and Linear(4d, out) per 2x2 group
    assert bench_prefill.qwen2_5_vl_tower_flops(TINY_TOWER, grid) == embed + 3 * linear + full + 2 * windowed + merger
    assert bench_prefill.qwen2_5_vl_scoring_flops(TINY_TOWER, grid) == 2 * n * n * 8
    # a video's frame groups attend (in windows and in full blocks) each on its own
    assert bench_prefill.qwen2_5_vl_tower_flops(TINY_TOWER, (2, 6, 10)) == 2 * (
        bench_prefill.qwen2_5_vl_tower_flops(TINY_TOWER, grid))


def test_windowed_tower_flops_equal_torch_count_and_transformers_windows():
    """On a tiny proxy tower: the windows are the ones transformers cuts, and the count equals torch's own FLOP
    counter over the tower's forward (eager attention, so the attention matmuls are counted too)."""
    spec = TinySpec(hidden=16, layers=2, heads=2, kv_heads=1, intermediate=32, vision_hidden=8, vision_layers=3,
                    vision_heads=2, image_size=224, patch=14)  # the processor keeps images of up to 224 x 224 pixels
    model, processor = bench_prefill.qwen2_5_vl_proxy(spec, full_every=2)
    vc = model.config.vision_config
    assert vc.fullatt_block_indexes == [0, 2] and vc.window_size == 112 and vc.intermediate_size == 21
    image = Image.fromarray((np.random.default_rng(0).random((84, 252, 3)) * 255).astype("uint8"))
    inputs = processor.image_processor(images=[image], return_tensors="pt")
    grid = bench_prefill.image_grid(model, processor, image)
    assert grid == (1, 6, 18)  # 3 x 9 merged tokens: windows of 3 x 4, 3 x 4, 3 x 1
    _, cu = get_vision_window_index(inputs["image_grid_thw"], 2, vc.window_size, vc.patch_size)
    assert bench_prefill.windows(grid, vc) == cu.diff().tolist() == [48, 48, 12]
    model.set_attn_implementation("eager")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    assert bench_prefill.vision_flops(model, None, grid) == counter.get_total_flops()


def test_proxy_tower_share_matches_qwen2_5_vl_7b():
    seven = bench_prefill.qwen2_5_vl_tower_share(NS(**bench_prefill.QWEN2_5_VL_7B["vision"]),
                                                 NS(**bench_prefill.QWEN2_5_VL_7B["text"]))
    cfg, _, _ = bench_prefill.qwen2_5_vl_config()
    proxy = bench_prefill.qwen2_5_vl_tower_share(cfg.vision_config, cfg.text_config)
    assert seven == pytest.approx(0.286, abs=0.001)
    assert proxy == pytest.approx(seven, abs=0.015)
    assert cfg.vision_config.fullatt_block_indexes == [7, 15] and cfg.vision_config.window_size == 112


def test_bench_prefill_qwen_quick_rows():
    rows = bench_prefill.run(None, family="qwen2.5-vl", spec=bench_prefill.QWEN2_5_VL_QUICK, repeats=1,
                             decode_tokens=2, progress=False)
    keeps = (0.5, 0.25, 0.1)
    assert [(r["method"], r["keep"]) for r in rows] == [("full", 1.0)] + [
        (m, k) for m in ("fopru", "divprune", "fastv") for k in keeps]
    # 224 px -> 16 x 16 patches -> 8 x 8 = 64 LLM tokens
    assert {r["visual_tokens_in"] for r in rows} == {64}
    assert [r["visual_tokens_kept"] for r in rows] == [64] + [32, 16, 6] * 3
    full = rows[0]
    assert full["speedup"] == 1.0 and full["ideal_speedup"] == 1.0 and full["overhead_pct_of_prefill"] >= 0
    for method in ("fopru", "divprune", "fastv"):
        ideal = [r["ideal_speedup"] for r in rows if r["method"] == method]
        assert 1 < ideal[0] < ideal[1] < ideal[2], (method, ideal)
    fopru10 = next(r for r in rows if r["method"] == "fopru" and r["keep"] == 0.1)
    assert fopru10["kv_bytes"] < full["kv_bytes"] and fopru10["overhead_s"] > 0
    text = bench_prefill.table(rows, columns=bench_prefill.PROXIES["qwen2.5-vl"].columns)
    assert "scoring %" in text and "divprune" in text


def test_cli_family_choices_are_the_proxies():
    parser = build_parser()
    assert parser.parse_args(["bench", "prefill"]).family == "llava"
    for family in bench_prefill.PROXIES:
        assert parser.parse_args(["bench", "prefill", "--family", family]).family == family
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "prefill", "--family", "internvl"])


def test_qwen3_tower_flops_equal_torch_count():
    """Every block attends over the whole image; the merger and one DeepStack merger per level (eager attention,
    so torch's counter sees the attention matmuls)."""
    spec = TinySpec(hidden=16, layers=2, heads=2, kv_heads=1, intermediate=32, vision_hidden=8, vision_layers=4,
                    vision_heads=2, image_size=128, patch=16)
    model, processor = bench_prefill.qwen3_vl_proxy(spec)
    vc = model.config.vision_config
    assert vc.deepstack_visual_indexes == [0, 2, 3] and vc.intermediate_size == 30  # 8 * 4304 / 1152
    image = Image.fromarray((np.random.default_rng(0).random((64, 128, 3)) * 255).astype("uint8"))
    inputs = processor.image_processor(images=[image], return_tensors="pt")
    grid = bench_prefill.image_grid(model, processor, image)
    assert grid == (1, 4, 8)
    model.set_attn_implementation("eager")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    assert bench_prefill.vision_flops(model, None, grid) == counter.get_total_flops()


def test_qwen3_proxy_tower_share_matches_qwen3_vl_8b():
    eight = bench_prefill.qwen2_5_vl_tower_share(NS(**bench_prefill.QWEN3_VL_8B["vision"]),
                                                 NS(**bench_prefill.QWEN3_VL_8B["text"]), grid=(1, 64, 64),
                                                 tower_flops=bench_prefill.qwen3_vl_tower_flops)
    cfg = bench_prefill.qwen3_vl_proxy(bench_prefill.QWEN3_VL_PROXY)[0].config
    proxy = bench_prefill.qwen2_5_vl_tower_share(cfg.vision_config, cfg.text_config, grid=(1, 64, 64),
                                                 tower_flops=bench_prefill.qwen3_vl_tower_flops)
    assert 0.2 < eight < 0.35
    assert proxy == pytest.approx(eight, abs=0.015)
    assert cfg.vision_config.deepstack_visual_indexes == [2, 5, 8]


def test_llava_next_tower_flops_count_every_crop():
    """The tower runs once per crop (the base one and each tile): the count equals torch's over the model's own
    ``get_image_features`` on a 2 x 2-tile image (eager attention)."""
    model, processor = bench_prefill.llava_next_proxy(bench_prefill.LLAVA_NEXT_QUICK)
    side = bench_prefill.LLAVA_NEXT_QUICK.image_size
    image = Image.fromarray((np.random.default_rng(0).random((2 * side, 2 * side, 3)) * 255).astype("uint8"))
    grid = bench_prefill.image_grid(model, processor, image)
    assert grid == (5, side // 14, side // 14)
    inputs = processor.image_processor(images=[image], return_tensors="pt")
    model.set_attn_implementation("eager")
    layers = bench_prefill.adapter_for(model).layers_run(None)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    per_crop = bench_prefill.tower_flops(model.config.vision_config, model.config.text_config.hidden_size,
                                         model.config.vision_config.num_hidden_layers)
    assert counter.get_total_flops() == 5 * per_crop  # transformers runs every layer; vlmfast skips the unused last
    assert bench_prefill.vision_flops(model, None, grid) == 5 * bench_prefill.tower_flops(
        model.config.vision_config, model.config.text_config.hidden_size, layers)


@pytest.mark.parametrize("family", ["qwen3-vl", "llava-next"])
def test_bench_prefill_quick_rows_of_the_new_families(family):
    proxy = bench_prefill.PROXIES[family]
    rows = bench_prefill.run(None, family=family, spec=proxy.quick, repeats=1, decode_tokens=2, progress=False)
    assert [(r["method"], r["keep"]) for r in rows] == [("full", 1.0)] + [
        (m, k) for m in ("fopru", "divprune", "fastv") for k in (0.5, 0.25, 0.1)]
    n = rows[0]["visual_tokens_in"]
    assert n == {"qwen3-vl": 64, "llava-next": 5 * 8 * 8}[family]  # 256 px / 16 / 2; 5 crops of 112 px / 14
    for r in rows[1:]:
        assert r["ideal_speedup"] > 1 and r["visual_tokens_kept"] < n
