"""LLaVA class variants built like transformers' own LLaVA tester: a CLIP tower with
``vision_feature_select_strategy="full"`` (the CLS feature enters the LLM before the patches: 65 tokens for the
tiny 8 x 8 grid) and a SigLIP tower with "full" (no CLS: the llava-interleave layout). The CLS is a never-pruned
visual token (``ImageTokens.fixed``) that keeps its position; the grid is the 64 tokens after it."""

from __future__ import annotations

import pytest
import torch
from conftest import make_image, reference_generate

from vlmfast import FastV, FoPru, Policy, VisionZip, VLMAccelerator
from vlmfast.adapters import adapter_for
from vlmfast.zoo.tiny import tiny_llava

PROMPT = "what is in the image ?"


@pytest.fixture(scope="module")
def clip_full():
    return tiny_llava(strategy="full")


@pytest.fixture(scope="module")
def siglip_full():
    from transformers import SiglipVisionConfig

    model, processor = tiny_llava(strategy="full")  # the tokenizer and processor; the model is rebuilt below
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(vision_config=SiglipVisionConfig(image_size=32, patch_size=4, hidden_size=32,
                                                       intermediate_size=64, num_hidden_layers=3,
                                                       num_attention_heads=4),
                      text_config=model.config.text_config, image_token_index=model.config.image_token_id,
                      image_seq_length=64, vision_feature_layer=-1, vision_feature_select_strategy="full")
    torch.manual_seed(0)
    siglip = LlavaForConditionalGeneration(cfg).eval()
    siglip.generation_config = model.generation_config
    processor.num_additional_image_tokens = 0
    return siglip, processor


def _acc(tiny, *methods):
    return VLMAccelerator(*tiny, policy=Policy(list(methods)) if methods else None)


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_identity_with_model_generate(clip_full, n_images):
    model, processor = clip_full
    imgs = [make_image(i, size=32, width=32 + 8 * i) for i in range(n_images)]
    out = _acc(clip_full).generate(images=imgs, prompt=PROMPT, max_new_tokens=6)
    assert out.token_ids == reference_generate(model, processor, imgs, PROMPT, 6)
    assert out.stats.visual_tokens_in == 64 * n_images  # the CLS is not a prunable visual token


def test_siglip_full_identity(siglip_full):
    model, processor = siglip_full
    adapter = adapter_for(model)
    assert not adapter.tower_has_cls and adapter.fixed_token_mask({"input_ids": torch.zeros(1, 3)}) is None
    img = [make_image(3, size=32)]
    assert _acc(siglip_full).generate(images=img, prompt=PROMPT, max_new_tokens=6).token_ids == \
        reference_generate(model, processor, img, PROMPT, 6)


def test_the_cls_enters_first_at_its_own_position_and_no_pruner_drops_it(clip_full):
    """FoPru keeps 25% of the grid; the sequence the LLM receives still has the CLS feature right before the kept
    patches, at the position of the image's first placeholder; FastV at layer 1 drops patches, never the CLS."""
    model, processor = clip_full
    img = [make_image(4, size=32)]
    adapter = adapter_for(model)
    inputs = adapter.prepare(processor, [img], [PROMPT])
    with torch.inference_mode():
        cls = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0][0]
    first = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero()[0])
    layers = adapter.decoder_layers
    seen: dict = {}

    def record(name, value):
        seen.setdefault(name, value)

    h0 = layers[0].register_forward_pre_hook(
        lambda m, a, k: record("in", (a[0] if a else k["hidden_states"], k.get("position_ids"))), with_kwargs=True)
    h1 = layers[1].register_forward_hook(lambda m, a, o: record("out1", o[0] if isinstance(o, tuple) else o))
    try:
        out = _acc(clip_full, FoPru(keep=0.25), FastV(layer=1, keep=0.5)).generate(images=img, prompt=PROMPT,
                                                                                    max_new_tokens=2)
    finally:
        h0.remove()
        h1.remove()
    hidden, positions = seen["in"]
    row = int(torch.isclose(hidden[0], cls, atol=1e-6).all(-1).nonzero().squeeze())
    assert positions[0, row] == first  # the CLS keeps its original position
    n_in = inputs["input_ids"].shape[1] - 64 + 16  # 48 of the 64 patches dropped by FoPru
    assert hidden.shape[1] == n_in and out.stats.visual_tokens_kept == 16
    assert out.stats.visual_tokens_final == 8 and seen["out1"].shape[1] == n_in - 8  # FastV: 8 patches, no CLS


def test_keep_all_and_batch_equal(clip_full):
    img = make_image(5, size=32)
    plain = _acc(clip_full).generate(images=[img], prompt=PROMPT, max_new_tokens=6).token_ids
    for p in (FoPru(keep=1.0), FastV(layer=1, keep=1.0), VisionZip(keep=1.0, contextual=0.0)):
        assert _acc(clip_full, p).generate(images=[img], prompt=PROMPT, max_new_tokens=6).token_ids == plain
    for methods in ((), (FoPru(keep=0.5),), (FastV(layer=1, keep=0.5),)):
        acc = _acc(clip_full, *methods)
        jobs = [([make_image(7, size=32)], "what is it ?"), ([make_image(8, size=40), make_image(9, size=32)], PROMPT),
                ([], "how many objects are there ?")]
        alone = [acc.generate(images=i, prompt=p, max_new_tokens=5).token_ids for i, p in jobs]
        batch = acc.generate(images=[i for i, _ in jobs], prompt=[p for _, p in jobs], max_new_tokens=5)
        assert [b.token_ids for b in batch] == alone
