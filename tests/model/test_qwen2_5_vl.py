"""Qwen2.5-VL through transformers' own class: a windowed vision tower (patches reordered into windows, a few
full-attention blocks), M-RoPE positions with absolute video time. The invariants on a tiny random model laid
out like Qwen2.5-VL-7B (windows of 2 x 2 merged tokens, every other block global)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_image, reference_generate
from test_video import make_video, reference  # tests/model is on sys.path (pytest's rootdir-less import mode)

from vlmfast import DAMRO, FastV, FoPru, Policy, PolicyError, VisionZip, VLMAccelerator
from vlmfast.adapters import adapter_for
from vlmfast.zoo.tiny import tiny_qwen2_5_vl

PROMPT = "what is in the image ?"


@pytest.fixture(scope="module")
def qwen25():
    return tiny_qwen2_5_vl()


def _acc(qwen25, *methods):
    model, processor = qwen25
    return VLMAccelerator(model, processor, policy=Policy(list(methods)) if methods else None)


def test_the_adapter_and_its_full_attention_blocks(qwen25):
    model, _ = qwen25
    adapter = adapter_for(model)
    assert adapter.family == "qwen2_5_vl" and adapter.info().vision_attention_layers == (1, 3)
    assert adapter.resolve_vision_layer(None) == 3 and adapter.resolve_vision_layer(-3) == 1


def test_the_tower_really_reorders_and_the_default_layer_is_global(qwen25):
    """The attention itself is checked against transformers' eager attention, mapped back with the tower's own
    order, for every family in tests/model/test_mechanics.py::test_captured_vision_attention_matches_eager."""
    from test_mechanics import tower_permutation

    model, processor = qwen25
    adapter = adapter_for(model)
    inputs = adapter.prepare(processor, [[make_image(1), make_image(2, size=112, width=84)]], [PROMPT])
    perm = tower_permutation(model, inputs)
    assert not torch.equal(perm, torch.arange(len(perm)))
    assert adapter.resolve_vision_layer(None) in adapter.full_attention_layers


def test_a_windowed_block_is_refused_for_attention_readers(qwen25):
    model, processor = qwen25
    with pytest.raises(PolicyError, match=r"fopru\.layer = 0: .* attends within windows.* \(1, 3\)"):
        _acc(qwen25, FoPru(keep=0.5, layer=0))
    with pytest.raises(PolicyError, match=r"damro\.layer = 2: .*windows"):
        _acc(qwen25, DAMRO(layer=2))
    for ok in (FoPru(keep=0.5, layer=1), FoPru(keep=0.5, layer=-1), FoPru(keep=0.5)):
        _acc(qwen25, ok)


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_identity_with_model_generate(qwen25, n_images):
    model, processor = qwen25
    imgs = [make_image(i, size=112, width=84 + 28 * i) for i in range(n_images)]
    out = _acc(qwen25).generate(images=imgs, prompt=PROMPT, max_new_tokens=6)
    assert out.token_ids == reference_generate(model, processor, imgs, PROMPT, 6)


def test_video_identity_and_absolute_time(qwen25):
    model, processor = qwen25
    video = make_video(frames=4, size=112)
    ref, inputs = reference(model, processor, video)
    out = _acc(qwen25).generate(videos=[video], prompt=PROMPT, max_new_tokens=6)
    assert out.token_ids == ref[:6]
    assert "second_per_grid_ts" in inputs
    adapter = adapter_for(model)
    enc = adapter.prepare(processor, [[]], [PROMPT], videos=[[video]])
    pos = adapter.positions(enc)
    slow = dict(enc, second_per_grid_ts=enc["second_per_grid_ts"] * 4)  # four times the seconds per group
    video_tokens = enc["input_ids"] == model.config.video_token_id
    t_row = pos[1][video_tokens]
    assert not torch.equal(t_row, adapter.positions(slow)[1][video_tokens])  # time is in the temporal positions
    assert torch.equal(pos[2:][:, video_tokens], adapter.positions(slow)[2:][:, video_tokens])  # h, w are not


def test_keep_all_and_pruned_runs(qwen25):
    img = make_image(5)
    plain = _acc(qwen25).generate(images=[img], prompt=PROMPT, max_new_tokens=6)
    for p in (FoPru(keep=1.0), FastV(layer=1, keep=1.0)):
        assert _acc(qwen25, p).generate(images=[img], prompt=PROMPT, max_new_tokens=6).token_ids == plain.token_ids
    for p in (FoPru(keep=0.25), VisionZip(keep=0.25), FastV(layer=1, keep=0.25)):
        out = _acc(qwen25, p).generate(images=[img], prompt=PROMPT, max_new_tokens=4)
        assert out.stats.visual_tokens_final == max(1, int(out.stats.visual_tokens_in * 0.25 + 1e-6))


@pytest.mark.parametrize("methods", [(), (FoPru(keep=0.5),), (FastV(layer=1, keep=0.5),)])
def test_batch_with_left_padding_equals_alone(qwen25, methods):
    acc = _acc(qwen25, *methods)
    jobs = [([make_image(7)], [], "what is it ?"), ([make_image(8, size=84), make_image(9)], [], PROMPT),
            ([], [make_video(frames=4, size=112, seed=3)], "what happens in the video ?")]
    alone = [acc.generate(images=i, videos=v or None, prompt=p, max_new_tokens=5) for i, v, p in jobs]
    batch = acc.generate(images=[i for i, _, _ in jobs], videos=[v for _, v, _ in jobs],
                         prompt=[p for _, _, p in jobs], max_new_tokens=5)
    assert [b.token_ids for b in batch] == [a.token_ids for a in alone]
    assert [b.stats.visual_tokens_kept for b in batch] == [a.stats.visual_tokens_kept for a in alone]


def test_means_only_reads_the_same_attention_without_the_matrix(qwen25):
    """FoPru (and FasterVLM / VisionZip / DAMRO's received-attention fallbacks) need only the scoring layer's column
    and row means; with ``means_only`` the adapter reduces the query chunks as it goes, never holding the (N, N)
    matrix. The means equal the matrix's, on an image and on a video (one block per frame group), and FoPru keeps the
    same tokens either way."""
    model, processor = qwen25
    adapter = adapter_for(model)
    image, wide = make_image(0), make_image(1, size=112, width=168)
    inputs = adapter.prepare(processor, [[image, wide]], ["<image><image>" + PROMPT],
                             videos=[[make_video(4)]])
    layer = adapter.resolve_vision_layer(None)
    with torch.inference_mode():
        full = adapter.visual_tokens(inputs, layer)
        means = adapter.visual_tokens(inputs, layer, means_only=True)
    pruner = FoPru(keep=0.25)
    for a, b in zip(full[0] + full[1], means[0] + means[1]):
        assert a.attention is not None and b.attention is None and b.received is not None
        ra, ga = a.attention_means()
        torch.testing.assert_close(b.received, ra, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(b.given, ga, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(b.keys, a.keys)
        assert torch.equal(pruner.prune_visual(a).keep, pruner.prune_visual(b).keep)
    assert full[1][0].attention.dim() == 3  # the video really is block-diagonal


def test_the_policy_asks_for_means_only_when_every_reader_needs_only_them():
    from vlmfast import VFlowOpt

    assert Policy([FoPru(keep=0.25)]).reads_attention_means_only
    assert Policy([VisionZip(keep=0.25), DAMRO()]).reads_attention_means_only
    assert not Policy([VFlowOpt(keep=0.25)]).reads_attention_means_only  # reads the global tokens' rows
    assert not Policy([FastV(keep=0.5)]).reads_attention_means_only  # reads no vision attention at all
    assert not Policy([]).reads_attention_means_only
