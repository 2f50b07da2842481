"""LLaVA-NeXT ("anyres") through transformers' own class: an image is two views (the base crop and the stitched,
unpadded high-resolution grid) plus never-pruned newline tokens after each row of the second. The first step of
the multi-view contract (issue 20); the shared method matrix does not run on this family yet."""

from __future__ import annotations

import pytest
import torch
from conftest import make_image, reference_generate

from vlmfast import DivPrune, FastV, FoPru, Policy, VLMAccelerator
from vlmfast.adapters import adapter_for
from vlmfast.budget import n_keep, split_budget
from vlmfast.zoo.tiny import tiny_llava_next

PROMPT = "what is in the image ?"
WIDE = (48, 80)  # H, W: best pinpoint 2 x 2 crops of 32 px, unpadded to 10 rows of 16 tokens


@pytest.fixture(scope="module")
def nxt():
    return tiny_llava_next()


def _acc(nxt, *methods):
    return VLMAccelerator(*nxt, policy=Policy(list(methods)) if methods else None)


def test_views_and_newlines_are_transformers_own_packing(nxt):
    model, processor = nxt
    adapter = adapter_for(model)
    img = make_image(0, size=WIDE[0], width=WIDE[1])
    inputs = adapter.prepare(processor, [[img]], [PROMPT])
    (base, hires), _ = adapter.visual_tokens(inputs, None)
    with torch.inference_mode():
        packed = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output[0]
    assert (base.view, base.grid, hires.view, hires.grid) == (0, (1, 8, 8), 1, (1, 10, 16))
    rows = packed[64:].view(10, 17, -1)
    assert torch.equal(base.features, packed[:64]) and torch.equal(hires.features, rows[:, :16].reshape(160, -1))
    assert torch.equal(hires.fixed, rows[:, 16]) and torch.equal(hires.fixed[0], model.model.image_newline)
    image = inputs["input_ids"][0] == model.config.image_token_id
    fixed = adapter.fixed_token_mask(inputs)[0]
    assert int(image.sum()) == 234 and int(fixed.sum()) == 10
    assert not bool((adapter.image_token_mask(inputs)[0] & fixed).any())
    offsets = (image.cumsum(0) - 1)[fixed]  # each newline's place in the image's run: after each row of 16
    assert offsets.tolist() == [64 + 17 * r + 16 for r in range(10)]


@pytest.mark.parametrize("shapes", [[], [WIDE], [(32, 32), (60, 40)]], ids=["text", "wide", "two"])
def test_identity_with_model_generate(nxt, shapes):
    model, processor = nxt
    imgs = [make_image(i, size=h, width=w) for i, (h, w) in enumerate(shapes)]
    out = _acc(nxt).generate(images=imgs or None, prompt=PROMPT, max_new_tokens=6)
    assert out.token_ids == reference_generate(model, processor, imgs, PROMPT, 6)
    assert len(out.kept) == 2 * len(imgs)  # two views per image


def test_a_multi_view_image_at_100_percent_equals_no_pruning(nxt):
    img = [make_image(3, size=WIDE[0], width=WIDE[1])]
    plain = _acc(nxt).generate(images=img, prompt=PROMPT, max_new_tokens=6).token_ids
    for p in (FoPru(keep=1.0), DivPrune(keep=1.0), FastV(layer=1, keep=1.0)):
        assert _acc(nxt, p).generate(images=img, prompt=PROMPT, max_new_tokens=6).token_ids == plain


@pytest.mark.parametrize("keep", [0.5, 0.25, 0.1])
@pytest.mark.parametrize("pruner", [FoPru, DivPrune])
def test_the_budget_is_the_images_not_each_views(nxt, pruner, keep):
    out = _acc(nxt, pruner(keep=keep)).generate(images=[make_image(4, size=WIDE[0], width=WIDE[1])], prompt=PROMPT,
                                                max_new_tokens=2)
    assert out.stats.visual_tokens_in == 224  # 64 + 160: the newlines are not prunable visual tokens
    assert out.stats.visual_tokens_kept == n_keep(224, keep)
    assert [k.numel() for k in out.kept] == split_budget([64, 160], keep)


@pytest.mark.parametrize("keep, favoured", [(0.25, [28, 28]), (0.1, [11, 11]), (0.75, [64, 104])])
@pytest.mark.parametrize("pruner", [FoPru, DivPrune])
def test_view_budget_base_gives_the_base_view_half_of_the_images_budget(nxt, pruner, keep, favoured):
    """64 + 160 tokens: at 25% the image keeps 56, the base view 28 of them (16 when proportional); at 75% (168) the
    base view's half (84) is more than it has, so it keeps all 64 and the high-resolution view the other 104."""
    img = [make_image(4, size=WIDE[0], width=WIDE[1])]
    out = _acc(nxt, pruner(keep=keep, view_budget="base")).generate(images=img, prompt=PROMPT, max_new_tokens=2)
    assert [k.numel() for k in out.kept] == favoured
    assert out.stats.visual_tokens_kept == n_keep(224, keep) == sum(favoured)


def test_split_budget_is_proportional_and_exact():
    assert split_budget([64, 160], 0.1) == [6, 16] and sum(split_budget([64, 160], 0.1)) == n_keep(224, 0.1)
    assert split_budget([576, 2304], 0.25) == [144, 576]
    assert split_budget([1, 1000], 0.01) == [1, 9]  # every view keeps at least one token


def test_high_resolution_attention_is_each_tiles_own(nxt):
    """The base view's attention is the base crop's; the stitched view's is the attention within each tile (zero
    across tiles), read from transformers' eager tower attention of each crop and the unpadding map."""
    model, processor = nxt
    adapter = adapter_for(model)
    inputs = adapter.prepare(processor, [[make_image(5, size=WIDE[0], width=WIDE[1])]], [PROMPT])
    layer = adapter.resolve_vision_layer(None)
    (base, hires), _ = adapter.visual_tokens(inputs, layer)
    tower = model.model.vision_tower
    impl = tower.config._attn_implementation
    tower.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            crops = inputs["pixel_values"][0]
            eager = tower(crops, output_attentions=True).attentions[layer].float().mean(1)  # (5, 65, 65)
    finally:
        tower.set_attn_implementation(impl)
    torch.testing.assert_close(base.attention, eager[0, 1:, 1:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(base.cls_attention, eager[0, 0, 1:], atol=1e-5, rtol=1e-4)
    npw, rows, cols, index = adapter.layout(inputs["image_sizes"][0].tolist())
    r, c = index // (npw * 8), index % (npw * 8)
    tile, patch = (r // 8) * npw + c // 8, (r % 8) * 8 + c % 8
    same = tile[:, None] == tile[None, :]
    expected = eager[1 + tile[:, None], 1 + patch[:, None], 1 + patch[None, :]] * same
    torch.testing.assert_close(hires.attention, expected, atol=1e-5, rtol=1e-4)
    assert bool((hires.attention[~same] == 0).all()) and int(tile.unique().numel()) == 4


@pytest.mark.parametrize("methods", [(), (FoPru(keep=0.25),), (FastV(layer=1, keep=0.5),)])
def test_batch_with_left_padding_equals_alone(nxt, methods):
    acc = _acc(nxt, *methods)
    jobs = [([make_image(7, size=WIDE[0], width=WIDE[1])], "what is it ?"),
            ([make_image(8, size=32), make_image(9, size=60, width=40)], PROMPT), ([], "how many objects are there ?")]
    alone = [acc.generate(images=i, prompt=p, max_new_tokens=5) for i, p in jobs]
    batch = acc.generate(images=[i for i, _ in jobs], prompt=[p for _, p in jobs], max_new_tokens=5)
    assert [b.token_ids for b in batch] == [a.token_ids for a in alone]
    assert [b.stats.visual_tokens_kept for b in batch] == [a.stats.visual_tokens_kept for a in alone]
