"""The invariants of DESIGN.md, for both families: identity, keep-all, positions, batch, reversible."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_image, reference_generate

from vlmfast import FastV, FoPru, Policy, VFlowOpt, VisionZip, VLMAccelerator

PROMPT = "what is in the image ?"


def acc_for(tiny, *methods):
    model, processor = tiny
    return VLMAccelerator(model, processor, policy=Policy(list(methods)))


def test_identity_empty_policy_equals_model_generate(tiny):
    model, processor = tiny
    for seed in range(3):
        img = make_image(seed)
        ref = reference_generate(model, processor, [img], PROMPT, max_new_tokens=10)
        out = VLMAccelerator(model, processor, policy=None).generate(images=[img], prompt=PROMPT, max_new_tokens=10)
        assert out.token_ids == ref
        assert out.stats.visual_tokens_in == out.stats.visual_tokens_kept > 0


def test_identity_text_only_and_two_images(tiny):
    model, processor = tiny
    acc = VLMAccelerator(model, processor, policy=None)
    ref = reference_generate(model, processor, [], PROMPT, 6)
    assert acc.generate(prompt=PROMPT, max_new_tokens=6).token_ids == ref
    imgs = [make_image(1), make_image(2)]
    assert acc.generate(images=imgs, prompt=PROMPT, max_new_tokens=6).token_ids == \
        reference_generate(model, processor, imgs, PROMPT, 6)


@pytest.mark.parametrize("method", [FoPru(keep=1.0), FoPru(keep=1.0, strategy="row"), FastV(layer=1, keep=1.0),
                                    FastV(layer=3, keep=1.0)])
def test_keep_all_equals_no_pruner(tiny, method):
    img = make_image(3)
    base = acc_for(tiny).generate(images=[img], prompt=PROMPT, max_new_tokens=10)
    out = acc_for(tiny, method).generate(images=[img], prompt=PROMPT, max_new_tokens=10)
    assert out.token_ids == base.token_ids
    assert out.stats.visual_tokens_final == base.stats.visual_tokens_in


def _record_positions(model, adapter):
    """Record position_ids handed to the language model on each forward call."""
    calls = []

    def hook(mod, args, kwargs):
        calls.append(kwargs.get("position_ids").clone())

    return calls, adapter.language_model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("method", [FoPru(keep=0.25), FoPru(keep=0.5, strategy="row")])
def test_positions_kept_tokens_keep_original_positions(tiny, method):
    model, processor = tiny
    img = make_image(4)
    acc = acc_for(tiny, method)
    inputs = acc.adapter.prepare(processor, [[img]], [PROMPT])
    full = acc.adapter.positions(inputs)  # (R, 1, L)
    image_mask = acc.adapter.image_token_mask(inputs)[0]
    calls, handle = _record_positions(model, acc.adapter)
    try:
        out = acc.generate(images=[img], prompt=PROMPT, max_new_tokens=4)
    finally:
        handle.remove()
    with torch.inference_mode():  # one kept list per view (LLaVA-NeXT: two), offsets into the image's tokens
        sizes = [v.n_tokens for v in acc.adapter.visual_tokens(inputs, None)[0]]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    kept = torch.cat([k.cpu() + s for k, s in zip(out.kept, starts)])
    img_pos = image_mask.nonzero().squeeze(1)
    expected_cols = torch.cat([(~image_mask).nonzero().squeeze(1), img_pos[kept]]).sort().values
    prefill = calls[0]
    if prefill.dim() == 2:  # LLaVA: (B, L) 1-D positions
        prefill = prefill[None]
    rows = full.shape[0]
    expected = full[:, 0, expected_cols]
    got = prefill[-rows:, 0] if prefill.shape[0] >= rows else prefill[:, 0]
    assert torch.equal(got, expected[-got.shape[0]:])
    assert prefill.shape[-1] == len(expected_cols) < full.shape[-1]
    # decoding continues after the original (unpruned) maximum position, on every axis
    first_decode = calls[1]
    if first_decode.dim() == 2:
        first_decode = first_decode[None]
    assert torch.equal(first_decode[:, 0, 0], full[:, 0].amax(-1)[-first_decode.shape[0]:] + 1)


def test_qwen_rope_deltas_set_during_call_and_restored(models):
    model, processor = models["qwen2_vl"]
    acc = VLMAccelerator(model, processor, policy=Policy([FoPru(keep=0.25)]))
    model.model.rope_deltas = None
    seen = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.append(None if model.model.rope_deltas is None else model.model.rope_deltas.clone()),
        with_kwargs=True)
    try:
        out = acc.generate(images=[make_image(5)], prompt=PROMPT, max_new_tokens=3)
    finally:
        handle.remove()
    inputs = acc.adapter.prepare(processor, [[make_image(5)]], [PROMPT])
    full = acc.adapter.positions(inputs)
    kept_len = full.shape[-1] - (out.stats.visual_tokens_in - out.stats.visual_tokens_kept)
    assert seen[1] is not None and int(seen[1]) == int(full[1:].max()) + 1 - kept_len
    assert model.model.rope_deltas is None


@pytest.mark.parametrize("methods", [(), (FoPru(keep=0.25),), (FastV(layer=2, keep=0.25),),
                                     (FoPru(keep=0.5), FastV(layer=2, keep=0.5))])
def test_batch_left_padding_equals_alone(tiny, family, methods):
    acc = acc_for(tiny, *methods)
    # different prompt lengths and image counts -> left padding and (for pruners) ragged kept counts
    reqs = [([make_image(6)], PROMPT),
            ([make_image(7), make_image(8)], "describe this picture in detail please"),
            ([make_image(9, size=112, width=84 if family == "qwen2_vl" else 112)], "how many objects are there ?")]
    alone = [acc.generate(images=imgs, prompt=p, max_new_tokens=8) for imgs, p in reqs]
    batch = acc.generate(images=[r[0] for r in reqs], prompt=[r[1] for r in reqs], max_new_tokens=8)
    for a, b in zip(alone, batch):
        assert b.token_ids == a.token_ids
        assert b.stats.visual_tokens_kept == a.stats.visual_tokens_kept
        assert b.stats.visual_tokens_final == a.stats.visual_tokens_final


def _snapshot(model):
    return {
        "attn": model.config._attn_implementation,
        "text_attn": model.config.get_text_config()._attn_implementation,
        "config": copy.deepcopy(model.config.to_dict()),
        "hooks": sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()),
        "modules": [type(m).__name__ for m in model.modules()],
        "rope": getattr(getattr(model, "model", None), "rope_deltas", None),
    }


def test_reversible_after_call_and_after_error(tiny):
    model, processor = tiny
    img = make_image(10)
    ref = reference_generate(model, processor, [img], PROMPT, 6)  # (sets Qwen's rope_deltas itself)
    before = _snapshot(model)
    acc = acc_for(tiny, FoPru(keep=0.5), FastV(layer=2, keep=0.5))
    acc.generate(images=[img], prompt=PROMPT, max_new_tokens=6)
    assert _snapshot(model) == before

    # an error in the middle of prefill (inside the installed hooks) must still restore everything
    def boom(*a, **k):
        raise RuntimeError("boom")

    handle = acc.adapter.decoder_layers[-1].register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            acc.generate(images=[img], prompt=PROMPT, max_new_tokens=6)
    finally:
        handle.remove()
    assert _snapshot(model) == before
    assert reference_generate(model, processor, [img], PROMPT, 6) == ref


def test_two_accelerators_do_not_leak(tiny):
    img = make_image(11)
    plain = acc_for(tiny)
    pruned = acc_for(tiny, FastV(layer=1, keep=0.1))
    a = plain.generate(images=[img], prompt=PROMPT, max_new_tokens=6)
    pruned.generate(images=[img], prompt=PROMPT, max_new_tokens=6)
    assert plain.generate(images=[img], prompt=PROMPT, max_new_tokens=6).token_ids == a.token_ids


def test_sampling_seeded_and_top_k1_equals_greedy(tiny):
    acc = acc_for(tiny, FoPru(keep=0.5))
    img = make_image(12)
    greedy = acc.generate(images=[img], prompt=PROMPT, max_new_tokens=8)
    k1 = acc.generate(images=[img], prompt=PROMPT, max_new_tokens=8, do_sample=True, top_k=1, seed=3)
    assert k1.token_ids == greedy.token_ids
    s1 = acc.generate(images=[img], prompt=PROMPT, max_new_tokens=8, do_sample=True, temperature=5.0, seed=1)
    s2 = acc.generate(images=[img], prompt=PROMPT, max_new_tokens=8, do_sample=True, temperature=5.0, seed=1)
    s3 = acc.generate(images=[img], prompt=PROMPT, max_new_tokens=8, do_sample=True, temperature=5.0, seed=2)
    assert s1.token_ids == s2.token_ids
    assert s3.token_ids != s1.token_ids  # 8 draws at temperature 5 over ~90 words: a collision is ~impossible
    nucleus = acc.generate(images=[img], prompt=PROMPT, max_new_tokens=8, do_sample=True, top_p=1e-6, seed=4)
    assert nucleus.token_ids == greedy.token_ids


def test_loglikelihood_matches_greedy_generation(tiny):
    """The greedy continuation is greedy under loglikelihood, its logprob is the sum of per-step maxima,
    and a batch scores like its samples alone (with pruning on)."""
    model, processor = tiny
    acc = acc_for(tiny, FoPru(keep=0.5), FastV(layer=2, keep=0.5))
    img = make_image(13)
    gen = acc.generate(images=[img], prompt=PROMPT, max_new_tokens=4)
    cont = processor.tokenizer.decode(gen.token_ids)
    lp, greedy = acc.loglikelihood(images=[img], prompt=PROMPT, continuation=cont)
    assert greedy and lp < 0
    wrong = processor.tokenizer.decode([t for t in range(5, 40) if t != gen.token_ids[0]][:1] + gen.token_ids[1:])
    assert acc.loglikelihood(images=[img], prompt=PROMPT, continuation=wrong)[1] is False
    batch = acc.loglikelihood(images=[[img], [make_image(14)]], prompt=[PROMPT, "how many objects are there ?"],
                              continuation=[cont, "yes"])
    alone = acc.loglikelihood(images=[make_image(14)], prompt="how many objects are there ?", continuation="yes")
    assert batch[0][1] == greedy and abs(batch[0][0] - lp) < 1e-4
    assert batch[1][1] == alone[1] and abs(batch[1][0] - alone[0]) < 1e-4


def test_loglikelihood_equals_transformers_scores(tiny):
    """With no methods, log p(continuation) equals the sum of transformers' own per-step log-softmax."""
    model, processor = tiny
    img = make_image(15)
    content = [{"type": "image"}, {"type": "text", "text": PROMPT}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=[img], text=[text], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    ids = out.sequences[0, inputs["input_ids"].shape[1]:]
    ref = sum(float(lg[0].float().log_softmax(-1)[t]) for lg, t in zip(out.logits, ids))
    lp, greedy = acc_for(tiny).loglikelihood(images=[img], prompt=PROMPT,
                                             continuation=processor.tokenizer.decode(ids))
    assert greedy and abs(lp - ref) < 1e-4


@pytest.mark.parametrize("pruner", [VisionZip(keep=0.25), VFlowOpt(keep=0.25)])
def test_text_only_request_under_a_vision_pruner_equals_the_plain_model(tiny, pruner):
    """No image: nothing to prune, the answer is the plain model's (it crashed on an empty list of scores)."""
    model, processor = tiny
    plain = VLMAccelerator(model, processor, policy=None).generate(prompt=PROMPT, max_new_tokens=4)
    pruned = VLMAccelerator(model, processor, policy=Policy([pruner])).generate(prompt=PROMPT, max_new_tokens=4)
    assert pruned.token_ids == plain.token_ids and pruned.stats.visual_tokens_in == 0
