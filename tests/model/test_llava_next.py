"""LLaVA-NeXT ("anyres") through transformers' own class: an image is two views (the base crop and the stitched,
unpadded high-resolution grid) plus never-pruned newline tokens after each row of the second. The first step of
the multi-view contract (issue 20); the shared method matrix does not run on this family yet."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_image, reference_generate
from PIL import Image

from vlmfast import DivPrune, FastV, FoPru, GroundingConfig, Policy, VLMAccelerator
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


@pytest.mark.parametrize("size, square", [((60, 40), (2, 24, 8, 32)), ((60, 40), (32, 4, 38, 10)),
                                          ((48, 80), (30, 40, 36, 46))], ids=["left", "right", "bottom"])
def test_the_high_resolution_region_is_where_the_processor_put_the_pixels(nxt, size, square):
    """A white square on black: where the processor's tiles show it (the brightness centroid over the stitched
    canvas) is read back through the unpadded grid and the view's region to the original image's pixels, and lands
    on the square's centre. 60 x 40 px is resized to 43 x 64 and pasted at x = 10 in the 64 x 64 canvas, while the
    model's unpadding keeps token columns 3..12 (canvas x 12..52): the grid covers x 0.047..0.977 of the image, so
    reading it as the whole image would be 1.6 px off at the left."""
    model, processor = nxt
    adapter = adapter_for(model)
    (h, w), (x0, y0, x1, y1) = size, square
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[y0:y1, x0:x1] = 255
    inputs = adapter.prepare(processor, [[Image.fromarray(pixels)]], [PROMPT])
    npw, rows, cols, index = adapter.layout(inputs["image_sizes"][0].tolist())
    tiles = inputs["pixel_values"][0][1:adapter._n_crops(size)]  # the base crop first, then the tiles
    nph, s = len(tiles) // npw, 32
    canvas = tiles.view(nph, npw, 3, s, s).permute(2, 0, 3, 1, 4).reshape(3, nph * s, npw * s).mean(0)
    bright = (canvas - canvas.min()) / (canvas.max() - canvas.min())
    bright = torch.where(bright > 0.05, bright, 0.0)
    ys, xs = torch.meshgrid(torch.arange(nph * s) + 0.5, torch.arange(npw * s) + 0.5, indexing="ij")
    cx, cy = float((bright * xs).sum() / bright.sum()), float((bright * ys).sum() / bright.sum())
    r0, c0 = divmod(int(index[0]), npw * 8)  # the grid's first token in the padded token grid (4 canvas px each)
    tx, ty = (cx / 4 - c0) / cols, (cy / 4 - r0) / rows  # the centroid as a fraction of the unpadded grid
    (_, hires), _ = adapter.visual_tokens(inputs, None)
    f0, g0, f1, g1 = hires.region
    assert (w * (f0 + tx * (f1 - f0)), h * (g0 + ty * (g1 - g0))) == pytest.approx(((x0 + x1) / 2, (y0 + y1) / 2),
                                                                                 abs=0.1)


BOX = (30, 6, 50, 18)  # x0, y0, x1, y1 in the 80 x 48 px image: under the two upper tiles, across their seam (x = 40)


class _Planted:
    """An attention capture whose every asked-for query row attends to the given sequence positions only."""

    def __init__(self, n_layers: int, row: torch.Tensor):
        self.n_layers, self.row, self.phi = n_layers, row, {}

    def row_attention(self, b, positions, layers):
        return self.row.expand(len(layers), len(positions), -1).clone()


#: per planted view set, the map's centre of mass (x, y) in pixels: the base cells' centre (40, 12); the high-resolution
#: rows 1..3 of 48 * 40/39 / 10 = 4.92 px each (its region reaches 40/39 of the height): y = 2.5 * 4.92 = 12.31; both:
#: the mean weighted by the planted tokens, 4 base and 12 high-resolution ones
CENTRES = {("base",): (40.0, 12.0), ("hires",): (40.0, 12.31), ("base", "hires"): (40.0, 0.25 * 12.0 + 0.75 * 12.31)}


@pytest.mark.parametrize("views", list(CENTRES))
def test_grounding_a_planted_map_over_two_tiles_lands_on_the_original_pixels(nxt, views):
    """Attention planted on the tokens over BOX (base view: its 2 x 2 cells of 10 x 6 px exactly; high-resolution
    view: the 3 x 4 tokens whose centres lie in it, half in each upper tile) becomes a map in the original image's
    pixels centred where those tokens are, strong over BOX on both sides of the tiles' seam; the positive point
    lands in BOX and SAM's mask covers the red rectangle drawn there."""
    from vlmfast.grounding.pipeline import ground_sample, phrase_maps

    pixels = np.full((48, 80, 3), 230, np.uint8)
    x0, y0, x1, y1 = BOX
    pixels[y0:y1, x0:x1] = (220, 30, 30)
    cfg = GroundingConfig(prompt_rows="phrase", remove_sinks=False)
    acc = VLMAccelerator(*nxt, policy=Policy(grounding=cfg))
    acc.generate(images=[Image.fromarray(pixels)], prompt="where is the red square ?", max_new_tokens=1, ground=True,
                 ground_phrases=["red square"])
    reqs, ctx = acc.grounder.last_request.samples[0]  # the request's real views, kept tokens and regions
    tokens = {"base": [r * 8 + c for r in (1, 2) for c in (3, 4)],
              "hires": [64 + r * 16 + c for r in (1, 2, 3) for c in range(6, 10)]}
    cols = (ctx.image_mask[0] & ctx.valid[0]).nonzero().flatten()  # the image's 64 + 160 tokens in the sequence
    row = torch.zeros(ctx.valid.shape[1])
    for name in views:
        row[cols[tokens[name]]] = 1.0
    planted = _Planted(acc.adapter.info().num_layers, row)
    ((i, heat),) = phrase_maps(planted, cfg, reqs[:1], ctx)
    assert i == 0 and heat.shape == (48, 80) and float(heat.max()) == pytest.approx(1.0)
    ys, xs = torch.meshgrid(torch.arange(48) + 0.5, torch.arange(80) + 0.5, indexing="ij")
    centre = (float((heat * xs).sum() / heat.sum()), float((heat * ys).sum() / heat.sum()))
    assert centre == pytest.approx(CENTRES[views], abs=0.1)
    (top, left), (bottom, right) = (heat >= 0.5).nonzero().min(0).values, (heat >= 0.5).nonzero().max(0).values
    assert x0 - 2 <= left and right < x1 + 2 and y0 - 2 <= top and bottom < y1 + 2  # within BOX, up to 2 px
    assert float(heat[:, x0:40].max()) > 0.5 and float(heat[:, 40:x1].max()) > 0.5  # on both sides of the seam
    (g,) = ground_sample(planted, cfg, reqs[:1], ctx, acc.grounder.predictor, acc.grounder.embeddings)
    (px, py), label = g.points[0], g.point_labels[0]
    assert label == 1 and x0 <= px < x1 and y0 <= py < y1
    truth = np.zeros((48, 80), bool)
    truth[y0:y1, x0:x1] = True
    # tiny-sam-shapes covers the rectangle, and spills over the few rows above it to the image's edge
    assert g.mask.shape == (48, 80) and (g.mask & truth).sum() >= 0.9 * truth.sum()
    assert (g.mask & truth).sum() >= 0.6 * g.mask.sum()
