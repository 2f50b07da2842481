"""Video input for Qwen2-VL through ``VLMAccelerator.generate(videos=...)``: the same tokens as transformers on the
processor's own outputs, video tokens counted, sparse prefill on a video layout (frame stride = tokens per frame
group), vision pruners per frame group, and clear errors for what cannot work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_image
from PIL import Image

from vlmfast import VLMAccelerator
from vlmfast.errors import InputError
from vlmfast.policy import Policy
from vlmfast.pruners import FastV, FoPru
from vlmfast.pruners.divprune import DivPrune
from vlmfast.pruners.fastervlm import FasterVLM
from vlmfast.pruners.random import RandomPruner
from vlmfast.pruners.vflowopt import VFlowOpt
from vlmfast.pruners.visionzip import VisionZip
from vlmfast.reweight.damro import DAMRO
from vlmfast.sparse import Dense, Grid, MMInference

PROMPT = "what is in the image ?"


def make_video(frames: int = 4, size: int = 56, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((frames, size, size, 3)) * 255).astype("uint8")


def reference(model, processor, video, prompt=PROMPT, images=(), max_new_tokens=8):
    """transformers alone: the chat template with a video item, the processor's own video outputs
    (``pixel_values_videos``, ``video_grid_thw``), ``model.generate``."""
    content = [{"type": "image"} for _ in images] + [{"type": "video"}, {"type": "text", "text": prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=list(images) or None, videos=[video], text=[text], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    ids = out[0, inputs["input_ids"].shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    return (ids[: ids.index(eos)] if eos in ids else ids), inputs


@pytest.fixture(scope="module")
def qwen(models):
    return models["qwen2_vl"]


def acc_for(qwen, methods=None):
    model, processor = qwen
    return VLMAccelerator(model, processor, policy=Policy(methods) if methods else None)


@pytest.mark.parametrize("form", ["pil", "thwc", "tchw"])
def test_video_generate_equals_transformers(qwen, form):
    model, processor = qwen
    video = make_video()
    given = {"pil": [Image.fromarray(f) for f in video], "thwc": video,
             "tchw": torch.from_numpy(video).permute(0, 3, 1, 2)}[form]
    ref, inputs = reference(model, processor, video)
    out = acc_for(qwen).generate(videos=[given], prompt=PROMPT, max_new_tokens=8)
    assert out.token_ids == ref
    n_video = int((inputs["input_ids"] == model.config.video_token_id).sum())
    t, h, w = inputs["video_grid_thw"][0].tolist()
    assert n_video == t * h * w // 4 and (t, h, w) == (2, 4, 4)  # 4 frames -> 2 frame groups of 2x2 tokens
    st = out.stats
    assert st.visual_tokens_in == st.video_tokens_in == st.visual_tokens_kept == n_video
    assert len(out.kept) == 1 and out.kept[0].tolist() == list(range(n_video))


def test_loglikelihood_takes_videos(qwen):
    model, processor = qwen
    acc, video = acc_for(qwen), make_video(seed=8)
    out = acc.generate(videos=[video], prompt=PROMPT, max_new_tokens=3)
    text = processor.tokenizer.decode(out.token_ids)
    logp, greedy = acc.loglikelihood(videos=[video], prompt=PROMPT, continuation=text)
    assert np.isfinite(logp) and logp < 0 and greedy


def test_image_and_video_in_one_prompt_equals_transformers(qwen):
    model, processor = qwen
    video, image = make_video(seed=1), make_image(2, size=56)
    ref, inputs = reference(model, processor, video, images=[image])
    out = acc_for(qwen).generate(images=[image], videos=[video], prompt=PROMPT, max_new_tokens=8)
    assert out.token_ids == ref
    n_img = int((inputs["input_ids"] == model.config.image_token_id).sum())
    n_vid = int((inputs["input_ids"] == model.config.video_token_id).sum())
    assert out.stats.visual_tokens_in == n_img + n_vid and out.stats.video_tokens_in == n_vid
    assert [k.numel() for k in out.kept] == [n_img, n_vid]  # images first, then videos


def test_video_batch_equals_alone(qwen):
    """A left-padded batch mixing a video-only prompt and an image + longer-video prompt: each sample as alone,
    with a pruner (kept indices per frame group) on."""
    acc = acc_for(qwen, [FoPru(keep=0.5)])
    v1, v2, img = make_video(seed=3), make_video(frames=6, seed=4), make_image(5, size=56)
    alone = [acc.generate(videos=[v1], prompt=PROMPT, max_new_tokens=6),
             acc.generate(images=[img], videos=[v2], prompt="describe this picture", max_new_tokens=6)]
    batch = acc.generate(images=[None, [img]], videos=[[v1], [v2]], prompt=[PROMPT, "describe this picture"],
                         max_new_tokens=6)
    for a, b in zip(alone, batch):
        assert a.token_ids == b.token_ids
        assert [k.tolist() for k in a.kept] == [k.tolist() for k in b.kept]


def test_sparse_prefill_on_a_video_has_frame_stride(qwen):
    model, processor = qwen
    video = make_video(frames=4, size=112)  # 2 frame groups of 4x4 tokens
    n_layers = model.config.get_text_config().num_hidden_layers
    plain = acc_for(qwen).generate(videos=[video], prompt=PROMPT, max_new_tokens=6)
    dense = acc_for(qwen, [MMInference(min_length=0, block=16, default=Dense())]).generate(
        videos=[video], prompt=PROMPT, max_new_tokens=6)
    assert dense.token_ids == plain.token_ids
    for methods, kept in (([], 32), ([FoPru(keep=0.5)], 16)):
        sparse = MMInference(min_length=0, block=16, default=Grid(stride="frame", local=16))
        out = acc_for(qwen, methods + [sparse]).generate(videos=[video], prompt=PROMPT, max_new_tokens=6)
        rep = next(s for s in out.stats.stages if s["method"] == "mminference")
        assert rep["sparse_layers"] == n_layers and not rep["dense_fallbacks"]
        assert rep["visual_spans"] == [{"kind": "video", "grid": [2, 4, 4], "frame_stride": 16, "tokens": kept}]
        assert "sparse layers" in out.stats.table()


@pytest.mark.parametrize("pruner", [FoPru(keep=0.5), FoPru(keep=0.5, strategy="row"), RandomPruner(keep=0.5),
                                    DivPrune(keep=0.5), FasterVLM(keep=0.5), VisionZip(keep=0.5, contextual=0.25),
                                    VFlowOpt(keep=0.5)],
                         ids=["fopru", "fopru-row", "random", "divprune", "fastervlm", "visionzip", "vflowopt"])
def test_vision_pruner_keeps_half_of_each_frame_group(qwen, pruner):
    video = make_video(frames=4, size=112)
    out = acc_for(qwen, [pruner]).generate(videos=[video], prompt=PROMPT, max_new_tokens=3)
    (kept,) = out.kept
    per = 16  # tokens per frame group
    assert out.stats.visual_tokens_in == 32 and out.stats.visual_tokens_kept == kept.numel() == 16
    assert [int(((kept >= g * per) & (kept < (g + 1) * per)).sum()) for g in range(2)] == [8, 8]
    assert kept.tolist() == sorted(kept.tolist())


def test_keep_all_and_layer_pruner_on_a_video(qwen):
    video = make_video(seed=6)
    plain = acc_for(qwen).generate(videos=[video], prompt=PROMPT, max_new_tokens=6)
    assert acc_for(qwen, [FoPru(keep=1.0)]).generate(videos=[video], prompt=PROMPT,
                                                     max_new_tokens=6).token_ids == plain.token_ids
    out = acc_for(qwen, [FastV(layer=2, keep=0.5)]).generate(videos=[video], prompt=PROMPT, max_new_tokens=3)
    assert out.stats.visual_tokens_kept == 8 and out.stats.visual_tokens_final == 4


@pytest.mark.parametrize("method", ["zipvl", "var"])
def test_attention_methods_run_on_a_video(qwen, method):
    video = make_video(seed=7)
    out = VLMAccelerator(*qwen, policy={"methods": [{"method": method}]}).generate(videos=[video], prompt=PROMPT,
                                                                                  max_new_tokens=3)
    assert out.stats.video_tokens_in == 8 and any(s["method"] == method for s in out.stats.stages)


def test_head_search_takes_video_samples(qwen):
    from vlmfast.search.heads import search_heads

    model, processor = qwen
    res = search_heads(model, processor, [([], PROMPT, [make_video(frames=4, size=112)])], block=16,
                       candidates=[Grid(stride="frame", local=16)])
    n_layers, n_heads = (model.config.get_text_config().num_hidden_layers,
                         model.config.get_text_config().num_attention_heads)
    assert len(res.patterns.layers) == n_layers and all(len(layer) == n_heads for layer in res.patterns.layers)


def test_video_with_llava_names_the_family(models):
    model, processor = models["llava"]
    acc = VLMAccelerator(model, processor, policy=None)
    with pytest.raises(InputError, match=r"LLaVA family has no video input; only .*Qwen2-VL"):
        acc.generate(videos=[make_video()], prompt=PROMPT)


@pytest.mark.parametrize("videos, match", [
    ([np.zeros((4, 56, 56), dtype="uint8")], r"videos\[0\]: expected a video.*shape \(4, 56, 56\)"),
    ([np.zeros((4, 56, 56, 5), dtype="uint8")], r"shape \(4, 56, 56, 5\)"),
    ([np.zeros((56, 56, 3), dtype="uint8")], r"one frame\?"),
    ([np.zeros((4, 56, 56, 3), dtype="float32")], r"uint8 pixel values.*float32"),
    ([torch.zeros(4, 3, 56, 56, dtype=torch.bfloat16)], r"uint8 pixel values.*bfloat16"),
    ([], r"empty list \(no video: leave videos=None\)"),
    ([[]], r"videos\[0\]: the video has no frames"),
    ([np.zeros((0, 56, 56, 3), dtype="uint8")], r"no frames"),
    ([make_image(0, size=56), make_image(1, size=56)], r"got Image.*wrap the frame list in a list"),
    ([[make_image(0, size=56), make_image(1, size=64)]], r"one size"),
    ("clip.mp4", r"expected a list of videos"),
    (["clip.mp4"], r"got str \(a path: vlmfast decodes no video files"),
], ids=["3d", "channels", "frame", "float", "bf16", "empty", "no-frames", "zero-frames", "unwrapped", "sizes", "str",
        "path"])
def test_bad_videos_are_clear_errors(qwen, videos, match):
    with pytest.raises(InputError, match=match):
        acc_for(qwen).generate(videos=videos, prompt=PROMPT)


def test_video_with_branch_methods_or_grounding_is_a_clear_error(qwen):
    with pytest.raises(InputError, match="decode-branch methods \\(damro\\)"):
        acc_for(qwen, [DAMRO(k=2)]).generate(videos=[make_video()], prompt=PROMPT)
    with pytest.raises(InputError, match="ground=True works on images only"):
        acc_for(qwen).generate(videos=[make_video()], prompt=PROMPT, ground=True)


def test_cli_generate_video_folder_and_glob(tmp_path, capsys):
    from vlmfast.cli import main

    for i, frame in enumerate(make_video()):
        Image.fromarray(frame).save(tmp_path / f"{i:03d}.png")
    for spec in (str(tmp_path), str(tmp_path / "*.png")):
        assert main(["generate", "--model", "tiny-random-qwen2-vl", "--policy", "none", "--video", spec,
                     "--prompt", PROMPT, "--max-new-tokens", "2"]) == 0
        assert "of which video" in capsys.readouterr().out
    assert main(["generate", "--model", "tiny-random-qwen2-vl", "--video", str(tmp_path / "none*.png"),
                 "--prompt", PROMPT]) == 2
    assert "no frame images found" in capsys.readouterr().err
    assert main(["generate", "--model", "tiny-random-llava", "--policy", "none", "--video", str(tmp_path),
                 "--prompt", PROMPT]) == 2
    assert "no video input; only LLaVA-OneVision" in capsys.readouterr().err
