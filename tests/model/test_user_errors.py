"""Mistakes a new user makes, each answered by a named vlmfast error that says what was wrong and what was
expected (never a bare pydantic / transformers / TypeError traceback)."""

from __future__ import annotations

import pytest
from conftest import make_image

from vlmfast import (
    FastV,
    FoPru,
    InputError,
    Policy,
    PolicyError,
    UnsupportedModelError,
    VLMAccelerator,
    VlmfastError,
    load_policy,
)


@pytest.mark.parametrize("build, field", [
    (lambda: FoPru(keep=0), "fopru.keep"),
    (lambda: FoPru(keep=0.5, strategy="columns"), "fopru.strategy"),
    (lambda: FastV(layer=2, keep=0.5, nope=1), "fastv.nope"),
])
def test_a_bad_field_built_in_python_is_a_policy_error_naming_it(build, field):
    with pytest.raises(PolicyError, match=field.replace(".", r"\.")) as err:
        build()
    assert "ValidationError" not in str(err.value)


def test_assigning_a_bad_value_is_a_policy_error_and_leaves_the_method_unchanged():
    m = FoPru(keep=0.5)
    with pytest.raises(PolicyError, match=r"fopru\.keep: Input should be less than or equal to 1 \(got 2\)"):
        m.keep = 2
    assert m.keep == 0.5


def test_the_same_bad_value_from_a_policy_file_names_its_place():
    with pytest.raises(PolicyError, match=r"methods\[0\] \(fopru\)\.keep: Input should be greater than 0"):
        Policy.from_dict({"methods": [{"method": "fopru", "keep": 0}]})


@pytest.mark.parametrize("policy", [123, 0.25, ["fopru"], object()])
def test_a_policy_of_the_wrong_type_is_a_policy_error(tiny, policy):
    model, processor = tiny
    with pytest.raises(PolicyError, match="expected a shipped policy name, a YAML path, a dict, a Policy"):
        VLMAccelerator(model, processor, policy=policy)


@pytest.mark.parametrize("spec", ["none", "None", " NONE "])
def test_policy_none_by_name_works_in_python_as_on_the_command_line(tiny, spec):
    model, processor = tiny
    assert load_policy(spec).is_empty
    acc = VLMAccelerator(model, processor, policy=spec)
    assert acc.policy.is_empty
    out = acc.generate(images=[make_image(1)], prompt="what is it ?", max_new_tokens=2)
    assert len(out.token_ids) <= 2


def test_a_prompt_with_the_models_image_placeholder_is_an_input_error(tiny):
    model, processor = tiny
    acc = VLMAccelerator(model, processor, policy=None)
    token = processor.image_token
    with pytest.raises(InputError, match=f"prompt contains {token!r}.*one set per image"):
        acc.generate(images=[make_image(2)], prompt=f"{token}\nwhat is it ?", max_new_tokens=2)
    with pytest.raises(InputError, match=r"prompt\[1\] contains"):
        acc.generate(images=[[make_image(2)], [make_image(3)]], prompt=["fine", f"bad {token}"], max_new_tokens=2)


def test_a_folder_of_an_unsupported_family_is_refused_before_loading(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"'bert' model, which vlmfast has no adapter for.*llava.*qwen2_vl"):
        VLMAccelerator.from_pretrained(str(tmp_path), local_files_only=True)


def test_a_missing_folder_and_a_folder_without_config_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="no such folder"):
        VLMAccelerator.from_pretrained(str(tmp_path / "nothing-here"), local_files_only=True)
    with pytest.raises(InputError, match="has no config.json"):
        VLMAccelerator.from_pretrained(str(tmp_path), local_files_only=True)


def test_every_error_above_is_a_vlmfast_error():
    for cls in (PolicyError, InputError, UnsupportedModelError):
        assert issubclass(cls, VlmfastError)


def test_a_prompt_longer_than_the_context_is_an_input_error(tiny):
    model, processor = tiny
    limit = model.config.get_text_config().max_position_embeddings
    acc = VLMAccelerator(model, processor, policy=None)
    with pytest.raises(InputError, match=rf"the prompt needs \d+ positions .* the language model has {limit}"):
        acc.generate(images=[make_image(1)], prompt="red " * (limit + 100), max_new_tokens=2)


def test_decoding_past_the_context_warns_once(tiny, monkeypatch):
    import logging

    model, processor = tiny
    monkeypatch.setattr(model.config.get_text_config(), "max_position_embeddings", 120)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    log = logging.getLogger("vlmfast")
    log.addHandler(handler)
    try:
        acc = VLMAccelerator(model, processor, policy=None)
        prompt = "red " * 10
        n = len(acc.generate(prompt=prompt, max_new_tokens=1).token_ids)
        assert n <= 1 and not seen  # fits
        for _ in range(2):
            acc.generate(prompt=prompt, max_new_tokens=200)
    finally:
        log.removeHandler(handler)
    assert len(seen) == 1 and "past the language model's 120" in seen[0]


@pytest.mark.parametrize("prompt, where", [("", "prompt"), ("   \n", "prompt"), (["fine ?", " "], r"prompt\[1\]")])
def test_an_empty_prompt_is_refused_as_in_the_demo(tiny, prompt, where):
    model, processor = tiny
    acc = VLMAccelerator(model, processor, policy=None)
    images = [make_image(1)] if isinstance(prompt, str) else [[make_image(1)], [make_image(2)]]
    with pytest.raises(InputError, match=where + " is empty"):
        acc.generate(images=images, prompt=prompt, max_new_tokens=2)


def test_a_policy_for_other_models_warns_once(tiny, monkeypatch):
    import logging

    model, processor = tiny
    name = f"org/{type(model).__name__.lower()}-7b"  # warned once per (policy, model name): one name per family
    monkeypatch.setattr(model, "name_or_path", name)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("vlmfast").addHandler(handler)
    try:
        foreign = {"name": "for-qwen", "models": ["Qwen/*"], "methods": [{"method": "fopru", "keep": 0.5}]}
        for _ in range(3):
            VLMAccelerator(model, processor, policy=foreign)
        VLMAccelerator(model, processor, policy={**foreign, "models": ["org/*"]})  # names this model: silent
        VLMAccelerator(model, processor, policy={"methods": [{"method": "fopru", "keep": 0.5}]})  # names none
    finally:
        logging.getLogger("vlmfast").removeHandler(handler)
    assert seen == [f"vlmfast: policy for-qwen is for Qwen/*, not {name}; its layers and budgets may not suit this "
                    "model"]


def test_a_llava_with_a_pixtral_tower_is_refused_by_name():
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, PixtralVisionConfig

    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=64, patch_size=16, head_dim=16)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=100)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_id=99,
                                                      vision_feature_layer=-1, vision_feature_select_strategy="full"))
    with pytest.raises(UnsupportedModelError, match="PixtralVisionModel vision tower is not supported.*CLIP"):
        VLMAccelerator(model, processor=object(), policy=None)


def test_damro_reading_the_cls_of_a_tower_without_one_is_refused_when_the_policy_is_set(models, family):
    """criterion='cls' failed at the first request with a RuntimeError on a tower without [CLS]; it is a
    PolicyError when the accelerator is built, and 'norm' (no attention read) is accepted even on a windowed
    Qwen2.5-VL block."""
    from vlmfast import DAMRO
    from vlmfast.adapters import adapter_for

    model, processor = models[family]
    if adapter_for(model).tower_has_cls:  # the LLaVA families' CLIP towers
        VLMAccelerator(model, processor, policy=Policy([DAMRO(criterion="cls")]))
        return
    with pytest.raises(PolicyError, match=r"damro.criterion = 'cls' needs a vision tower with a \[CLS\] token"):
        VLMAccelerator(model, processor, policy=Policy([DAMRO(criterion="cls")]))
    if family == "qwen2_5_vl":
        VLMAccelerator(model, processor, policy=Policy([DAMRO(criterion="norm", layer=0)]))
        with pytest.raises(PolicyError, match="windows"):
            VLMAccelerator(model, processor, policy=Policy([DAMRO(criterion="received", layer=0)]))
