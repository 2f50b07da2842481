"""InternVL (InternVL3 "-hf") through transformers' own class: an image is its tiles plus a thumbnail (one view
each, no separators), each crop's 8 x 8 patches pixel-shuffled into 4 x 4 tokens (issue 20, part 3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_image, reference_generate

from vlmfast import DivPrune, FastV, FoPru, InputError, Policy, VLMAccelerator
from vlmfast.adapters import adapter_for
from vlmfast.budget import n_keep, split_budget
from vlmfast.zoo.tiny import tiny_internvl

PROMPT = "what is in the image ?"
WIDE = (32, 96)  # H, W: 3 x 1 tiles of 32 px and the thumbnail, 16 tokens each


@pytest.fixture(scope="module")
def ivl():
    return tiny_internvl()


def _acc(ivl, *methods):
    return VLMAccelerator(*ivl, policy=Policy(list(methods)) if methods else None)


def _wide(seed: int):
    return make_image(seed, size=WIDE[0], width=WIDE[1])


def test_views_are_transformers_own_packing(ivl):
    """Tiles in raster order, then the thumbnail: each one view of the model's own features, with the part of the
    image it covers; the processor's own crop count; ``<img>`` / ``</img>`` are text, not visual tokens."""
    model, processor = ivl
    adapter = adapter_for(model)
    img = _wide(0)
    inputs = adapter.prepare(processor, [[img]], [PROMPT])
    views, _ = adapter.visual_tokens(inputs, None)
    with torch.inference_mode():
        packed = model.model.get_image_features(inputs["pixel_values"]).pooler_output  # (crops, 16, d)
    crops = processor.image_processor(images=[img], crop_to_patches=True, return_tensors="pt")["num_patches"]
    assert int(crops[0]) == len(views) == packed.shape[0] == 4
    assert [v.view for v in views] == [0, 1, 2, 3] and all(v.grid == (1, 4, 4) for v in views)
    assert all(v.patches_per_token == 4 and v.fixed is None for v in views)
    for v, f in zip(views, packed):
        assert torch.equal(v.features, f)
    assert [v.region for v in views] == [(0.0, 0.0, 1 / 3, 1.0), (1 / 3, 0.0, 2 / 3, 1.0), (2 / 3, 0.0, 1.0, 1.0),
                                         (0.0, 0.0, 1.0, 1.0)]
    ids = inputs["input_ids"][0]
    image = adapter.image_token_mask(inputs)[0]
    assert int(image.sum()) == 64 and adapter.fixed_token_mask(inputs) is None
    tok = processor.tokenizer
    start, end = int((ids == tok.start_image_token_id).nonzero()), int((ids == tok.end_image_token_id).nonzero())
    assert image.nonzero().flatten().tolist() == list(range(start + 1, end))


@pytest.mark.parametrize("images, views", [([], 0), ([(1, *WIDE)], 4), ([(0, 112, 112), (1, *WIDE)], 9),
                                           ([(1, 40, 40)], 1)], ids=["text", "wide", "two", "one-tile"])
def test_identity_with_model_generate(ivl, images, views):
    """0, 1 (3 x 1 tiles + thumbnail) and 2 images (2 x 2 tiles + thumbnail, then 3 x 1 + thumbnail); a square
    image of about one tile's size is one tile and no thumbnail."""
    model, processor = ivl
    imgs = [make_image(seed, size=h, width=w) for seed, h, w in images]
    out = _acc(ivl).generate(images=imgs or None, prompt=PROMPT, max_new_tokens=6)
    assert out.token_ids == reference_generate(model, processor, imgs, PROMPT, 6)
    assert len(out.kept) == views  # one view per crop


def test_a_multi_view_image_at_100_percent_equals_no_pruning(ivl):
    img = [_wide(8)]  # FoPru at 10% changes this image's answer
    plain = _acc(ivl).generate(images=img, prompt=PROMPT, max_new_tokens=6).token_ids
    for p in (FoPru(keep=1.0), DivPrune(keep=1.0), FastV(layer=1, keep=1.0)):
        assert _acc(ivl, p).generate(images=img, prompt=PROMPT, max_new_tokens=6).token_ids == plain


@pytest.mark.parametrize("keep", [0.5, 0.25, 0.1])
@pytest.mark.parametrize("pruner", [FoPru, DivPrune])
def test_the_budget_is_the_images_not_each_views(ivl, pruner, keep):
    out = _acc(ivl, pruner(keep=keep)).generate(images=[_wide(4)], prompt=PROMPT, max_new_tokens=2)
    assert out.stats.visual_tokens_in == 64
    assert out.stats.visual_tokens_kept == n_keep(64, keep)
    assert [k.numel() for k in out.kept] == split_budget([16] * 4, keep)


def test_captured_attention_is_each_crops_eager_attention_through_the_pixel_shuffle(ivl):
    """Each view's attention (and [CLS] row) is its crop's, from transformers' eager tower attention, with token
    (i, j)'s patches (2i, 2j), (2i, 2j + 1), (2i + 1, 2j), (2i + 1, 2j + 1) consecutive: the patches transformers'
    ``pixel_shuffle`` concatenates into that token's features."""
    model, processor = ivl
    adapter = adapter_for(model)
    inputs = adapter.prepare(processor, [[_wide(5)]], [PROMPT])
    layer = adapter.resolve_vision_layer(None)
    assert layer == len(adapter.vision_layers) - 1  # vision_feature_layer -1: the last layer feeds the LLM
    views, _ = adapter.visual_tokens(inputs, layer)
    order = torch.tensor([(2 * i + di) * 8 + 2 * j + dj for i in range(4) for j in range(4)
                          for di in (0, 1) for dj in (0, 1)])
    tower = model.model.vision_tower
    impl = tower.config._attn_implementation
    tower.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = tower(inputs["pixel_values"], output_attentions=True)
    finally:
        tower.set_attn_implementation(impl)
    hidden = out.last_hidden_state[:, 1:]  # (crops, 64, C): the patches, [CLS] dropped
    shuffled = model.model.pixel_shuffle(hidden.reshape(4, 8, 8, -1)).reshape(4, 16, -1)
    torch.testing.assert_close(shuffled, hidden[:, order].reshape(4, 16, -1), atol=0, rtol=0)
    eager = out.attentions[layer].float().mean(1)  # (crops, 65, 65)
    assert [v.attention.shape for v in views] == [(64, 64)] * 4
    for v, a in zip(views, eager):
        torch.testing.assert_close(v.attention, a[1 + order[:, None], 1 + order[None, :]], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(v.cls_attention, a[0, 1 + order].view(16, 4).sum(1), atol=1e-5, rtol=1e-4)


def test_grey_values_are_the_pixels_under_each_tokens_patches(ivl):
    """A token's grey values are the 8 x 8 px block of its 2 x 2 patches (a left / right split image: the tokens of
    the left half of a tile read the left colour only)."""
    model, processor = ivl
    adapter = adapter_for(model)
    arr = np.zeros((32, 32, 3), np.uint8)
    arr[:, 16:] = 255
    from PIL import Image

    inputs = adapter.prepare(processor, [[Image.fromarray(arr)]], [PROMPT])
    (view,), _ = adapter.visual_tokens(inputs, None, grey=True)  # a square 32 px image: one tile, no thumbnail
    assert view.grey.shape == (16, 64)
    cols = torch.arange(16) % 4  # token column of 4
    assert torch.allclose(view.grey[cols < 2], torch.zeros(8, 64), atol=1.0)
    assert torch.allclose(view.grey[cols >= 2], torch.full((8, 64), 255.0), atol=1.0)


@pytest.mark.parametrize("methods", [(), (FoPru(keep=0.25),), (FastV(layer=1, keep=0.5),)])
def test_batch_with_left_padding_equals_alone(ivl, methods):
    acc = _acc(ivl, *methods)
    jobs = [([_wide(7)], "what is it ?"), ([make_image(8, size=32), make_image(9, size=60, width=40)], PROMPT),
            ([], "how many objects are there ?")]
    alone = [acc.generate(images=i, prompt=p, max_new_tokens=5) for i, p in jobs]
    batch = acc.generate(images=[i for i, _ in jobs], prompt=[p for _, p in jobs], max_new_tokens=5)
    assert [b.token_ids for b in batch] == [a.token_ids for a in alone]
    assert [b.stats.visual_tokens_kept for b in batch] == [a.stats.visual_tokens_kept for a in alone]


def test_videos_are_refused_by_name(ivl):
    with pytest.raises(InputError, match=r"vlmfast does not take InternVL's videos yet"):
        _acc(ivl).generate(videos=[np.zeros((4, 32, 32, 3), np.uint8)], prompt=PROMPT)


def test_a_tiles_attention_lands_on_its_part_of_the_image(ivl):
    """Grounding spreads each view's attention over the pixels its region covers: attention on the third tile only
    lights the right third of a 32 x 96 image; on the thumbnail only, the whole image, evenly."""
    from vlmfast.grounding.pipeline import SampleContext, _view_density

    model, processor = ivl
    adapter = adapter_for(model)
    img = _wide(6)
    inputs = adapter.prepare(processor, [[img]], [PROMPT])
    views, _ = adapter.visual_tokens(inputs, None)
    ctx = SampleContext(b=0, image_mask=adapter.image_token_mask(inputs)[0], valid=inputs["attention_mask"][0].bool(),
                        images=views, kept=[torch.arange(16)] * 4, pil_images=[img],
                        regions=[adapter.grid_region(processor, img.size)], source=[0] * 4)
    cells = torch.arange(16)
    third = _view_density(ctx, 2, 0, torch.ones(16), cells)
    assert third.shape == (32, 96) and bool((third[:, :64] == 0).all())
    torch.testing.assert_close(third[:, 64:], torch.full((32, 32), 16 / (32 * 32)), atol=1e-6, rtol=1e-4)
    thumb = _view_density(ctx, 3, 0, torch.ones(16), cells)
    torch.testing.assert_close(thumb, torch.full((32, 96), 16 / (32 * 96)), atol=1e-6, rtol=1e-4)
