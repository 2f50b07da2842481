"""The mechanisms under the pruners, checked against independent computations."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from conftest import make_image

from vlmfast import FastV, Policy, VLMAccelerator
from vlmfast._compat import cache_of
from vlmfast.adapters import adapter_for

PROMPT = "what is in the image ?"


def tower_permutation(model, inputs) -> torch.Tensor:
    """A Qwen tower's patch order, read off the tower itself (independent of the adapter): what ``patch_embed``
    gives (raster order) matched row by row with what the first block receives. Qwen2-VL: the identity;
    Qwen2.5-VL: window order."""
    visual = model.model.visual
    seen = {}
    h1 = visual.patch_embed.register_forward_hook(lambda m, a, o: seen.__setitem__("raster", o))
    h2 = visual.blocks[0].register_forward_pre_hook(
        lambda m, a, k: seen.__setitem__("tower", a[0] if a else k["hidden_states"]), with_kwargs=True)
    try:
        with torch.inference_mode():
            visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    finally:
        h1.remove()
        h2.remove()
    perm = torch.cdist(seen["tower"].float(), seen["raster"].float()).argmin(1)  # tower row j = raster row perm[j]
    assert torch.equal(perm.sort().values, torch.arange(len(perm)))
    if not hasattr(visual, "pos_embed"):  # exactly the same rows, reordered (Qwen3-VL adds learned positions first)
        assert torch.equal(seen["tower"], seen["raster"][perm])
    return perm


def eager_vision_attention(model, family, inputs, layer):
    """Head-mean attention of one vision layer from transformers' own eager attention function, recorded
    through a registered attention implementation (independent of the adapter's recomputation)."""
    from transformers import AttentionInterface

    adapter = adapter_for(model)
    eager = sys.modules[type(adapter.vision_layers[0]).__module__].eager_attention_forward
    block = adapter.vision_layers[layer]
    llava = family in ("llava", "llava_onevision")
    target = getattr(block, "self_attn" if llava else "attention" if family == "internvl" else "attn")
    seen = []

    def recording(module, q, k, v, attention_mask=None, **kw):
        kw.pop("is_causal", None)
        out, w = eager(module, q, k, v, attention_mask, **kw)
        if module is target:
            seen.extend(w.mean(1).unbind(0))
        return out, w

    AttentionInterface.register("test_recording", recording)
    base = model.config.vision_config._attn_implementation
    model.set_attn_implementation({"vision_config": "test_recording"})
    try:
        with torch.inference_mode():
            if llava:  # OneVision: (images, crops, 3, S, S), one crop per image of a multi-image sample
                model.model.vision_tower(inputs["pixel_values"].flatten(0, -4))
            elif family == "internvl":
                model.model.vision_tower(inputs["pixel_values"])
            else:
                model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    finally:
        model.set_attn_implementation({"vision_config": base})
    return seen


def test_captured_vision_attention_matches_eager(tiny, family):
    if family == "llava_next":  # two views per image, tiles: its own known-answer test against eager
        pytest.skip("tests/model/test_llava_next.py::test_high_resolution_attention_is_each_tiles_own")
    model, processor = tiny
    adapter = adapter_for(model)
    imgs = [make_image(1), make_image(2)]
    inputs = adapter.prepare(processor, [imgs], [PROMPT])
    layer = adapter.resolve_vision_layer(None)  # the layer a pruner scores by default
    with torch.inference_mode():
        toks = adapter.image_tokens(inputs, layer)
    ref = eager_vision_attention(model, family, inputs, layer)
    assert len(ref) == len(toks) == (10 if family == "internvl" else 2)  # InternVL: 2 x 2 tiles + thumbnail each
    llava = family in ("llava", "llava_onevision")  # OneVision: two images in a sample, one untiled view each
    perm = None if llava or family == "internvl" else tower_permutation(model, inputs)
    start = 0
    for t, r in zip(toks, ref):
        if llava and adapter.tower_has_cls:  # CLS row/column split off
            assert torch.allclose(t.attention, r[1:, 1:], atol=1e-5)
            assert torch.allclose(t.cls_attention, r[0, 1:], atol=1e-5)
        elif llava:  # SigLIP: no CLS
            assert torch.allclose(t.attention, r, atol=1e-5) and t.cls_attention is None
        elif family == "internvl":  # each crop's own, CLS split off, the patches of each token (as transformers'
            side = math.isqrt(r.shape[0] - 1)  # pixel_shuffle concatenates them) consecutive, [CLS] summed per token
            grid = torch.arange(side * side, dtype=torch.float64).view(1, side, side, 1)
            order = 1 + model.model.pixel_shuffle(grid).reshape(-1).long()
            assert torch.allclose(t.attention, r[order][:, order], atol=1e-5)
            assert torch.allclose(t.cls_attention, r[0, order].view(-1, 4).sum(1), atol=1e-5)
        else:  # Qwen runs each image as its own chunk, in the tower's patch order; 4 patches per merged token
            n = r.shape[0]
            back = torch.argsort(perm[start:start + n] - start)  # the tower's order -> the image's raster order
            assert torch.allclose(t.attention, r[back][:, back], atol=1e-5)
            assert t.patches_per_token == 4 and t.attention.shape[0] == 4 * t.n_tokens
            start += n


def test_llava_tower_skips_only_layers_nobody_reads(models):
    """The layers after vision_feature_layer (-2) and after the scored layer do not run; features and the
    scored layer's attention are bit-identical to a run of the whole tower."""
    model, processor = models["llava"]
    adapter = adapter_for(model)
    inputs = adapter.prepare(processor, [[make_image(4)]], [PROMPT])
    n = len(adapter.vision_layers)
    ran = []
    hooks = [layer.mlp.register_forward_hook(lambda m, a, o, i=i: ran.append(i))  # runs only if the layer does
             for i, layer in enumerate(adapter.vision_layers)]
    try:
        with torch.inference_mode():
            full = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
            ran.clear()
            (skipped,) = adapter.image_tokens(inputs, None)
            assert ran == list(range(n - 1))  # the last layer's output is never read: it returns its input
            ran.clear()
            (last,) = adapter.image_tokens(inputs, -1)  # a pruner scoring the last layer: it runs
            assert ran == list(range(n))
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(skipped.features, full) and torch.equal(last.features, full)
    assert all("forward" not in vars(layer) for layer in adapter.vision_layers)  # restored after the call
    ref = eager_vision_attention(model, "llava", inputs, n - 1)[0]
    assert torch.allclose(last.attention, ref[1:, 1:], atol=1e-5)


def test_fastv_equals_manual_layer_by_layer_pruning(models):
    """FastV via hooks == running layers 0..K-1 on the full sequence, ranking by eager attention of layer K-1,
    and running layers K.. by hand on the kept tokens with their original positions."""
    model, processor = models["llava"]
    K, keep = 2, 0.25
    acc = VLMAccelerator(model, processor, policy=Policy([FastV(layer=K, keep=keep)]))
    img = make_image(3)
    lm = acc.adapter.language_model
    captured = {}
    h = lm.norm.register_forward_hook(lambda m, a, o: captured.setdefault("final", o.clone()))
    try:
        acc.generate(images=[img], prompt=PROMPT, max_new_tokens=1)
    finally:
        h.remove()

    inputs = acc.adapter.prepare(processor, [[img]], [PROMPT])
    image_mask = acc.adapter.image_token_mask(inputs)[0]
    model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.inference_mode():
            out = model(**inputs, output_hidden_states=True, output_attentions=True)
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
    scores = out.attentions[K - 1][0, :, -1].mean(0)
    img_idx = image_mask.nonzero().squeeze(1)
    n = int(len(img_idx) * keep)
    top = img_idx[scores[img_idx].topk(n).indices]
    kept = torch.cat([(~image_mask).nonzero().squeeze(1), top]).sort().values
    with torch.inference_mode():
        x = out.hidden_states[K][:, kept]
        pos = kept[None]
        cos_sin = lm.rotary_emb(x, pos)
        for layer in lm.layers[K:]:
            x = layer(x, attention_mask=None, position_embeddings=cos_sin, position_ids=pos)
        final = lm.norm(x)
    assert captured["final"].shape == final.shape
    assert torch.allclose(captured["final"], final, atol=1e-4)


def test_fastv_kv_cache_is_shorter_from_layer_k(models):
    model, processor = models["qwen2_vl"]
    acc = VLMAccelerator(model, processor, policy=Policy([FastV(layer=2, keep=0.25)]))
    lengths = []
    orig = model.forward

    def spy(*a, **k):
        out = orig(*a, **k)
        if not lengths:
            lengths.extend(layer.keys.shape[2] for layer in cache_of(out).layers)
        return out

    model.forward = spy
    try:
        out = acc.generate(images=[make_image(4)], prompt=PROMPT, max_new_tokens=2)
    finally:
        del model.forward
    dropped = out.stats.visual_tokens_in - out.stats.visual_tokens_final
    assert dropped > 0
    assert lengths[0] == lengths[1] and all(n == lengths[0] - dropped for n in lengths[2:])
    assert out.stats.layer_avg_visual_tokens == (2 * out.stats.visual_tokens_in + 2 * out.stats.visual_tokens_final) / 4


def test_grey_values_only_when_a_pruner_reads_them(tiny, family, monkeypatch):
    """Known answer: a flat (200, 100, 30) image has grey value 110 under every token; without ``grey=True``
    the adapters skip the work (0.4 s for a 16k-token video). Through generate, VFlowOpt asks for them exactly
    when its entropy weight ``alpha`` is non-zero."""
    import numpy as np
    from PIL import Image

    import vlmfast.pruners.vflowopt as vflowopt_module
    from vlmfast.pruners import VFlowOpt

    model, processor = tiny
    adapter = adapter_for(model)
    flat = Image.fromarray(np.broadcast_to(np.array([200, 100, 30], np.uint8), (112, 112, 3)).copy())
    inputs = adapter.prepare(processor, [[flat]], [PROMPT])
    with torch.inference_mode():
        plain_views, _ = adapter.visual_tokens(inputs, None)
        grey_views, _ = adapter.visual_tokens(inputs, None, grey=True)  # one per view (LLaVA-NeXT: two)
    for plain, grey in zip(plain_views, grey_views, strict=True):
        assert plain.grey is None
        assert grey.grey.shape[0] == grey.n_tokens and grey.grey.shape[1] >= grey.patches_per_token
        assert torch.allclose(grey.grey, torch.full_like(grey.grey, 110.0), atol=1.0)
    calls = []
    real = vflowopt_module.patch_entropy
    monkeypatch.setattr(vflowopt_module, "patch_entropy", lambda g: calls.append(g.shape) or real(g))
    for alpha, want in ((0.0, 0), (0.5, len(grey_views))):  # VFlowOpt scores each view
        calls.clear()
        VLMAccelerator(model, processor, policy=Policy([VFlowOpt(keep=0.5, alpha=alpha)])).generate(
            images=[flat], prompt=PROMPT, max_new_tokens=1)
        assert len(calls) == want, alpha
