"""The tiny-llava-shapes training script cannot rot: labels, token layout, a few steps, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from training.llava_shapes import LlavaShapesConfig, build_processor
from training.train_llava import Encoder, attention_target, main, patch_cover, patch_targets
from vlmfast.datasets.shapes import COLOR_NAMES, SHAPES, generate_scene

TINY = ["--vision-steps", "2", "--lm-steps", "2", "--vision-batch", "2", "--lm-batch", "2", "--turns", "2",
        "--eval-every", "2", "--ckpt-every", "1", "--dev-items", "1", "--warmup", "1", "--threads", "1"]


def test_patch_targets_follow_the_masks():
    scene = generate_scene(5)
    t = patch_targets(scene, 12)
    p = scene.size // 12
    for o in scene.objects:
        cover = o.mask.reshape(12, p, 12, p).mean((1, 3))
        i, j = np.unravel_index(np.argmax(cover), cover.shape)
        if cover[i, j] > 0.9:  # a patch (almost) fully inside this object is labelled with it
            assert COLOR_NAMES[t["color"][i, j] - 1] == o.color and SHAPES[t["shape"][i, j] - 1] == o.shape
    assert t["centre"].sum() <= len(scene.objects)
    assert set(np.unique(t["row"])) == {0, 1, 2} and (t["row"][0] == 0).all() and (t["col"][:, -1] == 2).all()


def test_training_ids_match_the_processor_chat_format():
    cfg = LlavaShapesConfig()
    proc = build_processor(cfg)
    enc = Encoder(proc, cfg.grid)
    ids, labels, where = enc.conversation([("what colour is the star ?", "red")])
    text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is the star ?"}]}],
        add_generation_prompt=True)
    from PIL import Image

    ref = proc(images=[Image.new("RGB", (168, 168))], text=[text], return_tensors="pt")["input_ids"][0].tolist()
    answer = enc.ids("red") + [enc.eos]
    assert ids == ref + answer
    assert labels == [-100] * len(ref) + answer
    assert where == [len(ref) - 1]  # the ':' of "ASSISTANT :" predicts the answer's first token


def test_object_level_targets_and_attention_target():
    scene = generate_scene(5)
    t = patch_targets(scene, 12)
    cover = patch_cover(scene, 12)
    assert (t["n_all"] == len(scene.objects)).all()
    for k, o in enumerate(scene.objects):
        own = (cover[k] > 0.3) & (cover[k] == cover.max(0))  # patches this object labels
        if not own.any():
            continue
        assert (t["n_shape"][own] == sum(x.shape == o.shape for x in scene.objects)).all()
        assert (t["n_color"][own] == sum(x.color == o.color for x in scene.objects)).all()
        assert (t["obj_row"][own] == ("top", "middle", "bottom").index(o.cell[0]) + 1).all()
    assert attention_target(cover, ()) is None
    two = attention_target(cover, (0, 1))
    assert np.isclose(two.sum(), 1.0)
    # each object weighs the same, its mass spread over its patches by coverage
    c0, c1 = cover[0].ravel(), cover[1].ravel()
    assert np.allclose(two, 0.5 * c0 / c0.sum() + 0.5 * c1 / c1.sum())
    assert np.allclose(attention_target(cover, (0,)), cover[0].ravel() / cover[0].sum())


def test_few_steps_then_resume(tmp_path):
    out = tmp_path / "run"
    main(["--out", str(out), *TINY, "--minutes", "0"])  # stops right after the first step, with a checkpoint
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert (ck["stage"], ck["step"]) == ("vision", 1)
    main(["--out", str(out), *TINY, "--resume", "--export", str(out / "final")])
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert (ck["stage"], ck["step"]) == ("lm", 2)
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert any("dev" in r for r in rows)
    assert (out / "final" / "config.json").is_file() and (out / "final" / "tokenizer.json").is_file()


def test_word_targets_name_the_objects_each_word_and_phrase_refers_to():
    from training.train_llava import parse_heads, word_targets

    scene = generate_scene(5)  # blue circle, green star, yellow square
    assert [(o.color, o.shape) for o in scene.objects] == [("blue", "circle"), ("green", "star"), ("yellow", "square")]
    assert word_targets("what shape is the green object ?".split(), scene) == [("word", 4, (1,)), ("phrase", 5, (1,))]
    # "blue" matches the circle, "star" the star, but no object is a blue star
    assert word_targets("is there a blue star in the image ?".split(), scene) == [
        ("word", 3, (0,)), ("word", 4, (1,)), ("phrase", 4, ())]
    assert word_targets("how many stars are there ?".split(), scene) == [("word", 2, (1,)), ("phrase", 2, (1,))]
    assert parse_heads("word=0:0;route=2:1,3:1") == {"word": [(0, 0)], "route": [(2, 1), (3, 1)]}
    import pytest

    with pytest.raises(ValueError, match="unknown role"):
        parse_heads("nope=0:0")


def test_resume_without_a_checkpoint_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main(["--out", str(tmp_path / "none"), *TINY, "--resume"])
    assert err.value.code == 2 and "--resume: no checkpoint at" in capsys.readouterr().err
