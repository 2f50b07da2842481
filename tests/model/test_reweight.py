"""VAR, DAMRO and AGLA: known answers on hand-made inputs, the decode branches (own caches, never aliased),
identities (the method switched off equals no method), batches equal their samples alone, clear policy errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_image
from PIL import Image

from vlmfast import AGLA, DAMRO, VAR, FastV, FoPru, Policy, PolicyError, VLMAccelerator
from vlmfast.adapters.base import ImageTokens
from vlmfast.attention import AttentionSession
from vlmfast.pruners import ZipVL
from vlmfast.reweight import agla as agla_mod
from vlmfast.reweight.agla import augment, keep_fraction, keep_mask, prompt_query, saliency
from vlmfast.reweight.base import combine
from vlmfast.reweight.damro import select_outliers
from vlmfast.reweight.var import phi, redistribute, sink_dims_from_magnitudes

PROMPT = "what is in the image ?"


# --------------------------------------------------------------------------- VAR: the redistribution itself


def _hand_made():
    """Keys: [BOS (text sink), v1 (visual sink), v2, v3 (visual), t (text)]; four query rows."""
    attn = torch.tensor([[0.20, 0.30, 0.10, 0.30, 0.10],   # image-centric: moved
                         [0.10, 0.60, 0.10, 0.10, 0.10],   # non-sink visual share 0.25 < rho: untouched
                         [0.85, 0.05, 0.02, 0.03, 0.05],   # visual attention 0.10 < 0.2: untouched
                         [0.20, 0.30, 0.10, 0.30, 0.10]])  # not a row VAR may change: untouched
    visual = torch.tensor([[False, True, True, True, False]])
    vsink = torch.tensor([[False, True, False, False, False]])
    tsink = torch.tensor([[True, False, False, False, False]])
    rows = torch.tensor([[True, True, True, False]])
    return attn[None, None], visual, vsink, tsink, rows


def test_var_redistribution_known_answer():
    attn, visual, vsink, tsink, rows = _hand_made()
    new, chosen = redistribute(attn, visual, vsink, tsink, rows, p=0.6, rho=0.5, min_visual=0.2)
    # sinks keep 60%: 0.2 -> 0.12, 0.3 -> 0.18; the 0.2 moved goes to v2, v3 in proportion 0.1 : 0.3
    expected = torch.tensor([0.12, 0.18, 0.10 + 0.2 * 0.25, 0.30 + 0.2 * 0.75, 0.10])
    torch.testing.assert_close(new[0, 0, 0], expected)
    torch.testing.assert_close(new[0, 0, 1:], attn[0, 0, 1:])
    assert chosen[0, 0].tolist() == [True, False, False, False]
    torch.testing.assert_close(new.sum(-1), torch.ones(1, 1, 4))


def test_var_rows_sum_to_one_and_move_exactly_the_sink_share():
    g = torch.Generator().manual_seed(0)
    attn = torch.rand(2, 3, 6, 12, generator=g).softmax(-1)
    visual = torch.zeros(2, 12, dtype=torch.bool)
    visual[:, 2:10] = True
    vsink = torch.zeros_like(visual)
    vsink[:, [3, 7]] = True
    tsink = torch.zeros_like(visual)
    tsink[:, 0] = True
    rows = torch.ones(2, 6, dtype=torch.bool)
    new, chosen = redistribute(attn, visual, vsink, tsink, rows, p=0.6, rho=0.0, min_visual=0.0)
    assert bool(chosen.all())
    torch.testing.assert_close(new.sum(-1), torch.ones(2, 3, 6))
    sinks = (vsink | tsink)[:, None, None, :]
    moved = (attn * sinks).sum(-1) - (new * sinks).sum(-1)
    torch.testing.assert_close(moved, 0.4 * (attn * sinks).sum(-1))
    gained = ((new - attn) * (visual & ~vsink)[:, None, None, :]).sum(-1)
    torch.testing.assert_close(gained, moved)
    assert bool(((new - attn) * ~visual[:, None, None, :] * ~sinks).abs().max() == 0)  # other text untouched


def test_var_p_one_changes_nothing():
    attn, visual, vsink, tsink, rows = _hand_made()
    new, _ = redistribute(attn, visual, vsink, tsink, rows, p=1.0, rho=0.5, min_visual=0.2)
    torch.testing.assert_close(new, attn)


def test_sink_dimension_discovery_and_phi():
    m = torch.ones(64) + 0.01 * torch.arange(64) / 64
    assert sink_dims_from_magnitudes(m, z=10, max_dims=3) == []
    m[7], m[30] = 50.0, 40.0
    assert sink_dims_from_magnitudes(m, z=5, max_dims=3) == [7, 30]
    assert sink_dims_from_magnitudes(m, z=5, max_dims=1) == [7]
    x = torch.zeros(2, 16)
    x[0, 3] = 4.0  # one-hot: RMSNorm gives sqrt(16) = 4 at dim 3
    x[1] = 1.0     # flat: every dim is 1
    torch.testing.assert_close(phi(x, [3]), torch.tensor([4.0, 1.0]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(phi(x, []), torch.zeros(2))


# --------------------------------------------------------------------------- VAR in the model


def _acc(tiny, *methods):
    model, processor = tiny
    return VLMAccelerator(model, processor, policy=Policy(list(methods)))


LOW = dict(tau=1.0, dim_z=1.0, first_layer=0, skip_last=0)  # on random weights: many sinks, VAR acts everywhere


def test_var_without_sinks_is_the_identity(tiny):
    img = make_image(5)
    base = _acc(tiny).generate(images=[img], prompt=PROMPT, max_new_tokens=8)
    out = _acc(tiny, VAR(tau=1e6, first_layer=0, skip_last=0)).generate(images=[img], prompt=PROMPT, max_new_tokens=8)
    assert out.token_ids == base.token_ids
    rep = [s for s in out.stats.stages if s["method"] == "var"][0]
    assert rep["rows_changed_share"] == 0.0 and sum(rep["visual_sinks_per_layer"]) == 0


def test_var_acts_and_keeps_row_sums_in_the_model(tiny, monkeypatch):
    import vlmfast.reweight.var as var_mod

    seen = []
    original = var_mod._redistribute_

    def spy(a, *args, **kw):
        chosen = original(a, *args, **kw)  # in place on the layer's explicit weights
        seen.append((a.shape, float((a.sum(-1) - 1).abs().max()), int(chosen.sum())))
        return chosen

    monkeypatch.setattr(var_mod, "_redistribute_", spy)
    img = make_image(6)
    cont = " the image"
    base = _acc(tiny).loglikelihood(images=[img], prompt=PROMPT, continuation=cont)
    same = _acc(tiny, VAR(p=1.0, **LOW)).loglikelihood(images=[img], prompt=PROMPT, continuation=cont)
    moved = _acc(tiny, VAR(p=0.0, rho=0.0, min_visual=0.0, **LOW)).loglikelihood(images=[img], prompt=PROMPT,
                                                                                 continuation=cont)
    assert seen and all(err < 1e-5 for _, err, _ in seen)
    assert sum(n for *_, n in seen) > 0
    assert same[0] == pytest.approx(base[0], abs=1e-3)  # p = 1 keeps every weight (eager vs SDPA rounding only)
    assert abs(moved[0] - base[0]) > 1e-3  # all sink attention moved: the likelihood changes


def test_var_batch_equals_alone_and_composes_with_fopru(tiny, family):
    # tau 1.5, not LOW's 1.0: on LLaVA-NeXT's random weights 57-97% of the visual tokens pass phi > 1 in every layer,
    # already at the input of layer 0, where phi reads each token's own embedding (the newline tokens play no part),
    # so no head-row keeps the visual non-sink share rho = 0.5 needs and VAR changes nothing; at 1.5 it acts in
    # every family (docs/methods/var.md)
    acc = _acc(tiny, FoPru(keep=0.5), VAR(**{**LOW, "tau": 1.5}))
    imgs = [make_image(7), make_image(8, size=96)]
    prompts = [PROMPT, "is there a red circle ?"]
    outs = acc.generate(images=[[im] for im in imgs], prompt=prompts, max_new_tokens=6)
    for im, p, o in zip(imgs, prompts, outs):
        assert acc.generate(images=[im], prompt=p, max_new_tokens=6).token_ids == o.token_ids
    var = [s for s in outs[0].stats.stages if s["method"] == "var"]
    assert var and var[0]["rows_changed_share"] > 0


# --------------------------------------------------------------------------- DAMRO


def test_damro_outlier_selection_known_answers():
    cls = torch.tensor([0.10, 0.50, 0.05, 0.30, 0.05])
    im = ImageTokens(features=torch.randn(5, 4), grid=(1, 1, 5), cls_attention=cls)
    assert select_outliers(im, 2).tolist() == [1, 3]
    assert select_outliers(im, 9).tolist() == [0, 1, 2, 3, 4]
    # no [CLS] (Qwen2-VL): attention received, 4 patches per LLM token; patches 4..7 receive the most
    att = torch.full((8, 8), 0.05)
    att[:, 5] = 0.6
    im_q = ImageTokens(features=torch.randn(2, 4), grid=(1, 1, 2), attention=att, patches_per_token=4)
    assert select_outliers(im_q, 1).tolist() == [1]
    feats = torch.ones(3, 4)
    feats[0] *= 10
    assert select_outliers(ImageTokens(features=feats, grid=(1, 1, 3)), 1, "norm").tolist() == [0]
    with pytest.raises(RuntimeError, match="no \\[CLS\\]|has none"):
        select_outliers(im_q, 1, "cls")


def test_combine_contrastive_and_assembled_known_answers():
    main = torch.tensor([[2.0, 1.0, 0.0]])
    branch = torch.tensor([[0.0, 3.0, 0.0]])
    # DAMRO, alpha = 1: 2 z - z_o = [4, -1, 0]; cutoff log 0.5 + 2 = 1.31 drops tokens 1 and 2
    z = combine(main, [(-1.0, branch)], main_weight=2.0, beta=0.5)
    assert z[0, 0] == 4.0 and torch.isinf(z[0, 1:]).all()
    # AGLA, alpha = 2: z + 2 z_aug = [2, 7, 0]; beta 0.1: cutoff -0.30 keeps every token
    torch.testing.assert_close(combine(main, [(2.0, branch)], beta=0.1), torch.tensor([[2.0, 7.0, 0.0]]))
    g = torch.Generator().manual_seed(1)
    for _ in range(20):  # the cutoff never removes the main branch's argmax
        m, b = torch.randn(4, 50, generator=g), torch.randn(4, 50, generator=g)
        z = combine(m, [(-3.0, b)], main_weight=4.0, beta=0.9)
        assert torch.isfinite(z.gather(1, m.argmax(1, keepdim=True))).all()


def test_damro_alpha_zero_is_the_identity(tiny):
    img = make_image(9)
    base = _acc(tiny).generate(images=[img], prompt=PROMPT, max_new_tokens=8)
    out = _acc(tiny, DAMRO(k=3, alpha=0.0)).generate(images=[img], prompt=PROMPT, max_new_tokens=8)
    assert out.token_ids == base.token_ids
    rep = [s for s in out.stats.stages if s["method"] == "damro"][0]
    assert rep["branch_visual_tokens"] == 3 * len(out.kept)  # k outliers per visual input (per view)


def test_loglikelihood_uses_the_combined_distribution(tiny):
    img, cont = make_image(16), " the image"
    base = _acc(tiny).loglikelihood(images=[img], prompt=PROMPT, continuation=cont)
    off = _acc(tiny, DAMRO(k=2, alpha=0.0, beta=0.0)).loglikelihood(images=[img], prompt=PROMPT, continuation=cont)
    on = _acc(tiny, DAMRO(k=2, alpha=1.0, beta=0.0)).loglikelihood(images=[img], prompt=PROMPT, continuation=cont)
    assert off[0] == pytest.approx(base[0], abs=1e-4) and off[1] == base[1]
    assert abs(on[0] - base[0]) > 1e-3


def _record_caches(monkeypatch):
    """Every cache object the decode loop steps, in order, with its layer-0 key storage at that moment."""
    from vlmfast import decoding, request
    from vlmfast.reweight import branches

    seen = []
    original = request.decode_step

    def step(model, adapter, tok, cache, mask, next_pos):
        out = original(model, adapter, tok, cache, mask, next_pos)
        seen.append((id(cache), [layer.keys.data_ptr() for layer in cache.layers], cache.get_seq_length()))
        return out

    monkeypatch.setattr(decoding, "decode_step", step)  # the main branch's steps
    monkeypatch.setattr(branches, "decode_step", step)  # the decode branches' steps
    return seen


def test_branch_caches_never_alias(tiny, monkeypatch, tmp_path):
    _random_matcher(monkeypatch, tmp_path)
    seen = _record_caches(monkeypatch)
    acc = _acc(tiny, DAMRO(k=2), AGLA(matcher="random", keep=0.5))
    acc.generate(images=[make_image(10)], prompt="is there a red circle ?", max_new_tokens=4)
    ids = list(dict.fromkeys(c for c, _, _ in seen))
    assert len(ids) == 3  # main, DAMRO's outliers, AGLA's augmented image: three caches
    last = {c: (ptrs, n) for c, ptrs, n in seen}
    ptrs = [p for c in ids for p in last[c][0]]
    assert len(set(ptrs)) == len(ptrs)  # no layer's storage is shared between branches
    n_main, n_damro, n_agla = (last[c][1] for c in ids)
    assert n_damro < n_main == n_agla  # the outlier branch holds only k visual tokens


def test_damro_batch_equals_alone(tiny):
    acc = _acc(tiny, DAMRO(k=3, alpha=1.0))
    imgs, prompts = [make_image(11), make_image(12, size=80)], [PROMPT, "is there a red circle ?"]
    outs = acc.generate(images=[[im] for im in imgs], prompt=prompts, max_new_tokens=6)
    for im, p, o in zip(imgs, prompts, outs):
        assert acc.generate(images=[im], prompt=p, max_new_tokens=6).token_ids == o.token_ids


def test_reversible_after_branches_and_var(tiny, monkeypatch, tmp_path):
    _random_matcher(monkeypatch, tmp_path)
    model, processor = tiny
    impl = model.config.get_text_config()._attn_implementation
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    acc = _acc(tiny, VAR(**LOW), DAMRO(k=2), AGLA(matcher="random", keep=0.5))
    acc.generate(images=[make_image(13)], prompt=PROMPT, max_new_tokens=3)
    assert model.config.get_text_config()._attn_implementation == impl
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks


# --------------------------------------------------------------------------- AGLA


def test_prompt_query():
    assert prompt_query("is there a red circle ?") == "red circle"
    assert prompt_query("Is there a car in the image? Please answer this question with one word.") == "car"
    assert prompt_query("what colour is the square ?", "a photo of a {}") == "a photo of a square"
    assert prompt_query("Describe the image.") == "Describe the image."  # nothing left: the whole prompt


def test_agla_mask_from_hand_made_similarity_map():
    dense = torch.arange(16, dtype=torch.float32).view(4, 4)  # saliency grows in raster order
    sal = saliency(dense, 4, 4, blur=0.0)
    torch.testing.assert_close(sal, dense / 15)
    mask = keep_mask(sal, 0.25)  # threshold = value at index floor(16 * 0.25) = 4 of the descending sort: 11
    assert mask.flatten().nonzero().squeeze(1).tolist() == [11, 12, 13, 14, 15]
    assert keep_fraction(0.4) == pytest.approx(0.8) and keep_fraction(0.0) == pytest.approx(1 - 1e-5)
    # upsampled to the image: the kept pixels are the bottom rows, in a 2x2 map
    big = keep_mask(saliency(torch.tensor([[0.0, 0.0], [1.0, 1.0]]), 8, 8, blur=0.0), 0.5)
    assert big[5:].all() and not big[:3].any()
    img = Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
    arr = np.asarray(augment(img, big.numpy(), "black"))
    assert (arr[~big.numpy()] == 0).all() and (arr[big.numpy()] == 200).all()
    arr = np.asarray(augment(img, big.numpy(), "mean"))
    assert (arr == 200).all()  # a uniform image's mean colour is its colour


class _StubMatcher:
    """Similarity 0.5 (keep 75%) and a map that falls from the left edge to the right edge."""

    def match(self, images, texts):
        maps = torch.tensor([3.0, 2.0, 1.0, 0.0]).expand(len(images), 4, 4).clone()
        return torch.full((len(images),), 0.5), maps


def test_agla_augmented_image_from_a_matcher(monkeypatch):
    monkeypatch.setattr(agla_mod, "_matcher", lambda name: _StubMatcher())
    img = Image.fromarray(np.full((40, 40, 3), 90, dtype=np.uint8))
    (aug,), sims, keeps = AGLA(blur=0.0).augmented([img], ["is there a red circle ?"])
    arr = np.asarray(aug)
    assert sims == [0.5]
    assert 0.5 <= keeps[0] <= 0.8  # 1 - s/2 = 75% of the pixels (ties at the threshold stay)
    assert (arr[:, :25] == 90).all() and (arr[:, -8:] == 0).all()  # left (relevant) kept, right quarter masked


def _random_matcher(monkeypatch, tmp_path):
    """A randomly initialised tiny CLIP saved in the zoo format, used as AGLA's matcher "random"."""
    from vlmfast.zoo.clip import TinyClipConfig, build_tiny_clip, load_clip, save_tiny_clip

    torch.manual_seed(0)
    save_tiny_clip(build_tiny_clip(), TinyClipConfig(), tmp_path)
    matcher = load_clip(str(tmp_path))
    monkeypatch.setattr(agla_mod, "_matcher", lambda name: matcher)


def test_agla_alpha_zero_is_the_identity_and_batch_equals_alone(tiny, monkeypatch, tmp_path):
    _random_matcher(monkeypatch, tmp_path)
    img = make_image(14)
    base = _acc(tiny).generate(images=[img], prompt=PROMPT, max_new_tokens=6)
    assert _acc(tiny, AGLA(alpha=0.0, matcher="random")).generate(
        images=[img], prompt=PROMPT, max_new_tokens=6).token_ids == base.token_ids
    acc = _acc(tiny, AGLA(alpha=2.0, beta=0.1, keep=0.5, matcher="random"))
    imgs, prompts = [img, make_image(15, size=72)], [PROMPT, "is there a red circle ?"]
    outs = acc.generate(images=[[im] for im in imgs], prompt=prompts, max_new_tokens=6)
    for im, p, o in zip(imgs, prompts, outs):
        assert acc.generate(images=[im], prompt=p, max_new_tokens=6).token_ids == o.token_ids
    rep = [s for s in outs[0].stats.stages if s["method"] == "agla"][0]
    assert 0.4 <= rep["kept_fraction"][0] <= 0.7


# --------------------------------------------------------------------------- composition and errors


def test_attention_wrappers_compose_around_the_override():
    session = AttentionSession(base="sdpa")
    calls = []

    def override(module, q, k, v, mask, base, **kw):
        calls.append("override")
        return q * 2, None

    def outer(module, q, k, v, mask, inner, **kw):
        calls.append("outer")
        out, w = inner(module, q, k, v, mask, **kw)
        return out + 1, w

    session.override(0, override)
    session.wrap(0, outer)
    module = torch.nn.Module()
    module.layer_idx = 0
    out, _ = session(module, torch.ones(1), None, None)
    assert out.tolist() == [3.0] and calls == ["outer", "override"]


def test_policy_errors_for_conflicting_combinations(tiny):
    with pytest.raises(PolicyError, match="layer-stage pruning"):
        Policy([VAR(), FastV(layer=1, keep=0.5)])
    with pytest.raises(PolicyError, match="zipvl"):
        Policy([DAMRO(), ZipVL()])
    with pytest.raises(PolicyError, match="at most one"):
        Policy([VAR(), VAR(p=0.5)])
    with pytest.raises(PolicyError, match="once"):
        Policy([AGLA(), AGLA(alpha=1.0)])
    model, processor = tiny
    with pytest.raises(PolicyError, match="same layer"):  # two different full-attention layers in every family
        VLMAccelerator(model, processor, policy=Policy([FoPru(layer=1), DAMRO(layer=-1)]))
    with pytest.raises(PolicyError, match="first_layer"):
        VLMAccelerator(model, processor, policy=Policy([VAR(first_layer=50)]))
    with pytest.raises(PolicyError, match="alpha"):
        Policy.from_dict({"methods": [{"method": "damro", "alpha": -1}]})
