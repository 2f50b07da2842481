"""Qwen3-VL through transformers' own class: DeepStack (vision features added to the first decoder layers' hidden
states at the visual positions), interleaved M-RoPE, and videos as one span per frame group after a text timestamp.
The shared invariants and method matrix run on it from tests/conftest.py; these tests cover what is Qwen3-VL's own."""

from __future__ import annotations

import pytest
import torch
from conftest import make_image, reference_generate
from test_video import make_video, reference  # tests/model is on sys.path (pytest's rootdir-less import mode)

from vlmfast import FastV, FoPru, InputError, Policy, VLMAccelerator
from vlmfast.adapters import adapter_for
from vlmfast.sparse import Dense, Grid, MMInference

PROMPT = "what is in the image ?"


@pytest.fixture(scope="module")
def qwen3(models):
    return models["qwen3_vl"]


def _acc(qwen3, *methods):
    model, processor = qwen3
    return VLMAccelerator(model, processor, policy=Policy(list(methods)) if methods else None)


def test_the_adapter_reads_every_deepstack_level(qwen3):
    model, processor = qwen3
    adapter = adapter_for(model)
    assert adapter.family == "qwen3_vl"
    inputs = adapter.prepare(processor, [[make_image(1), make_image(2, size=112, width=160)]], [PROMPT])
    images, _ = adapter.visual_tokens(inputs, None)
    levels = len(model.config.vision_config.deepstack_visual_indexes)
    with torch.inference_mode():
        ref = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).deepstack_features
    assert levels == 2 and len(images) == 2
    for i, im in enumerate(images):
        width = model.config.text_config.hidden_size
        assert im.deepstack is not None and im.deepstack.shape == (levels, im.n_tokens, width)
        for lvl in range(levels):
            assert torch.equal(im.deepstack[lvl], ref[lvl][i])


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_identity_with_model_generate(qwen3, n_images):
    model, processor = qwen3
    imgs = [make_image(i, size=112, width=96 + 32 * i) for i in range(n_images)]
    out = _acc(qwen3).generate(images=imgs, prompt=PROMPT, max_new_tokens=6)
    assert out.token_ids == reference_generate(model, processor, imgs, PROMPT, 6)


def test_deepstack_changes_the_answer(qwen3, monkeypatch):
    """The identity above is not vacuous: without the adapter's DeepStack injection the tiny model answers
    differently (so a run that dropped it would fail identity)."""
    from contextlib import nullcontext

    from vlmfast.adapters.qwen3_vl import Qwen3VLAdapter

    img = [make_image(1)]
    with_it = _acc(qwen3).generate(images=img, prompt=PROMPT, max_new_tokens=6).token_ids
    monkeypatch.setattr(Qwen3VLAdapter, "prefill_hooks", lambda self, *a, **k: nullcontext())
    assert _acc(qwen3).generate(images=img, prompt=PROMPT, max_new_tokens=6).token_ids != with_it


def test_video_identity_with_timestamps_between_frame_groups(qwen3):
    model, processor = qwen3
    video = make_video(frames=4, size=128)
    ref, inputs = reference(model, processor, video)
    out = _acc(qwen3).generate(videos=[video], prompt=PROMPT, max_new_tokens=6)
    assert out.token_ids == ref[:6] and out.stats.video_tokens_in == 32
    pads = (inputs["input_ids"][0] == model.config.video_token_id).int()
    assert int((pads[1:] - pads[:-1] == 1).sum()) == 2  # two spans (one per frame group), text between them
    assert "seconds" in processor.tokenizer.decode(inputs["input_ids"][0])
    img = make_image(3)
    both, _ = reference(model, processor, video, images=[img])
    assert _acc(qwen3).generate(images=[img], videos=[video], prompt=PROMPT, max_new_tokens=6).token_ids == both[:6]


def _manual_logprob(model, processor, images, keep: torch.Tensor, token: int, deep_rows=None) -> float:
    """log p(token | image pruned to ``keep``) from transformers' own pieces: the tower's features and DeepStack
    levels, ``get_rope_index`` positions, and the text model's own DeepStack injection (``visual_pos_masks``,
    ``deepstack_visual_embeds``) on the sequence without the dropped image tokens. ``deep_rows``: which rows of each
    level to inject (default: ``keep``, the same as the features)."""
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": PROMPT}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=images, text=[text], return_tensors="pt")
    ids, grid = inputs["input_ids"], inputs["image_grid_thw"]
    with torch.inference_mode():
        tower = model.model.get_image_features(inputs["pixel_values"], grid)
        rope, _ = model.model.get_rope_index(ids, inputs["mm_token_type_ids"], grid,
                                             attention_mask=inputs["attention_mask"])
        image = ids[0] == model.config.image_token_id
        embeds = model.get_input_embeddings()(ids)[0]
        embeds[image] = tower.pooler_output[0]
        kept_image = torch.zeros(int(image.sum()), dtype=torch.bool)
        kept_image[keep] = True
        cols = ~image
        cols[image] = kept_image
        positions = torch.cat([torch.arange(ids.shape[1])[None, None], rope])[:, :, cols]
        rows = keep if deep_rows is None else deep_rows
        out = model.model.language_model(
            inputs_embeds=embeds[cols][None], attention_mask=torch.ones(1, int(cols.sum()), dtype=torch.long),
            position_ids=positions, visual_pos_masks=image[cols][None],
            deepstack_visual_embeds=[level[0][rows] for level in tower.deepstack_features])
        logits = model.lm_head(out.last_hidden_state[:, -1]).float()
    return float(logits.log_softmax(-1)[0, token])


def test_pruned_run_equals_manual_pruning_of_every_deepstack_level(qwen3, monkeypatch):
    model, processor = qwen3
    img = [make_image(5)]
    pruner = FoPru(keep=0.25)
    kept: list[torch.Tensor] = []
    original = FoPru.prune_visual
    monkeypatch.setattr(FoPru, "prune_visual", lambda self, v: (r := original(self, v), kept.append(r.keep))[0])
    token = processor.tokenizer("red", add_special_tokens=False)["input_ids"]
    assert len(token) == 1
    got, _ = _acc(qwen3, pruner).loglikelihood(images=img, prompt=PROMPT, continuation="red")
    (keep,) = kept
    assert keep.numel() == 4 and not torch.equal(keep, torch.arange(4))  # 4 of 16 tokens, not just the first ones
    assert got == pytest.approx(_manual_logprob(model, processor, img, keep, token[0]), abs=1e-5)
    # the control: the features pruned the same way but DeepStack rows of other tokens give another answer
    wrong = _manual_logprob(model, processor, img, keep, token[0], deep_rows=torch.arange(keep.numel()))
    assert abs(got - wrong) > 1e-4


def test_a_layer_pruner_before_a_deepstack_layer_injects_the_rows_of_the_tokens_it_kept(qwen3):
    """FastV drops tokens before decoder layer 1, which DeepStack level 1 feeds: the level's rows added after
    layer 1 are exactly those of the visual tokens FastV kept, in order, and nothing is added to text tokens."""
    model, processor = qwen3
    img = [make_image(6)]
    layers = adapter_for(model).decoder_layers
    seen: dict = {}

    def record(name, x):  # the prefill's (the first call's) hidden states
        seen.setdefault(name, x)

    h1 = layers[1].register_forward_hook(lambda m, a, o: record("before", o))
    h2 = layers[2].register_forward_pre_hook(lambda m, a, k: record("after", a[0] if a else k["hidden_states"]),
                                             with_kwargs=True)
    try:
        out = _acc(qwen3, FastV(layer=1, keep=0.25)).generate(images=img, prompt=PROMPT, max_new_tokens=1)
    finally:
        h1.remove()
        h2.remove()
    inputs = adapter_for(model).prepare(processor, [img], [PROMPT])
    with torch.inference_mode():
        tower = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    level1 = tower.deepstack_features[1][0]
    added = (seen["after"] - seen["before"])[0]
    rows = added.abs().amax(-1) > 0
    assert int(rows.sum()) == out.stats.visual_tokens_final == 4
    match = torch.cdist(added[rows].float(), level1.float())
    which = match.argmin(1)
    assert float(match.min(1).values.max()) < 1e-4 and bool((which[1:] > which[:-1]).all())


@pytest.mark.parametrize("methods", [(), (FoPru(keep=0.5),), (FastV(layer=1, keep=0.5),)])
def test_batch_with_left_padding_equals_alone(qwen3, methods):
    acc = _acc(qwen3, *methods)
    jobs = [([make_image(7)], [], "what is it ?"), ([make_image(8, size=96), make_image(9)], [], PROMPT),
            ([], [make_video(frames=4, size=128, seed=3)], "what happens in the video ?")]
    alone = [acc.generate(images=i, videos=v or None, prompt=p, max_new_tokens=5) for i, v, p in jobs]
    batch = acc.generate(images=[i for i, _, _ in jobs], videos=[v for _, v, _ in jobs],
                         prompt=[p for _, _, p in jobs], max_new_tokens=5)
    assert [b.token_ids for b in batch] == [a.token_ids for a in alone]
    assert [b.stats.visual_tokens_kept for b in batch] == [a.stats.visual_tokens_kept for a in alone]


def test_sparse_prefill_on_a_video_in_several_spans(qwen3):
    """MMInference's layout has one span per run of video tokens (here two frame groups with a timestamp between
    them), each with the video's grid, so frame-stride patterns line up across the runs."""
    video = make_video(frames=4, size=128)
    n_layers = qwen3[0].config.get_text_config().num_hidden_layers
    plain = _acc(qwen3).generate(videos=[video], prompt=PROMPT, max_new_tokens=6)
    dense = _acc(qwen3, MMInference(min_length=0, block=16, default=Dense())).generate(
        videos=[video], prompt=PROMPT, max_new_tokens=6)
    assert dense.token_ids == plain.token_ids
    out = _acc(qwen3, MMInference(min_length=0, block=16, default=Grid(stride="frame", local=16))).generate(
        videos=[video], prompt=PROMPT, max_new_tokens=6)
    rep = next(s for s in out.stats.stages if s["method"] == "mminference")
    assert rep["sparse_layers"] == n_layers and not rep["dense_fallbacks"]
    assert rep["visual_spans"] == [{"kind": "video", "grid": [2, 4, 4], "frame_stride": 16, "tokens": 16}] * 2


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_family_specific_bad_inputs_are_named(models, family):
    model, processor = models[family]
    acc = VLMAccelerator(model, processor)
    patch = model.config.vision_config.patch_size
    with pytest.raises(InputError, match=r"videos\[0\] has 1 frame; a .* video needs at least 2 .*as an image"):
        acc.generate(videos=[make_video(frames=1, size=128)], prompt=PROMPT)
    with pytest.raises(InputError, match=rf"images\[0\] is 8x40 px, smaller than one .* vision patch \({patch} px\)"):
        acc.generate(images=[make_image(0, size=40, width=8)], prompt=PROMPT)
    with pytest.raises(InputError, match=r"images\[1\]\[0\] is 5x5 px"):
        acc.generate(images=[[make_image(0)], [make_image(1, size=5)]], prompt=[PROMPT, PROMPT])


@pytest.fixture(scope="module")
def qwen3_moe():
    from vlmfast.zoo.tiny import tiny_qwen3_vl

    return tiny_qwen3_vl(moe=True)


def test_the_moe_variant_shares_the_path(qwen3_moe, monkeypatch):
    """``Qwen3VLMoeForConditionalGeneration`` (4 experts, 2 per token): the same adapter; the first answer token's
    log-probability equals transformers' own (its random weights answer most prompts with EOS, so this compares
    scores, not tokens); a pruned run equals transformers' own DeepStack path on the pruned sequence; video identity."""
    model, processor = qwen3_moe
    assert type(adapter_for(model)).__name__ == "Qwen3VLAdapter"
    img = [make_image(5)]
    red = processor.tokenizer("red", add_special_tokens=False)["input_ids"][0]
    content = [{"type": "image"}, {"type": "text", "text": PROMPT}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=img, text=[text], return_tensors="pt")
    with torch.inference_mode():
        ref = model(**inputs).logits[0, -1].float().log_softmax(-1)[red]
    got, _ = _acc(qwen3_moe).loglikelihood(images=img, prompt=PROMPT, continuation="red")
    assert got == pytest.approx(float(ref), abs=1e-5)
    kept: list[torch.Tensor] = []
    original = FoPru.prune_visual
    monkeypatch.setattr(FoPru, "prune_visual", lambda self, v: (r := original(self, v), kept.append(r.keep))[0])
    got, _ = _acc(qwen3_moe, FoPru(keep=0.25)).loglikelihood(images=img, prompt=PROMPT, continuation="red")
    assert got == pytest.approx(_manual_logprob(model, processor, img, kept[0], red), abs=1e-5)
    video = make_video(frames=4, size=128)
    assert _acc(qwen3_moe).generate(videos=[video], prompt=PROMPT, max_new_tokens=6).token_ids == \
        reference(model, processor, video)[0][:6]
