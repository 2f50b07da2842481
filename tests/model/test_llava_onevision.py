"""LLaVA-OneVision through transformers' own class: LLaVA-NeXT's two views with anyres_max's downscale of the stitched
grid, one untiled view per image of a multi-image sample, and videos (frames pooled 2 x 2, one newline per video),
against transformers' own packing, ``model.generate`` and eager tower attention (issue 20, part 2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_image, reference_generate

from vlmfast import DivPrune, FastV, FoPru, Policy, VLMAccelerator
from vlmfast.adapters import adapter_for
from vlmfast.adapters.llava_onevision import bilinear_taps
from vlmfast.budget import n_keep, split_budget
from vlmfast.errors import UnsupportedModelError
from vlmfast.sparse import Dense, Grid, MMInference

PROMPT = "what is in the image ?"
WIDE = (32, 64)  # H, W: 1 x 2 crops of 32 px, an 8 x 16 grid, not downscaled
DOWN = (48, 80)  # 2 x 3 crops, unpadded to 14 x 24 tokens: more than anyres_max_4's 4 crops, downscaled to 12 x 20
PAIR = [(32, 32), (60, 40)]  # two images in one sample: one untiled view each


@pytest.fixture(scope="module")
def ov(models):
    return models["llava_onevision"]


def _acc(ov, *methods):
    return VLMAccelerator(*ov, policy=Policy(list(methods)) if methods else None)


def _images(shapes, seed=0):
    return [make_image(seed + i, size=h, width=w) for i, (h, w) in enumerate(shapes)]


def make_video(frames=4, size=40, seed=0):
    return (np.random.default_rng(seed).random((frames, size, size, 3)) * 255).astype("uint8")


def reference_video(model, processor, video, images=(), max_new_tokens=6):
    """transformers alone: the chat template with the images and a video item, the processor, ``model.generate``."""
    content = [{"type": "image"} for _ in images] + [{"type": "video"}, {"type": "text", "text": PROMPT}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=[list(images)] if images else None, videos=[video], text=[text], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    ids = out[0, inputs["input_ids"].shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    return ids[: ids.index(eos)] if eos in ids else ids


def _eager(model, pixels, layer):
    """transformers' eager SigLIP attention of ``layer`` over ``pixels`` (crops or frames), head-mean: (n, P, P)."""
    tower = model.model.vision_tower
    impl = tower.config._attn_implementation
    tower.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            return tower(pixels, output_attentions=True).attentions[layer].float().mean(1)
    finally:
        tower.set_attn_implementation(impl)


def _dense(taps, weights, n_in):
    """The (n_out, n_in) matrix of a bilinear resize from its taps."""
    return torch.zeros(taps.shape[0], n_in).scatter_add_(1, taps, weights)


@pytest.mark.parametrize("shape, grid", [(WIDE, (8, 16)), (DOWN, (12, 20))], ids=["wide", "downscaled"])
def test_views_and_newlines_are_transformers_own_packing(ov, shape, grid):
    model, processor = ov
    adapter = adapter_for(model)
    inputs = adapter.prepare(processor, [_images([shape])], [PROMPT])
    (base, hires), _ = adapter.visual_tokens(inputs, None)
    with torch.inference_mode():
        packed = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                                batch_num_images=inputs["batch_num_images"]).pooler_output[0]
    rows, cols = grid
    assert (base.view, base.grid, hires.view, hires.grid) == (0, (1, 8, 8), 1, (1, rows, cols))
    stitched = packed[64:].view(rows, cols + 1, -1)
    assert torch.equal(base.features, packed[:64])
    assert torch.equal(hires.features, stitched[:, :cols].reshape(rows * cols, -1))
    assert torch.equal(hires.fixed, stitched[:, cols]) and torch.equal(hires.fixed[0], model.model.image_newline)
    image = inputs["input_ids"][0] == model.config.image_token_id
    fixed = adapter.fixed_token_mask(inputs)[0]
    assert int(image.sum()) == 64 + rows * (cols + 1) and int(fixed.sum()) == rows
    assert not bool((adapter.image_token_mask(inputs)[0] & fixed).any())
    assert (image.cumsum(0) - 1)[fixed].tolist() == [64 + (cols + 1) * r + cols for r in range(rows)]
    h, w = shape  # the grid region is the image padded to a centred square; both views cover the image in it
    side = max(h, w)
    assert adapter.grid_region(processor, (w, h)) == (-((side - w) // 2), -((side - h) // 2),
                                                      side - (side - w) // 2, side - (side - h) // 2)
    assert base.region == hires.region == ((side - w) // 2 / side, (side - h) // 2 / side,
                                           ((side - w) // 2 + w) / side, ((side - h) // 2 + h) / side)


def test_the_downscale_is_torchs_bilinear_resize_of_the_unpadded_grid(ov):
    """The downscaled view's tokens are ``bilinear_taps``' mix of the grid transformers would pack without the
    downscale (the same model's ``pack_image_features`` with a limit it never reaches)."""
    model, processor = ov
    adapter = adapter_for(model)
    inputs = adapter.prepare(processor, [_images([DOWN])], [PROMPT])
    (_, hires), _ = adapter.visual_tokens(inputs, None)
    crops = inputs["pixel_values"][0, :7]
    with torch.inference_mode():
        feats = model.model.multi_modal_projector(model.model.vision_tower(crops, output_hidden_states=True)
                                                  .hidden_states[-1])
        (full,), _ = model.model.pack_image_features([feats], inputs["image_sizes"], image_newline=None,
                                                     vision_aspect_ratio="anyres_max_1000")
    grid = full[64:]
    assert grid.shape[0] == 14 * 24
    taps, weights = bilinear_taps((14, 24), (12, 20))
    assert taps.shape == (240, 4) and torch.allclose(weights.sum(1), torch.ones(240))
    torch.testing.assert_close(hires.features, _dense(taps, weights, 14 * 24) @ grid, atol=1e-5, rtol=1e-4)


def test_the_images_of_a_multi_image_sample_are_one_untiled_view_each(ov):
    model, processor = ov
    adapter = adapter_for(model)
    inputs = adapter.prepare(processor, [_images(PAIR)], [PROMPT])
    views, _ = adapter.visual_tokens(inputs, None)
    with torch.inference_mode():
        packed = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                                batch_num_images=inputs["batch_num_images"]).pooler_output
    assert inputs["batch_num_images"].tolist() == [2] and [v.view for v in views] == [0, 0]
    for v, p in zip(views, packed, strict=True):
        assert v.grid == (1, 8, 8) and torch.equal(v.features, p[:64]) and torch.equal(v.fixed, p[64:])
        assert torch.equal(v.fixed[0], model.model.image_newline)
    fixed = adapter.fixed_token_mask(inputs)[0]
    image = inputs["input_ids"][0] == model.config.image_token_id
    assert (image.cumsum(0) - 1)[fixed].tolist() == [64, 129]
    assert adapter.grid_region(processor, (40, 60)) == (-10.0, 0.0, 50.0, 60.0)  # padded to a square of 60


def test_a_video_is_its_pooled_frames_and_one_newline(ov):
    model, processor = ov
    adapter = adapter_for(model)
    inputs = adapter.prepare(processor, [[]], [PROMPT], videos=[[make_video()]])
    _, (video,) = adapter.visual_tokens(inputs, None)
    frames = inputs["pixel_values_videos"]
    with torch.inference_mode():
        packed = model.model.get_video_features(frames).pooler_output[0]
        hidden = model.model.vision_tower(frames[0], output_hidden_states=True).hidden_states[-1]
        projected = model.model.multi_modal_projector(hidden)  # (4 frames, 64 patches, d)
    assert (video.kind, video.grid, video.view) == ("video", (4, 4, 4), 0)
    assert torch.equal(video.features, packed[:-1]) and torch.equal(video.fixed, packed[-1:])
    assert torch.equal(video.fixed[0], model.model.image_newline)
    pool = _dense(*bilinear_taps((8, 8), (4, 4)), 64)
    torch.testing.assert_close(video.features.view(4, 16, -1), pool @ projected, atol=1e-5, rtol=1e-4)
    vid = inputs["input_ids"][0] == model.config.video_token_id
    fixed = adapter.fixed_token_mask(inputs)[0]
    assert int(vid.sum()) == 65 and (vid.cumsum(0) - 1)[fixed].tolist() == [64]
    assert int(adapter.image_token_mask(inputs)[0].sum()) == 64


def test_scoring_attention_is_the_bilinear_mix_of_each_crops_own(ov):
    """The downscaled view's attention is W A W^T of the tiles' block-diagonal attention (zero across tiles); a
    video frame's is W A W^T of its own attention: from transformers' eager tower attention and torch's weights."""
    model, processor = ov
    adapter = adapter_for(model)
    layer = adapter.resolve_vision_layer(None)
    inputs = adapter.prepare(processor, [_images([DOWN], seed=5)], [PROMPT])
    (base, hires), _ = adapter.visual_tokens(inputs, layer)
    eager = _eager(model, inputs["pixel_values"][0, :7], layer)  # (7 crops, 64, 64)
    torch.testing.assert_close(base.attention, eager[0], atol=1e-5, rtol=1e-4)
    assert base.cls_attention is None and hires.cls_attention is None  # SigLIP: no [CLS]
    npw, rows, cols, index = adapter.layout(inputs["image_sizes"][0].tolist())
    r, c = index // (npw * 8), index % (npw * 8)
    tile, patch = (r // 8) * npw + c // 8, (r % 8) * 8 + c % 8
    blocks = eager[1 + tile[:, None], patch[:, None], patch[None, :]] * (tile[:, None] == tile[None, :])
    down = _dense(*bilinear_taps((rows, cols), (12, 20)), rows * cols)
    torch.testing.assert_close(hires.attention, down @ blocks @ down.T, atol=1e-5, rtol=1e-4)
    vin = adapter.prepare(processor, [[]], [PROMPT], videos=[[make_video(seed=2)]])
    _, (video,) = adapter.visual_tokens(vin, layer)
    frames = _eager(model, vin["pixel_values_videos"][0], layer)  # (4, 64, 64)
    pool = _dense(*bilinear_taps((8, 8), (4, 4)), 64)
    assert video.attention.shape == (4, 16, 16) and video.keys.shape == (64, video.keys.shape[1])
    torch.testing.assert_close(video.attention, pool @ frames @ pool.T, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("shapes", [[], [WIDE], [DOWN], PAIR], ids=["text", "wide", "downscaled", "two"])
def test_identity_with_model_generate(ov, shapes):
    model, processor = ov
    imgs = _images(shapes)
    out = _acc(ov).generate(images=imgs or None, prompt=PROMPT, max_new_tokens=6)
    assert out.token_ids == reference_generate(model, processor, imgs, PROMPT, 6)
    assert len(out.kept) == (2 if len(imgs) == 1 else len(imgs))  # two views for a lone image, one each otherwise


@pytest.mark.parametrize("shapes", [[], [DOWN]], ids=["video", "image+video"])
def test_video_identity_with_model_generate(ov, shapes):
    model, processor = ov
    imgs, video = _images(shapes), make_video(seed=1)
    out = _acc(ov).generate(images=imgs or None, videos=[video], prompt=PROMPT, max_new_tokens=6)
    assert out.token_ids == reference_video(model, processor, video, imgs, 6)
    assert out.stats.video_tokens_in == 64


def test_a_multi_view_image_and_a_video_at_100_percent_equal_no_pruning(ov):
    img, video = _images([DOWN], seed=3), make_video(seed=3)
    for kwargs in (dict(images=img), dict(videos=[video])):
        plain = _acc(ov).generate(prompt=PROMPT, max_new_tokens=6, **kwargs).token_ids
        for p in (FoPru(keep=1.0), DivPrune(keep=1.0), FastV(layer=1, keep=1.0)):
            assert _acc(ov, p).generate(prompt=PROMPT, max_new_tokens=6, **kwargs).token_ids == plain, (p, kwargs)


@pytest.mark.parametrize("keep", [0.5, 0.25, 0.1])
@pytest.mark.parametrize("pruner", [FoPru, DivPrune])
def test_budgets_are_exact_for_images_and_videos(ov, pruner, keep):
    out = _acc(ov, pruner(keep=keep)).generate(images=_images([DOWN], seed=4), prompt=PROMPT, max_new_tokens=2)
    assert out.stats.visual_tokens_in == 64 + 240  # the newlines are not prunable visual tokens
    assert out.stats.visual_tokens_kept == n_keep(304, keep)
    assert [k.numel() for k in out.kept] == split_budget([64, 240], keep)
    out = _acc(ov, pruner(keep=keep)).generate(videos=[make_video(seed=4)], prompt=PROMPT, max_new_tokens=2)
    assert out.stats.visual_tokens_in == out.stats.video_tokens_in == 64
    assert out.stats.visual_tokens_kept == 4 * n_keep(16, keep)  # each frame keeps its share


def test_sparse_prefill_lays_out_the_views_and_the_video_with_its_frame_stride(ov):
    """Dense patterns give the plain tokens; a frame-strided grid sees the base view as one span, the stitched view as
    one span per row (its newlines are text) and the video as one span of 4 pooled 4 x 4 frames (stride 16); FoPru's
    half of each frame keeps the video's grid."""
    img, video = _images([WIDE], seed=2), make_video(seed=6)
    kwargs = dict(images=img, videos=[video], prompt=PROMPT, max_new_tokens=6)
    plain = _acc(ov).generate(**kwargs)
    assert _acc(ov, MMInference(min_length=0, block=16, default=Dense())).generate(**kwargs).token_ids == \
        plain.token_ids
    for methods, frame in (([], 16), ([FoPru(keep=0.5)], 8)):
        sparse = MMInference(min_length=0, block=16, default=Grid(stride="frame", local=16))
        out = _acc(ov, *methods, sparse).generate(**kwargs)
        spans = next(s for s in out.stats.stages if s["method"] == "mminference")["visual_spans"]
        assert [s["kind"] for s in spans] == ["image"] * 9 + ["video"]
        assert [s["grid"] for s in spans[:2]] == [[1, 8, 8], [1, 8, 16]]
        assert spans[-1] == {"kind": "video", "grid": [4, 4, 4], "frame_stride": 16, "tokens": 4 * frame}


@pytest.mark.parametrize("methods", [(), (FoPru(keep=0.25),), (FastV(layer=1, keep=0.5),)], ids=["none", "fopru",
                                                                                             "fastv"])
def test_batch_with_left_padding_equals_alone(ov, methods):
    acc = _acc(ov, *methods)
    video = make_video(seed=9)
    jobs = [(_images([DOWN], seed=7), [], "what is it ?"), (_images(PAIR, seed=8), [], PROMPT),
            ([], [video], PROMPT), (_images([WIDE], seed=6), [make_video(seed=5)], "what is it ?"),
            ([], [], "how many objects are there ?")]
    alone = [acc.generate(images=i or None, videos=v or None, prompt=p, max_new_tokens=5) for i, v, p in jobs]
    batch = acc.generate(images=[i for i, _, _ in jobs], videos=[v for _, v, _ in jobs],
                         prompt=[p for *_, p in jobs], max_new_tokens=5)
    assert [b.token_ids for b in batch] == [a.token_ids for a in alone]
    assert [b.stats.visual_tokens_kept for b in batch] == [a.stats.visual_tokens_kept for a in alone]


def test_an_aspect_ratio_other_than_anyres_max_is_refused(ov):
    model, _ = ov
    model.config.vision_aspect_ratio = "anyres"
    try:
        with pytest.raises(UnsupportedModelError, match="vision_aspect_ratio='anyres' is not supported.*anyres_max_9"):
            adapter_for(model)
    finally:
        model.config.vision_aspect_ratio = "anyres_max_4"
