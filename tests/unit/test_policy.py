"""Policy files: loading, round trips, defaults, and the errors users see."""

from __future__ import annotations

import pytest
import yaml
from conftest import make_image

from vlmfast import FastV, FoPru, Policy, PolicyError, UnsupportedModelError, VLMAccelerator, load_policy
from vlmfast.errors import InputError
from vlmfast.policy import default_policy_for, shipped_policies


def test_shipped_policies_load_and_are_fopru_rank_25():
    shipped = ("llava-1.5-7b", "llava-v1.6-mistral-7b", "llava-onevision-qwen2-7b", "qwen2-vl-7b", "qwen2.5-vl-7b",
               "qwen3-vl-8b", "internvl3-8b")
    assert set(shipped) <= set(shipped_policies())
    for name in shipped:
        pol = load_policy(name)
        assert pol.methods == [FoPru(keep=0.25, strategy="rank")]


def test_yaml_round_trip(tmp_path):
    pol = Policy([FoPru(keep=0.1, strategy="row"), FastV(layer=3, keep=0.5)], name="x")
    path = tmp_path / "p.yaml"
    pol.to_yaml(path)
    assert load_policy(path) == pol
    assert load_policy(str(path)).name == "x"


def test_default_policy_matches_hub_ids():
    pol, why = default_policy_for("llava-hf/llava-1.5-7b-hf")
    assert pol.methods == [FoPru(keep=0.25)] and "llava-1.5-7b" in why
    pol, why = default_policy_for("/models/Qwen2-VL-7B-Instruct")
    assert pol.methods and "qwen2-vl-7b" in why
    for hub_id, stem in (("Qwen/Qwen2.5-VL-7B-Instruct", "'qwen2.5-vl-7b'"), ("Qwen/Qwen3-VL-8B-Instruct",
                         "'qwen3-vl-8b'"), ("/ckpt/qwen3-vl-8b-thinking", "'qwen3-vl-8b'"),
                         ("llava-hf/llava-onevision-qwen2-7b-ov-hf", "'llava-onevision-qwen2-7b'"),
                         ("/models/llava-onevision-qwen2-7b-si-hf", "'llava-onevision-qwen2-7b'"),
                         ("OpenGVLab/InternVL3-8B-hf", "'internvl3-8b'"), ("/ckpt/InternVL3-8B-hf", "'internvl3-8b'"),
                         ("llava-hf/llava-v1.6-mistral-7b-hf", "'llava-v1.6-mistral-7b'"),
                         ("/models/llava-v1.6-mistral-7b-hf", "'llava-v1.6-mistral-7b'")):
        pol, why = default_policy_for(hub_id)
        assert pol.methods and stem in why, (hub_id, why)
    pol, why = default_policy_for("someone/other-model")
    assert pol.is_empty and "no shipped policy" in why


def write(tmp_path, data) -> str:
    p = tmp_path / "bad.yaml"
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(p)


@pytest.mark.parametrize("data,needle", [
    ({"methods": [{"method": "nope"}]}, "unknown method 'nope'"),
    ({"methods": [{"method": "fopru", "keep": 1.5}]}, "methods[0] (fopru).keep"),
    ({"methods": [{"method": "fopru", "keep": 0}]}, "greater than 0"),
    ({"methods": [{"method": "fopru", "kep": 0.5}]}, "methods[0] (fopru).kep: Unexpected keyword"),
    ({"methods": [{"method": "fopru", "strategy": "diag"}]}, "'rank' or 'row'"),
    ({"methods": [{"keep": 0.5}]}, "missing 'method'"),
    ({"metods": []}, "metods: Extra inputs are not permitted"),
    ("[1, 2]", "must be a mapping"),
    ("methods: [unclosed", "not valid YAML"),
    ({"methods": [{"method": "fastv", "layer": 2}, {"method": "fastv", "layer": 2}]}, "same layer"),
])
def test_bad_policy_files_name_file_field_and_expectation(tmp_path, data, needle):
    path = write(tmp_path, data)
    with pytest.raises(PolicyError) as e:
        load_policy(path)
    assert needle in str(e.value)
    assert path in str(e.value)


def test_unknown_policy_name():
    with pytest.raises(PolicyError, match="neither a shipped policy"):
        load_policy("no-such-policy")


def test_layer_beyond_depth_fails_at_bind_time(models, tmp_path):
    model, processor = models["llava"]
    path = write(tmp_path, {"methods": [{"method": "fastv", "layer": 40}]})
    with pytest.raises(PolicyError) as e:
        VLMAccelerator(model, processor, policy=path)
    msg = str(e.value)
    assert path in msg and "fastv.layer = 40" in msg and "1 <= layer < 4" in msg
    with pytest.raises(PolicyError, match="outside the vision tower"):
        VLMAccelerator(model, processor, policy=Policy([FoPru(layer=7)]))


def test_auto_policy_and_explicit_none(models):
    model, processor = models["llava"]
    acc = VLMAccelerator(model, processor)  # tiny model name matches nothing -> no methods, and says so
    assert acc.policy.is_empty and "no shipped policy" in acc.policy_origin
    model.name_or_path = "llava-hf/llava-1.5-7b-hf"
    try:
        acc = VLMAccelerator(model, processor)
        assert acc.policy.methods == [FoPru(keep=0.25)]
        assert VLMAccelerator(model, processor, policy=None).policy.is_empty
    finally:
        model.name_or_path = ""


def test_unsupported_model_names_supported_families():
    from transformers import LlamaConfig, LlamaForCausalLM

    m = LlamaForCausalLM(LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                     num_attention_heads=2))
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM.*llava.*qwen2_vl"):
        VLMAccelerator(m, processor=object())


@pytest.mark.parametrize("kwargs,needle", [
    (dict(images=["not-a-file.png"], prompt="hi"), "cannot open image file"),
    (dict(images=[42], prompt="hi"), "expected a PIL image"),
    (dict(images=[make_image()], prompt=3), "prompt must be a string"),
    (dict(images=[[make_image()]], prompt=["a", "b"]), "a batch of 2 prompts needs a list of 2 image lists"),
    (dict(images=[make_image()], prompt="hi", max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(images=[make_image()], prompt="hi", do_sample=True, top_p=1.5), "top_p must be in (0, 1]"),
])
def test_bad_requests_get_clear_errors(models, kwargs, needle):
    model, processor = models["llava"]
    acc = VLMAccelerator(model, processor, policy=None)
    with pytest.raises(InputError) as e:
        acc.generate(**kwargs)
    assert needle in str(e.value)


def test_processor_required_when_model_has_no_name(models):
    model, _ = models["llava"]
    with pytest.raises(InputError, match="pass processor"):
        VLMAccelerator(model)


def test_multi_stage_layers_validated(models):
    from vlmfast.pruners import PyramidDrop

    model, processor = models["llava"]
    with pytest.raises(PolicyError, match=r"pyramiddrop.layers = \[8, 16, 24\] is beyond"):
        VLMAccelerator(model, processor, policy=Policy([PyramidDrop()]))  # paper defaults need 32 layers
    with pytest.raises(PolicyError, match="strictly increasing"):
        VLMAccelerator(model, processor, policy=Policy([PyramidDrop(layers=[2, 1])]))
    with pytest.raises(PolicyError, match="same layer"):
        Policy([PyramidDrop(layers=[1, 2]), FastV(layer=2)])


def test_pyramiddrop_default_layers_warn_on_another_depth(caplog):
    """LLaVA-1.5's 8 / 16 / 24 are accepted on any deeper model, but on a 28-layer Qwen2-7B they are not a quarter,
    half and three quarters of the way: a warning says so, with the layers that would be."""
    from vlmfast.adapters import ModelInfo
    from vlmfast.pruners import PyramidDrop

    with caplog.at_level("WARNING", logger="vlmfast"):
        PyramidDrop().check(ModelInfo("qwen2_vl", num_layers=28, num_vision_layers=32))
    assert "28" in caplog.text and "[7, 14, 21]" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="vlmfast"):
        PyramidDrop().check(ModelInfo("llava", num_layers=32, num_vision_layers=24))
        PyramidDrop(layers=[7, 14, 21]).check(ModelInfo("qwen2_vl", num_layers=28, num_vision_layers=32))
    assert caplog.text == ""
