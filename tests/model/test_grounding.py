"""Grounding (attention -> points -> SAM): known answers on hand-made attention and maps, the grid-to-pixel
mapping of both families, masks from a synthetic map through tiny-sam-shapes, and the API end to end on the
tiny random models (observing attention never changes the answer)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_image

from vlmfast import FastV, FoPru, Grounding, GroundingConfig, Policy, PolicyError, VLMAccelerator
from vlmfast.errors import InputError
from vlmfast.grounding import maps, prompts
from vlmfast.grounding.capture import AttentionCapture, attention_probs
from vlmfast.grounding.phrases import find_phrase, object_phrases

PROMPT = "where is the red circle ?"


# --------------------------------------------------------------------------- head aggregation and flow


def test_head_weights_and_aggregation_known_answer():
    # 2 heads, 2 queries, 2 keys (causal). Head 0: row maxes 1 and 0.5 -> weight 0.75; head 1: 1 and 0.9 -> 0.95
    probs = torch.tensor([[[1.0, 0.0], [0.5, 0.5]],
                          [[1.0, 0.0], [0.1, 0.9]]])
    w = maps.head_weights(probs)
    assert torch.allclose(w, torch.tensor([0.75, 0.95]))
    agg = maps.aggregate_heads(probs, w)
    expected = (0.75 * probs[0] + 0.95 * probs[1]) / 2
    assert torch.allclose(agg, expected)
    assert torch.allclose(agg[1], torch.tensor([(0.375 + 0.095) / 2, (0.375 + 0.855) / 2]))


def test_head_weights_skip_fully_masked_rows():
    probs = torch.tensor([[[0.0, 0.0], [0.2, 0.8]]])  # row 0 is left padding (all masked -> 0)
    assert torch.allclose(maps.head_weights(probs), torch.tensor([0.8]))


def test_flow_column_factors():
    assert torch.allclose(maps.flow_column_factors(torch.ones(4, dtype=torch.bool)),
                          torch.tensor([0.25, 0.5, 0.75, 1.0]))
    # left padding: L = 3 valid positions
    assert torch.allclose(maps.flow_column_factors(torch.tensor([False, True, True, True])),
                          torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]))


def _chain():
    """3 tokens. Layer 0: token 1 attends only token 0. Layer 1: token 2 attends only token 1."""
    a0 = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 0, 1.0]])
    a1 = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 1.0, 0]])
    return [a0, a1]


def test_propagate_direct_vs_rollout_known_answer():
    mats, start = _chain(), torch.tensor([0.0, 0.0, 1.0])
    # direct attention only: layer 0 says "itself", layer 1 says "token 1" -> mean [0, 0.5, 0.5]
    assert torch.allclose(maps.propagate(mats, start, "none"), torch.tensor([0.0, 0.5, 0.5]))
    # rollout v <- v (I + A) from the top: e2 -> e2 + e1 = [0, 1, 1] / 2 -> [0, .5, .5] + [.5, 0, .5] / 2
    assert torch.allclose(maps.propagate(mats, start, "rollout"), torch.tensor([0.25, 0.25, 0.5]))
    # the regularised flow damps early columns by (1 - (L0 - 1) / L) = [1/3, 2/3, 1]:
    # top: [0, 0, 1] + [0, 2/3, 0] -> [0, .4, .6]; bottom: + [.4/3, 0, .6] -> [2/15, .4, 1.2] / (26/15)
    reg = maps.propagate(mats, start, "regularised")
    assert torch.allclose(reg, torch.tensor([2.0, 6.0, 18.0]) / 26)
    assert reg[0] < maps.propagate(mats, start, "rollout")[0]  # less mass collapses into the first token


def test_sink_tokens_massive_activation_rule():
    image = torch.tensor([False, True, True, True])
    phi = {0: torch.tensor([50.0, 4, 30, 4]), 2: torch.tensor([50.0, 25, 4, 4]), 3: torch.tensor([3.0, 4, 4, 4])}
    # from layer 2: token 1 (25 > 20) is a sink; token 2 peaks only at layer 0; token 0 is text (BOS)
    assert maps.sink_tokens(phi, image, 20.0, 2).tolist() == [False, True, False, False]
    assert maps.sink_tokens(phi, image, 20.0, 0).tolist() == [False, True, True, False]


# --------------------------------------------------------------------------- grid to pixels


def test_grid_map_fills_pruned_tokens_with_zero():
    g = maps.grid_map(torch.tensor([1.0, 2.0]), torch.tensor([1, 5]), (1, 2, 3))
    assert g.tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]]
    two_frames = maps.grid_map(torch.tensor([2.0, 4.0]), torch.tensor([0, 4]), (2, 2, 2))  # frames averaged
    assert two_frames.tolist() == [[3.0, 0.0], [0.0, 0.0]]


@pytest.mark.parametrize("cell", [(0, 0), (1, 2), (2, 3)])
def test_grid_to_pixels_peak_lands_in_its_cell(cell):
    grid = torch.zeros(3, 4)
    grid[cell] = 1.0
    heat = maps.grid_to_pixels(grid, (0.0, 0.0, 80.0, 60.0), (80, 60))  # cells of 20 x 20 px
    assert heat.shape == (60, 80) and float(heat.min()) >= 0
    y, x = np.unravel_index(int(heat.argmax()), heat.shape)
    assert cell[0] * 20 <= y < cell[0] * 20 + 20 and cell[1] * 20 <= x < cell[1] * 20 + 20


def test_grid_to_pixels_respects_a_cropped_region():
    # a 160 x 112 image whose centre 112 x 112 square became the grid (LLaVA's shortest-edge resize + crop)
    grid = torch.zeros(4, 4)
    grid[0, 0] = 1.0
    heat = maps.grid_to_pixels(grid, (24.0, 0.0, 136.0, 112.0), (160, 112))
    assert heat.shape == (112, 160)
    assert float(heat[:, :24].max()) == 0 and float(heat[:, 136:].max()) == 0
    y, x = np.unravel_index(int(heat.argmax()), heat.shape)
    assert 24 <= x < 52 and 0 <= y < 28


def test_llava_grid_region_from_the_processor(models):
    model, processor = models["llava"]
    acc = VLMAccelerator(model, processor, policy=None)
    assert acc.adapter.grid_region(processor, (112, 112)) == pytest.approx((0, 0, 112, 112))
    assert acc.adapter.grid_region(processor, (160, 112)) == pytest.approx((24, 0, 136, 112))  # centre crop
    assert acc.adapter.grid_region(processor, (112, 160)) == pytest.approx((0, 24, 112, 136))

    class Padded:  # LlavaImageProcessor(do_pad=True): pad to a centred square, then resize; no crop
        do_pad, do_resize, do_center_crop = True, True, False
        size = {"shortest_edge": 32}

    assert acc.adapter.grid_region(Padded(), (160, 112)) == pytest.approx((0, -24, 160, 136))


def test_qwen_grid_from_image_grid_thw_is_raster_order(models):
    """Qwen2-VL: the grid is image_grid_thw / merge, the LLM's image tokens run in raster order over it (their
    M-RoPE rows are (row, column)), and the grid covers the whole (resized) image."""
    model, processor = models["qwen2_vl"]
    acc = VLMAccelerator(model, processor, policy=None)
    img = make_image(3, 112, 168)
    inputs = acc.adapter.prepare(processor, [[img]], [PROMPT])
    with torch.inference_mode():
        (tokens,) = acc.adapter.image_tokens(inputs, None)
    t, h, w = (int(x) for x in inputs["image_grid_thw"][0])
    assert tokens.grid == (t, h // 2, w // 2) and t == 1 and w > h > 1  # a landscape image: more columns
    pos = acc.adapter.positions(inputs)[:, 0]
    img_pos = pos[:, acc.adapter.image_token_mask(inputs)[0]]  # (4 rows, n image tokens)
    k = torch.arange(img_pos.shape[1])
    cols = w // 2
    assert torch.equal(img_pos[2] - img_pos[2].min(), k // cols)
    assert torch.equal(img_pos[3] - img_pos[3].min(), k % cols)
    assert acc.adapter.grid_region(processor, img.size) == (0.0, 0.0, 168.0, 112.0)


# --------------------------------------------------------------------------- points


def _blob(h, w, cx, cy, sigma, amp=1.0):
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32) + 0.5, torch.arange(w, dtype=torch.float32) + 0.5,
                            indexing="ij")
    return amp * torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma ** 2))


def test_components_labels_8_connected():
    b = torch.tensor([[1, 1, 0, 0, 1],
                      [0, 1, 0, 0, 1],
                      [0, 0, 1, 0, 0],
                      [1, 0, 0, 0, 0]], dtype=torch.bool)
    lab = prompts.components(b)
    assert (lab > 0).eq(b).all()
    assert len(lab[b].unique()) == 3  # {(0,0),(0,1),(1,1),(2,2)} diagonal-connected, {(0,4),(1,4)}, {(3,0)}
    assert lab[0, 0] == lab[2, 2] != lab[0, 4]


def test_points_pick_the_peak_of_the_heaviest_component():
    # a broad blob (most mass) at (30, 40) peaking at 0.9 and a one-pixel spike of 1.0 at (90, 10)
    heat = _blob(64, 100, 30.5, 40.5, 6.0, 0.9)
    heat[10, 90] = 1.0
    pts, labels, region = prompts.initial_points(heat, 0.5)
    assert labels.tolist() == [1, 0]
    assert tuple(pts[0]) == (30.5, 40.5)  # the broad blob's peak, not the global maximum
    assert bool(region[40, 30]) and not bool(region[10, 90])
    assert prompts.peak(heat) == (90.5, 10.5)
    # the negative point: the emptiest part of the map, as far from the positive point as possible (a cell of
    # the 64-pixel work copy: within 2 pixels of the far corner)
    assert abs(pts[1][0] - 99.5) < 2 and abs(pts[1][1] - 0.5) < 2


def test_centroid_point_is_the_regions_centre_of_mass():
    # a flat 0.8 plateau over x in [20, 40), y in [10, 30) with its maximum (1.0) at one corner pixel
    heat = torch.zeros(50, 60)
    heat[10:30, 20:40] = 0.8
    heat[10, 20] = 1.0
    pts, labels, _ = prompts.initial_points(heat, 0.5, positive="centroid")
    assert labels.tolist() == [1, 0]
    x, y = pts[0]
    w = heat[10:30, 20:40]  # the exact weighted mean of the pixel centres
    ex = float((w * (torch.arange(20, 40) + 0.5)[None, :]).sum() / w.sum())
    ey = float((w * (torch.arange(10, 30) + 0.5)[:, None]).sum() / w.sum())
    assert abs(x - ex) < 1e-4 and abs(y - ey) < 1e-4 and abs(x - 30) < 0.1 and abs(y - 20) < 0.1
    assert tuple(prompts.initial_points(heat, 0.5, positive="peak")[0][0]) == (20.5, 10.5)
    # a ring: the centre of mass (25, 25) lies outside the region, so the nearest region pixel is taken
    yy, xx = torch.meshgrid(torch.arange(50) + 0.5, torch.arange(50) + 0.5, indexing="ij")
    r = ((xx - 25) ** 2 + (yy - 25) ** 2).sqrt()
    ring = ((r >= 10) & (r < 13)).float()
    (x, y), _ = prompts.centroid(ring, ring > 0), None
    assert bool(ring[int(y), int(x)] > 0) and 10 <= ((x - 25) ** 2 + (y - 25) ** 2) ** 0.5 < 11
    with pytest.raises(ValueError, match="positive"):
        prompts.initial_points(heat, 0.5, positive="middle")


def test_refinement_points_known_answer():
    heat = _blob(40, 40, 20.5, 20.5, 5.0)
    region = heat >= 0.5
    mask = torch.zeros(40, 40, dtype=torch.bool)
    mask[:, :20] = True  # covers the left half of the blob and a lot of empty map
    pts, labels = prompts.refinement_points(heat, mask, region, np.array([[15.5, 20.5]]))
    assert labels.tolist() == [1, 0]
    assert tuple(pts[0]) == (20.5, 20.5)  # the strong part the mask misses
    assert heat[int(pts[1][1]), int(pts[1][0])] < 0.05  # negative where the mask covers nothing
    nothing, _ = prompts.refinement_points(heat, heat >= 0.05, region, np.array([[20.5, 20.5]]))
    assert len(nothing) == 0


def test_bbox():
    m = np.zeros((10, 10), bool)
    m[2:5, 3:8] = True
    assert prompts.bbox(m).tolist() == [3, 2, 8, 5]
    assert prompts.bbox(np.zeros((3, 3), bool)) is None


# --------------------------------------------------------------------------- SAM


@pytest.fixture(scope="module")
def sam_predictor():
    pytest.importorskip("segment_anything")
    from vlmfast.grounding.segmenter import load_predictor

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_predictor(GroundingConfig())
    torch.set_num_threads(threads)


def test_synthetic_map_through_tiny_sam_gives_the_object_mask(sam_predictor):
    from vlmfast.datasets.shapes import generate_scene, mask_iou, split_seeds
    from vlmfast.grounding.segmenter import segment

    scene = generate_scene(split_seeds("test", 3)[2], 336)
    sam_predictor.set_image(np.asarray(scene.image))
    for obj in scene.objects[:3]:
        if obj.mask.sum() < 300:
            continue
        cx, cy = obj.center
        heat = maps.normalise(_blob(336, 336, cx, cy, 14.0))  # a map peaked on the object (as attention would be)
        seg = segment(sam_predictor, heat, GroundingConfig())
        assert seg.labels[0] == 1 and obj.mask[int(seg.points[0][1]), int(seg.points[0][0])]
        assert seg.mask.shape == obj.mask.shape and seg.mask.dtype == bool
        assert mask_iou(seg.mask, obj.mask) > 0.7, (obj, mask_iou(seg.mask, obj.mask))
        assert 0 < seg.score <= 1.5


def test_phrases_of_one_image_are_prompted_in_one_batch(sam_predictor):
    """segment_all prompts SAM once for several maps of the image it holds: the same points, masks and scores as
    one call per map (with and without the region's box)."""
    from vlmfast.datasets.shapes import generate_scene, split_seeds
    from vlmfast.grounding.segmenter import ImageEmbeddings, segment, segment_all

    scene = generate_scene(split_seeds("test", 3)[1], 336)
    ImageEmbeddings(sam_predictor).set(np.asarray(scene.image))
    heats = [maps.normalise(_blob(336, 336, *obj.center, 14.0)) for obj in scene.objects[:3]]
    calls = []
    predict_torch = sam_predictor.predict_torch
    sam_predictor.predict_torch = lambda *a, **k: calls.append(a[0].shape) or predict_torch(*a, **k)
    try:
        for cfg in (GroundingConfig(), GroundingConfig(use_box=True, multimask=True)):
            calls.clear()
            together = segment_all(sam_predictor, heats, cfg)
            assert calls == [(len(heats), 2, 2)]  # one SAM call, a batch of 2-point prompts
            for heat, seg in zip(heats, together):
                alone = segment(sam_predictor, heat, cfg)
                np.testing.assert_array_equal(seg.points, alone.points)
                np.testing.assert_array_equal(seg.labels, alone.labels)
                assert (seg.box is None) == (alone.box is None) and (seg.box is None or (seg.box == alone.box).all())
                assert (seg.mask != alone.mask).sum() <= 2  # float tolerance at the mask's edge
                assert seg.score == pytest.approx(alone.score, abs=1e-4)
    finally:
        sam_predictor.predict_torch = predict_torch


def test_sam_checkpoint_errors(tmp_path):
    from vlmfast.grounding.segmenter import load_predictor

    with pytest.raises(PolicyError, match="needs grounding.sam_checkpoint"):
        load_predictor(GroundingConfig(sam_type="vit_b"))
    with pytest.raises(PolicyError, match="no file"):
        load_predictor(GroundingConfig(sam_type="vit_b", sam_checkpoint=str(tmp_path / "none.pth")))
    bad = tmp_path / "code.pth"
    torch.save({"model": object()}, bad)  # not loadable with weights_only=True
    with pytest.raises(PolicyError, match="weights_only"):
        load_predictor(GroundingConfig(sam_type="vit_b", sam_checkpoint=str(bad)))


# --------------------------------------------------------------------------- phrases and policy


def test_object_phrases():
    found = [p for p, _, _ in object_phrases("a red circle , a blue star and two green squares .")]
    assert found == ["red circle", "blue star", "green squares"]
    assert [p for p, _, _ in object_phrases("An orange cat near a traffic light and an orange.")] == [
        "orange cat", "traffic light", "orange"]
    assert object_phrases("top left") == []


def test_find_phrase_in_prompt_tokens(models):
    _, processor = models["llava"]
    tok = processor.tokenizer
    ids = tok("USER: where is the red circle ? ASSISTANT:", add_special_tokens=False)["input_ids"]
    at = find_phrase(tok, ids, "red circle")
    assert tok.decode([ids[i] for i in at]) == "red circle"
    with pytest.raises(InputError, match="does not occur in the prompt"):
        find_phrase(tok, ids, "blue star")


def test_policy_grounding_section_round_trip():
    pol = Policy.from_dict({"methods": [{"method": "fopru", "keep": 0.5}],
                            "grounding": {"flow": "rollout", "sam_type": "tiny-sam-shapes"}})
    assert pol.grounding == GroundingConfig(flow="rollout")
    assert Policy.from_dict(pol.to_dict()) == pol
    with pytest.raises(PolicyError, match="grounding.flow"):
        Policy.from_dict({"grounding": {"flow": "sideways"}})
    with pytest.raises(PolicyError, match="grounding.nope"):
        Policy.from_dict({"grounding": {"nope": 1}})


# --------------------------------------------------------------------------- capture and the API end to end


def test_attention_probs_equal_eager_softmax():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)  # GQA: 4 query heads, 2 key heads

    class M:
        scaling = 8 ** -0.5

    p = attention_probs(M(), q, k, None)
    ref = (q @ k.repeat_interleave(2, 1).transpose(-1, -2) * M.scaling).masked_fill(
        ~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    assert torch.allclose(p, ref, atol=1e-6)
    padded = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    padded[1, :, :, 0] = False  # sample 1 has one left pad
    padded[1, :, 0, :] = False
    p2 = attention_probs(M(), q, k, padded)
    assert float(p2[1, :, 0].abs().sum()) == 0 and float(p2[1, :, 1:, 0].abs().sum()) == 0


def _eager_reference(model, monkeypatch):
    """Switch the language model to eager attention and record the head-mean weights it returns, per layer and
    call: {layer: [(B, Q, K) prefill, (B, 1, K) per decode step]}."""
    from vlmfast import attention

    recorded: dict[int, list[torch.Tensor]] = {}
    call = attention.AttentionSession.__call__

    def spy(self, module, query, key, value, attention_mask=None, **kwargs):
        out, weights = call(self, module, query, key, value, attention_mask, **kwargs)
        recorded.setdefault(module.layer_idx, []).append(weights.float().mean(1))
        return out, weights

    monkeypatch.setattr(attention.AttentionSession, "__call__", spy)
    model.set_attn_implementation({"text_config": "eager"})
    return recorded


@pytest.mark.parametrize("batch", [False, True], ids=["sdpa-causal", "padded-batch"])
def test_capture_equals_the_models_eager_attention(models, family, monkeypatch, sam_predictor, batch):
    """The capture keeps SDPA for the output and recomputes, after decoding, only the rows the maps read
    (``row_attention``: phrase rows and answer rows, batched over layers) or, for the flows, every captured row
    (``matrices``). Both equal the attention weights of the model's own eager implementation (prefill and every
    decode step; an SDPA run without masks, and a left-padded batch under eager masks), and maps, points and
    masks computed from the eager weights are the ones ``generate(..., ground=True)`` returns."""
    from vlmfast.grounding import pipeline

    model, processor = models[family]
    base = model.config.get_text_config()._attn_implementation
    acc = VLMAccelerator(model, processor, policy=Policy(grounding=GroundingConfig()))
    acc.grounder.predictor = sam_predictor
    prompts_ = [PROMPT, "is there a blue star on the left of the red circle ? answer with one word"][: 1 + batch]
    kw = dict(images=[[make_image(3)], [make_image(4, 112, 150)]][: 1 + batch], prompt=prompts_, max_new_tokens=5,
              ground=True, ground_phrases=[["red circle"], ["blue star", "red circle"]][: 1 + batch])
    try:
        eager = _eager_reference(model, monkeypatch)
        outs = acc.generate(**kw)
    finally:
        model.set_attn_implementation({"text_config": base})
        monkeypatch.undo()
    if not batch:  # the capture of the same request under SDPA (no mask: the capture applies the causal limit)
        again = acc.generate(**kw)
        assert [o.token_ids for o in again] == [o.token_ids for o in outs]
        outs = again
    req = acc.grounder.last_request
    cap = req.capture
    n_layers, length, steps = cap.n_layers, cap.prefill_len, cap.decode_steps
    # 4 decode steps unless the random model ends its answer early (tiny Qwen3-VL: after 3 tokens); at least one
    assert 1 <= steps <= 4 and not cap.all_rows and all(len(v) == 1 + steps for v in eager.values())
    for b, (reqs, ctx) in enumerate(req.samples):
        ref = []  # the eager head-mean attention of sample b, (n, n) per layer
        for layer in range(n_layers):
            m = torch.zeros(length + steps, length + steps)
            m[:length, :length] = eager[layer][0][b]
            for t in range(steps):
                m[length + t, : length + t + 1] = eager[layer][1 + t][b, 0]
            ref.append(m)
        text = torch.cat([ctx.valid[b] & ~ctx.image_mask[b], torch.ones(steps, dtype=torch.bool)])
        rows = text.nonzero().flatten().tolist()
        got = cap.row_attention(b, rows, list(range(n_layers)))
        torch.testing.assert_close(got, torch.stack([m[rows] for m in ref]), atol=2e-6, rtol=1e-5)
        for m, r in zip(cap.matrices(b), ref):  # every text row (the direct maps capture no image rows)
            torch.testing.assert_close(m[text], r[text], atol=2e-6, rtol=1e-5)

        class Eager:  # the maps' input, from the eager weights
            def __init__(self):
                self.n_layers, self.phi = n_layers, cap.phi

            def row_attention(self, b_, positions, layers):
                return torch.stack([ref[k][positions] for k in layers])

        again = pipeline.ground_sample(Eager(), acc.grounder.cfg, reqs, ctx, sam_predictor, acc.grounder.embeddings)
        assert [g.phrase for g in again] == [g.phrase for g in outs[b].grounding] and len(again) >= 1 + b
        for g, h in zip(outs[b].grounding, again):
            np.testing.assert_allclose(g.heatmap, h.heatmap, atol=1e-5)
            np.testing.assert_allclose(g.points, h.points, atol=1e-3)  # pixels: weighted centroids of those maps
            np.testing.assert_array_equal(g.mask, h.mask)


@pytest.fixture
def ground_acc(models, family):
    model, processor = models[family]
    cfg = GroundingConfig(prompt_rows="phrase")
    return VLMAccelerator(model, processor, policy=Policy(grounding=cfg))


def test_generate_ground_returns_groundings_and_same_tokens(ground_acc):
    img = make_image(5, 112, 140)
    plain = ground_acc.generate(images=[img], prompt=PROMPT, max_new_tokens=6)
    out = ground_acc.generate(images=[img], prompt=PROMPT, max_new_tokens=6, ground=True,
                              ground_phrases=["red circle"])
    assert plain.grounding is None
    assert out.token_ids == plain.token_ids  # observing attention changes nothing
    assert out.grounding and isinstance(out.grounding[0], Grounding)
    g = out.grounding[0]
    assert g.phrase == "red circle" and g.image_index == 0
    assert g.heatmap.dtype == np.float32 and g.heatmap.shape == (112, 140)
    assert float(g.heatmap.min()) >= 0 and float(g.heatmap.max()) == pytest.approx(1.0)
    assert g.mask.dtype == bool and g.mask.shape == (112, 140)
    assert g.points.shape[1] == 2 and g.point_labels.shape == (len(g.points),) and g.point_labels[0] == 1
    assert g.box is None and isinstance(g.score, float)
    assert out.stats.grounding_s > 0
    # answer object words are grounded too (after the prompt phrases)
    words = [p for p, _, _ in object_phrases(out.text)]
    assert [x.phrase for x in out.grounding[1:]] == list(dict.fromkeys(w.lower() for w in words))


def test_ground_batch_equals_alone(ground_acc):
    imgs = [make_image(6), make_image(7, 112, 150)]
    prompts_ = [PROMPT, "is there a blue star on the left of the red circle ?"]
    batch = ground_acc.generate(images=[[imgs[0]], [imgs[1]]], prompt=prompts_, max_new_tokens=3, ground=True,
                                ground_phrases=[["red circle"], ["blue star"]])
    for i in range(2):
        alone = ground_acc.generate(images=[imgs[i]], prompt=prompts_[i], max_new_tokens=3, ground=True,
                                    ground_phrases=[["red circle", "blue star"][i]])
        assert batch[i].grounding[0].phrase == alone.grounding[0].phrase
        np.testing.assert_allclose(batch[i].grounding[0].heatmap, alone.grounding[0].heatmap, atol=2e-3)


@pytest.mark.parametrize("methods", [[FoPru(keep=0.25)], [FastV(layer=2, keep=0.25)]], ids=["fopru", "fastv"])
def test_ground_with_pruning(models, family, methods):
    model, processor = models[family]
    acc = VLMAccelerator(model, processor, policy=Policy(methods, grounding=GroundingConfig(prompt_rows="phrase")))
    img = make_image(8)
    out = acc.generate(images=[img], prompt=PROMPT, max_new_tokens=4, ground=True, ground_phrases=["red circle"])
    g = out.grounding[0]
    assert g.heatmap.shape == (112, 112) and g.mask.shape == (112, 112)
    if isinstance(methods[0], FoPru):  # pruned tokens read 0: the map has the kept tokens' support only
        assert out.stats.visual_tokens_kept < out.stats.visual_tokens_in


def test_capture_scatters_shortened_layers_back(models):
    """FastV drops tokens from layer 2 on: those layers' captured rows and columns of dropped tokens are 0,
    and the kept ones sit at their original positions."""
    model, processor = models["llava"]
    acc = VLMAccelerator(model, processor, policy=Policy([FastV(layer=2, keep=0.25)],
                                                         grounding=GroundingConfig(flow="rollout")))
    acc.generate(images=[make_image(9)], prompt=PROMPT, max_new_tokens=3, ground=True)
    cap = acc.grounder.last_request.capture
    assert cap.all_rows  # the flows need every query row
    keep = cap.kept_index(3)[0]
    n = cap.prefill_len
    full = cap.matrices(0)
    dropped = torch.ones(n, dtype=torch.bool)
    dropped[keep] = False
    assert bool(dropped.any())
    assert float(full[3][:n, :n][:, dropped].abs().sum()) == 0 and float(full[3][:n, :n][dropped].abs().sum()) == 0
    assert float(full[0][:n, :n][:, dropped].abs().sum()) > 0  # layer 0 still sees every token
    # kept rows are whole attention rows (weighted head mean): they sum to the mean head weight
    assert torch.allclose(full[3][:n, :n][keep].sum(-1), cap.weights[3][0].mean().expand(len(keep)), atol=1e-4)
    assert full[3].shape[0] == n + cap.decode_steps == n + 2  # 3 new tokens, the last one never fed


def test_ground_phrase_errors(ground_acc):
    img = make_image(1)
    with pytest.raises(InputError, match="does not occur in the prompt"):
        ground_acc.generate(images=[img], prompt=PROMPT, max_new_tokens=2, ground=True, ground_phrases=["green star"])
    with pytest.raises(InputError, match="needs ground=True"):
        ground_acc.generate(images=[img], prompt=PROMPT, max_new_tokens=2, ground_phrases=["red circle"])
    # nothing to ground in: refused (it returned [] silently), for one request and for a batch's sample
    with pytest.raises(InputError, match="ground=True needs an image to ground in, and the request has none"):
        ground_acc.generate(images=None, prompt=PROMPT, max_new_tokens=2, ground=True)
    with pytest.raises(InputError, match=r"prompt\[1\] has none"):
        ground_acc.generate(images=[[img], []], prompt=[PROMPT, PROMPT], max_new_tokens=2, ground=True)


def test_capture_decode_rows_are_counted(models):
    model, processor = models["qwen2_vl"]
    cap = AttentionCapture(2, torch.ones(1, 3, dtype=torch.bool))

    class M:
        scaling = 1.0

    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    cap._observer(0)(M(), q, k, None)
    cap._observer(1)(M(), q, k, None)
    cap._observer(0)(M(), q[:, :, :1], torch.randn(1, 2, 4, 4), None)
    with pytest.raises(RuntimeError, match="expected 4 keys"):  # an evicted / foreign cache is refused
        cap._observer(1)(M(), q[:, :, :1], torch.randn(1, 2, 9, 4), None)


def test_direct_maps_capture_text_rows_only(models):
    """flow=none with plain head means reads only text queries: image rows are left empty, text rows are whole
    attention rows (sum 1)."""
    model, processor = models["llava"]
    acc = VLMAccelerator(model, processor, policy=Policy(grounding=GroundingConfig(flow="none", head_weights="mean")))
    acc.generate(images=[make_image(2)], prompt=PROMPT, max_new_tokens=2, ground=True, ground_phrases="red circle")
    req = acc.grounder.last_request
    cap, (_, ctx) = req.capture, req.samples[0]
    assert not cap.all_rows
    image = ctx.image_mask[0] & ctx.valid[0]
    n = cap.prefill_len
    for m in cap.matrices(0):
        assert float(m[:n][image].abs().sum()) == 0
        assert torch.allclose(m[:n][~image & ctx.valid[0]].sum(-1), torch.ones(int((~image & ctx.valid[0]).sum())),
                              atol=1e-5)


def test_direct_map_of_chosen_layers_records_only_those(models):
    """With ``layers`` and the direct map, only those layers are recorded; their rows equal the ones a capture of
    every layer gives. A layer the model does not have is refused before the model runs."""
    model, processor = models["llava"]
    img, kw = make_image(2), dict(prompt=PROMPT, max_new_tokens=3, ground=True, ground_phrases="red circle")
    acc = VLMAccelerator(model, processor, policy=Policy(grounding=GroundingConfig(layers=[-1])))
    out = acc.generate(images=[img], **kw)
    req = acc.grounder.last_request
    cap, last = req.capture, req.capture.n_layers - 1
    assert cap.layers == [last] and out.grounding
    with pytest.raises(RuntimeError, match="did not record layers"):
        cap.matrices(0)
    every = VLMAccelerator(model, processor, policy=Policy(grounding=GroundingConfig()))
    every.generate(images=[img], **kw)
    rows = req.samples[0][0][0].rows
    torch.testing.assert_close(cap.row_attention(0, rows, [last])[0],
                               every.grounder.last_request.capture.matrix(0, last)[rows])
    bad = VLMAccelerator(model, processor, policy=Policy(grounding=GroundingConfig(layers=[99])))
    with pytest.raises(PolicyError, match="decoder layers"):
        bad.generate(images=[img], **kw)


def test_sam_encoder_thread_ends_with_the_request(models, sam_predictor):
    """With ``overlap`` SAM encodes in a background thread during the VLM call, and that thread ends with the
    request: an idle thread that has run torch's intra-op work slows every later call of the process."""
    import threading
    import time

    model, processor = models["llava"]
    acc = VLMAccelerator(model, processor, policy=Policy(grounding=GroundingConfig(overlap=True)))
    acc.grounder.predictor = sam_predictor
    seen = []
    encode = acc.grounder.embeddings._encode
    acc.grounder.embeddings._encode = lambda image: seen.append(threading.current_thread().name) or encode(image)
    out = acc.generate(images=[make_image(5)], prompt=PROMPT, max_new_tokens=2, ground=True,
                       ground_phrases="red circle")
    assert out.grounding and len(seen) == 1 and seen[0].startswith("vlmfast-sam")
    deadline = time.monotonic() + 10
    while any(t.name.startswith("vlmfast-sam") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.name.startswith("vlmfast-sam") for t in threading.enumerate())


def test_evicting_kv_cache_is_refused_clearly(models):
    from vlmfast.registry import get_method

    model, processor = models["llava"]
    acc = VLMAccelerator(model, processor, policy=Policy([get_method("zipvl")(kv="evict", tau=0.5)]))
    with pytest.raises(RuntimeError, match="evicting cache"):
        acc.generate(images=[make_image(1)], prompt=PROMPT, max_new_tokens=4, ground=True, ground_phrases="red circle")
    # the accelerator is still usable, without grounding
    assert acc.generate(images=[make_image(1)], prompt=PROMPT, max_new_tokens=2).grounding is None


@pytest.mark.parametrize("rows", ["phrase", "answer", "phrase+answer", "reply", "phrase+reply"])
def test_phrase_rows_choose_the_named_query_rows(models, rows):
    """Known answer: the phrase's own token positions, the last prompt position (it chose answer token 0) and
    one decode step per later answer token (step i - 1 chose token i; the last token's step never ran)."""
    from vlmfast.grounding.pipeline import phrase_rows

    tok = models["llava"][1].tokenizer
    ids = tok("where is the red circle ?", add_special_tokens=False)["input_ids"]
    own = tok("where is the", add_special_tokens=False)["input_ids"]
    n = len(ids)
    span = list(range(len(own), len(own) + len(tok(" red circle", add_special_tokens=False)["input_ids"])))
    inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, n, dtype=torch.long)}
    positions, valid = torch.arange(n)[None, None], torch.ones(1, n, dtype=torch.bool)
    answer = tok("top left .", add_special_tokens=False)["input_ids"]
    (pr,) = phrase_rows(tok, GroundingConfig(prompt_rows=rows, answer_objects=False), inputs, positions, valid, 0,
                        ["red circle"], answer, decode_steps=len(answer) - 1)
    reply = [n - 1 + i for i in range(len(answer))]
    want = {"phrase": span, "answer": [n - 1], "phrase+answer": span + [n - 1], "reply": reply,
            "phrase+reply": span + reply}[rows]
    assert pr.phrase == "red circle" and pr.rows == sorted(set(want))
