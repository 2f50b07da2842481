"""downsample on the tiny families: the features are the tower's own output on the resized image, placed at a
regular sub-grid of the original placeholders; families it cannot serve are refused by name."""

from __future__ import annotations

import pytest
import torch
from conftest import make_image

from vlmfast import Downsample, Policy, PolicyError, VLMAccelerator
from vlmfast.adapters.base import resize_pixels
from vlmfast.adapters.qwen2_vl import unpatchify
from vlmfast.pruners import n_keep
from vlmfast.pruners.downsample import cell_centres, sub_grid
from vlmfast.request import encode

REFUSED = {"qwen3_vl": "DeepStack", "llava_next": "anyres", "llava_onevision": "anyres", "internvl": "thumbnail"}


def reference(family, model, processor, inputs, grid):
    """The tower's output on the resized image, computed with transformers' own pieces: LLaVA's CLIP tower (position
    embeddings interpolated), feature layer and projector; Qwen's own image processor (patchify only) on the resized
    image, then the tower and merger."""
    if family == "llava":
        patch = model.config.vision_config.patch_size
        pixels = resize_pixels(inputs["pixel_values"][:1], (grid[0] * patch, grid[1] * patch))
        hidden = model.model.vision_tower(pixels, output_hidden_states=True, interpolate_pos_encoding=True)
        return model.model.multi_modal_projector(hidden.hidden_states[model.config.vision_feature_layer][0, 1:])
    vc = model.config.vision_config
    p, m = vc.patch_size, vc.spatial_merge_size
    _, gh, gw = inputs["image_grid_thw"][0].tolist()
    image = unpatchify(inputs["pixel_values"][: gh * gw], gh, gw, p, m, vc.temporal_patch_size)
    small = resize_pixels(image, (grid[0] * m * p, grid[1] * m * p))
    ref = processor.image_processor(images=[small], do_resize=False, do_rescale=False, do_normalize=False,
                                    return_tensors="pt")
    return model.model.get_image_features(ref["pixel_values"], ref["image_grid_thw"]).pooler_output[0]


def test_features_are_the_towers_output_on_the_resized_image(tiny, family):
    model, processor = tiny
    if family in REFUSED:
        with pytest.raises(PolicyError, match=f"downsample cannot run on this {family} model: .*{REFUSED[family]}"):
            VLMAccelerator(model, processor, policy=Policy([Downsample(keep=0.25)]))
        return
    acc = VLMAccelerator(model, processor, policy=None)
    with torch.inference_mode():
        enc = encode(acc.adapter, processor, [[make_image(31, size=112, width=168)]], ["what is it ?"], resample=True)
        image = enc.visual[0]
        _, h, w = image.grid
        assert torch.equal(image.resample((h, w)), image.features)  # the own grid: the tower's own features
        grid = sub_grid(h, w, n_keep(image.n_tokens, 0.25))
        assert grid[0] < h
        assert torch.allclose(image.resample(grid), reference(family, model, processor, enc.inputs, grid), atol=1e-5)


def test_generate_keeps_the_sub_grid_with_the_resized_features(tiny, family):
    if family in REFUSED:
        pytest.skip(f"downsample refuses {family} (test above)")
    model, processor = tiny
    acc = VLMAccelerator(model, processor, policy=Policy([Downsample(keep=0.25)]))
    out = acc.generate(images=[make_image(32)], prompt="what is in the image ?", max_new_tokens=2)
    n = out.stats.visual_tokens_in
    side = int(n ** 0.5)
    rows, cols = sub_grid(side, side, n_keep(n, 0.25))
    assert out.kept[0].tolist() == cell_centres(side, side, rows, cols).tolist()
    assert out.stats.visual_tokens_kept == rows * cols
