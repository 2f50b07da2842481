"""The Gradio demo: its logic as plain Python, its API through gradio_client (8 concurrent requests, error
messages), and the page in headless Chromium (Debian's package driven by Playwright, no browser download).

``VLMFAST_SAVE_SCREENSHOT=1`` also writes the browser test's screenshot to docs/img/demo.png (the README's).
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vlmfast import InputError, PolicyError, VLMAccelerator
from vlmfast.datasets.shapes import generate_scene
from vlmfast.demo import engine as E
from vlmfast.demo import render
from vlmfast.policy import Policy, load_policy
from vlmfast.pruners import FastV, FoPru, n_keep

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("VLMFAST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MAX_NEW = 16
pytestmark = [  # pandas deprecations inside gradio's queue, not ours
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from a second thread on this busy 2-core machine; restore afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_has_demo_with_safe_defaults():
    from vlmfast.cli import build_parser

    a = build_parser().parse_args(["demo", "--port", "9999"])
    assert a.func.__name__ == "_demo" and a.port == 9999
    assert (a.host, a.model, a.policy) == ("127.0.0.1", E.DEFAULT_MODEL, "auto")


# -- pictures -------------------------------------------------------------------------------------------------
def test_shipped_examples_are_the_shapesworld_scenes():
    assert len(E.EXAMPLES) >= 3
    for seed, prompt in E.EXAMPLES:
        shipped = np.asarray(Image.open(E.example_path(seed)).convert("RGB"))
        assert np.array_equal(shipped, np.asarray(generate_scene(seed).image.convert("RGB"))), seed
        assert prompt.endswith("?")


def test_token_grid_overlay_darkens_exactly_the_dropped_cells():
    img = Image.new("RGB", (40, 20), (200, 200, 200))
    # a 2x2 grid over the box x in [10, 30): cells of 10x10 px; keep tokens 0 (top-left) and 3 (bottom-right)
    out = np.asarray(render.token_grid_overlay(img, (1, 2, 2), torch.tensor([0, 3]), box=(10, 0, 30, 20)))
    centre = {0: (4, 14), 1: (4, 24), 2: (14, 14), 3: (14, 24)}  # (row, col) pixel inside each cell, off the lines
    assert tuple(out[centre[0]]) == (200, 200, 200) and tuple(out[centre[3]]) == (200, 200, 200)
    for cell in (1, 2):
        assert out[centre[cell]].max() < 100
    outside = out[10, 3]  # left of the box: greyed, neither kept nor dropped
    assert 120 < outside[0] < 200
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        render.token_grid_overlay(img, (1, 2, 2), [4])


def test_side_by_side_puts_labelled_pictures_in_a_row():
    red, blue = Image.new("RGB", (10, 8), (255, 0, 0)), Image.new("RGB", (12, 6), (0, 0, 255))
    out = np.asarray(render.side_by_side([red, blue], ["base", "high-res"], gap=6))
    assert out.shape == (14 + 8, 10 + 6 + 12, 3)  # a 14 px label strip over the taller picture
    assert tuple(out[14, 0]) == (255, 0, 0) and tuple(out[21, 9]) == (255, 0, 0)
    assert tuple(out[14, 16]) == (0, 0, 255) and tuple(out[19, 27]) == (0, 0, 255)
    assert (out[14:, 10:16] == 255).all() and (out[20:, 16:] == 255).all()  # the gap, and below the shorter one
    assert (out[:14, :10] < 128).any() and (out[:14, 16:] < 128).any()  # each label's dark text


class FakeGrounding(SimpleNamespace):
    """vlmfast.grounding.Grounding's fields (the contract the demo reads)."""


def _fake_grounding(phrase="the red square", size=(30, 20), score=0.8, box=None):
    w, h = size
    heat = np.zeros((h, w), np.float32)
    heat[5:10, 5:10] = 1.0
    mask = np.zeros((h, w), bool)
    mask[4:11, 4:11] = True
    return FakeGrounding(phrase=phrase, image_index=0, heatmap=heat, points=np.array([[7.0, 7.0], [25.0, 15.0]]),
                         point_labels=np.array([1, 0]), box=box, mask=mask, score=score)


def test_grounding_layers_masks_heat_points_and_labels():
    img = Image.new("RGB", (30, 20), (128, 128, 128))
    g1, g2 = _fake_grounding(box=np.array([4, 4, 11, 11])), _fake_grounding("the blue circle", score=0.5)
    base, anns, colors = render.grounding_layers(img, [g1, g2, _fake_grounding(score=0.8)], mask_alpha=0.6)
    assert [label for _, label in anns] == ["the red square (0.80)", "the blue circle (0.50)",
                                            "the red square (0.80) #3"]
    assert set(colors) == {label for _, label in anns} and len(set(colors.values())) == 3
    m = anns[0][0]
    assert m.shape == (20, 30) and m.dtype == np.float32 and m.max() == pytest.approx(0.6) and (m > 0).sum() == 49
    arr = np.asarray(base).astype(int)
    assert arr[7, 7, 1] > arr[7, 7, 2]  # the positive point: a green dot
    assert abs(arr[0, 29] - 128).max() < 60 and abs(arr[17, 17] - 128).max() < 60  # cold pixels stay readable
    assert abs(arr[6, 9] - 128).max() > 60  # the hot region is coloured
    # nothing grounded: the plain image and no annotations
    base0, anns0, colors0 = render.grounding_layers(img, [])
    assert anns0 == [] and colors0 == {} and np.array_equal(np.asarray(base0), np.asarray(img))
    with pytest.raises(ValueError, match="does not match the image"):
        render.heat_overlay(img, [np.zeros((5, 5), np.float32)])


# -- knobs -> policy ------------------------------------------------------------------------------------------
def test_knobs_reproduce_and_edit_a_policy():
    shipped = load_policy("tiny-llava-shapes")
    k = E.knobs_of(shipped)
    assert (k.pruner, k.keep, k.hallucination) == ("fopru", 0.25, E.OFF)
    same, notes = E.apply_knobs(shipped, k.pruner, k.keep, k.hallucination)
    assert same is shipped and notes == []  # untouched knobs: the policy as it is
    pol, _ = E.apply_knobs(shipped, "fopru", 0.1, E.OFF)
    assert pol.methods == [FoPru(keep=0.1, strategy=shipped.methods[0].strategy)]
    pol, _ = E.apply_knobs(shipped, "fastv", 0.5, E.OFF)
    assert pol.methods == [FastV(keep=0.5)]
    assert E.apply_knobs(shipped, E.NONE, 0.5, E.OFF)[0].is_empty
    pol, notes = E.apply_knobs(shipped, "zipvl", 0.5, E.OFF)
    assert [m.method_name for m in pol.methods] == ["zipvl"] and "no 'keep'" in notes[0]
    two = Policy([FoPru(keep=0.5), FastV(layer=2, keep=0.5)])
    assert E.knobs_of(two).pruner == E.AS_POLICY
    kept, notes = E.apply_knobs(two, E.AS_POLICY, 0.1, E.OFF)
    assert kept.methods == two.methods and "not applied" in notes[0]
    with pytest.raises(PolicyError, match="keep"):
        E.apply_knobs(shipped, "fopru", 0.0, E.OFF)
    pruners, halluc = E.method_choices()
    assert {"fopru", "fastv", "visionzip"} <= set(pruners) and not set(pruners) & set(halluc)
    for name in halluc:  # whatever hallucination methods are registered switch on and off
        on, _ = E.apply_knobs(shipped, "fopru", 0.25, name)
        assert [m.method_name for m in on.methods] == ["fopru", name]
        assert E.knobs_of(on).hallucination == name
        assert E.apply_knobs(on, "fopru", 0.25, E.OFF)[0].methods == shipped.methods


# -- the engine on tiny random models (both families) ------------------------------------------------------------
@pytest.fixture
def tiny_engine(tiny):
    model, processor = tiny
    return E.DemoEngine(VLMAccelerator(model, processor, policy=None), "tiny", warmup=False)


def test_engine_answers_like_generate_with_the_models_grid(tiny_engine, tiny, family):
    model, processor = tiny
    img = Image.fromarray((np.random.default_rng(0).random((60, 90, 3)) * 255).astype("uint8"))
    policy = Policy([FoPru(keep=0.5)])
    res = tiny_engine.run(img, "what is in the image ?", policy, ground=False, max_new_tokens=4)
    n = sum(math.prod(v.grid) for v in res.views)
    assert n == res.full.output.stats.visual_tokens_in == res.tuned.output.stats.visual_tokens_in
    assert res.tuned.output.stats.visual_tokens_kept == n_keep(n, 0.5)
    for side, pol in ((res.full, None), (res.tuned, policy)):
        ref = VLMAccelerator(model, processor, policy=pol).generate([img], "what is in the image ?", max_new_tokens=4)
        assert side.output.token_ids == ref.token_ids
    overlay = np.asarray(res.token_overlay(res.tuned))
    if family == "llava_next":  # two views: the base grid over the whole image, the high-resolution one beside it
        (base, hires), kept = res.views, res.tuned.output.kept
        assert (base.label, base.grid, base.box) == ("base", (1, 8, 8), (0.0, 0.0, 90.0, 60.0))
        # 90 x 60 px: resized to 64 x 43 at y = 10 in the 64 x 64 canvas; unpadding keeps token rows 3..12
        assert (hires.label, hires.grid) == ("high-res", (1, 10, 16))
        assert hires.box == pytest.approx((0.0, 60 * 2 / 43, 90.0, 60 * 42 / 43))
        assert overlay.shape == (14 + 60, 90 + 6 + 90, 3)
        for x, v, k in ((0, base, kept[0]), (96, hires, kept[1])):
            assert np.array_equal(overlay[14:, x:x + 90], np.asarray(render.token_grid_overlay(img, v.grid, k, v.box)))
        assert [k.numel() for k in kept] == [32, 80]  # the image's 112 of 224, split by size
    elif len(res.views) > 1:  # OneVision: base + high-res; InternVL: its tiles + thumbnail; one panel each
        if family == "llava_onevision":
            assert [v.label for v in res.views] == ["base", "high-res"]
        kept = res.tuned.output.kept
        assert overlay.shape == (14 + 60, len(res.views) * 96 - 6, 3)
        for i, (v, k) in enumerate(zip(res.views, kept)):
            assert v.label
            assert np.array_equal(overlay[14:, 96 * i:96 * i + 90],
                                  np.asarray(render.token_grid_overlay(img, v.grid, k, v.box)))
    else:
        assert [v.label for v in res.views] == [""] and overlay.shape == (60, 90, 3)
        assert np.array_equal(overlay, np.asarray(render.token_grid_overlay(img, res.views[0].grid,
                                                                            res.tuned.output.kept[0],
                                                                            res.views[0].box)))
    assert res.speedup is not None and res.speedup > 0
    md = E.stats_markdown(res.tuned, res.full)
    assert f"{n_keep(n, 0.5)} / {n}" in md and "speed-up vs full" in md and "KV cache vs full" in md
    assert tiny_engine.accelerator(policy) is tiny_engine.accelerator(Policy([FoPru(keep=0.5)]))  # reused


@pytest.mark.parametrize("name, stem, family", [("Qwen/Qwen2.5-VL-7B-Instruct", "qwen2.5-vl-7b", "qwen2_5_vl"),
                                                ("Qwen/Qwen3-VL-8B-Instruct", "qwen3-vl-8b", "qwen3_vl"),
                                                ("llava-hf/llava-v1.6-mistral-7b-hf", "llava-v1.6-mistral-7b",
                                                 "llava_next")])
def test_the_demo_lists_and_defaults_to_the_newer_policies(models, name, stem, family):
    model, processor = models[family]
    engine = E.DemoEngine(VLMAccelerator(model, processor, policy=None), name, warmup=False)
    assert stem in engine.policy_choices() and engine._default_policy_name("auto") == stem
    img = Image.fromarray((np.random.default_rng(1).random((64, 96, 3)) * 255).astype("uint8"))
    res = engine.run(img, "what is in the image ?", engine.resolve_policy(stem), ground=False, max_new_tokens=3)
    n = sum(math.prod(v.grid) for v in res.views)  # LLaVA-NeXT: its two views
    assert len(res.views) == (2 if family == "llava_next" else 1)
    assert res.tuned.output.stats.visual_tokens_kept == n_keep(n, 0.25)


def test_the_demo_lists_and_defaults_to_the_onevision_policy(models):
    """A LLaVA-OneVision checkpoint's name picks its shipped policy in the dropdown (the token grid itself refuses
    multi-view images: test_engine_answers_like_generate_with_the_models_grid)."""
    model, processor = models["llava_onevision"]
    engine = E.DemoEngine(VLMAccelerator(model, processor, policy=None), "llava-hf/llava-onevision-qwen2-7b-ov-hf",
                          warmup=False)
    stem = "llava-onevision-qwen2-7b"
    assert stem in engine.policy_choices() and engine._default_policy_name("auto") == stem
    assert engine.resolve_policy(stem).methods == [FoPru(keep=0.25)]


def test_the_demo_lists_and_defaults_to_the_internvl3_policy(models):
    """InternVL3's shipped policy is in the list and the default for its hub id; an image of about one tile (no
    thumbnail: one token grid) runs with it."""
    model, processor = models["internvl"]
    engine = E.DemoEngine(VLMAccelerator(model, processor, policy=None), "OpenGVLab/InternVL3-8B-hf", warmup=False)
    assert "internvl3-8b" in engine.policy_choices() and engine._default_policy_name("auto") == "internvl3-8b"
    img = Image.fromarray((np.random.default_rng(1).random((40, 40, 3)) * 255).astype("uint8"))
    res = engine.run(img, "what is in the image ?", engine.resolve_policy("internvl3-8b"), ground=False,
                     max_new_tokens=3)
    assert [v.grid for v in res.views] == [(1, 4, 4)] and res.tuned.output.stats.visual_tokens_kept == n_keep(16, 0.25)


def test_engine_reads_a_16_bit_upload_by_its_range(tiny_engine, tmp_path):
    path = tmp_path / "g16.png"
    Image.fromarray(np.full((16, 16), 30000, dtype=np.uint16)).save(path)
    assert (np.asarray(tiny_engine.open_image(str(path))) == 117).all()  # 30000 / 257, not clipped to white
    with pytest.raises(InputError, match="mode F"):
        tiny_engine.open_image(Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)))


def test_uploaded_policies_cannot_probe_server_files(tiny_engine, tmp_path):
    """The same message whether the named file exists or not, before anything is opened; a trusted demo
    (--allow-policy-paths) passes the path on."""
    messages = []
    for target in ("/etc/hostname", "/no/such/file.pth"):
        path = tmp_path / "up.yaml"
        path.write_text(f"description: a/b test\nmodels: [org/model]\ngrounding:\n  sam_type: vit_b\n"
                        f"  sam_checkpoint: {target}\nmethods:\n  - method: mminference\n    heads: ../x.json\n")
        with pytest.raises(PolicyError) as err:
            tiny_engine.resolve_policy(E.UPLOADED, str(path))
        messages.append(str(err.value))
    assert messages[0] == messages[1]
    assert "names a file path (grounding.sam_checkpoint, methods[0].heads)" in messages[0]
    assert "--allow-policy-paths" in messages[0]
    tiny_engine.allow_policy_paths = True
    try:
        with pytest.raises(PolicyError, match="no such file|not a file|no file|x.json"):
            tiny_engine.resolve_policy(E.UPLOADED, str(path))
    finally:
        tiny_engine.allow_policy_paths = False
    ok = tmp_path / "ok.yaml"
    ok.write_text("description: FoPru 25%/layer\nmodels: [llava-hf/*]\nmethods:\n  - method: fopru\n    keep: 0.25\n")
    assert tiny_engine.resolve_policy(E.UPLOADED, str(ok)).methods[0].keep == 0.25


def test_engine_errors_are_clear_messages(tiny_engine, tmp_path):
    img = Image.new("RGB", (64, 64), (10, 20, 30))
    none = Policy()
    with pytest.raises(InputError, match="prompt is empty"):
        tiny_engine.run(img, "  ", none)
    with pytest.raises(InputError, match="no image"):
        tiny_engine.run(None, "q ?", none)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(InputError, match="not an image this demo can read"):
        tiny_engine.run(str(text), "q ?", none)
    tiny_engine.max_pixels = 64 * 64 - 1
    with pytest.raises(InputError, match=r"too large: 64x64 .* limit"):
        tiny_engine.run(img, "q ?", none)
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods: [\n  - method: fopru\n")
    with pytest.raises(PolicyError, match="not valid YAML"):
        tiny_engine.resolve_policy(E.UPLOADED, str(bad))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("methods:\n  - method: nosuchmethod\n")
    with pytest.raises(PolicyError, match="unknown method 'nosuchmethod'"):
        tiny_engine.resolve_policy(E.UPLOADED, str(unknown))
    with pytest.raises(PolicyError, match="no YAML file was uploaded"):
        tiny_engine.resolve_policy(E.UPLOADED, None)


# -- the embedded default through the real app ------------------------------------------------------------------
@pytest.fixture(scope="module")
def shapes_engine():
    return E.DemoEngine.load(E.DEFAULT_MODEL)


def test_default_engine_grounds_when_grounding_is_available(shapes_engine):
    """The masks the page shows come from ``generate(..., ground=True)``: one per grounded phrase, on the image."""
    if not shapes_engine.can_ground:
        pytest.skip("grounding (VLMAccelerator.generate(ground=True)) is not in this vlmfast build yet")
    policy = load_policy("tiny-llava-shapes")
    seed, prompt = E.EXAMPLES[0]  # "what objects are in the image ?": the answer names objects
    res = shapes_engine.run(str(E.example_path(seed)), prompt, policy, max_new_tokens=MAX_NEW)
    for side in (res.full, res.tuned):
        assert side.grounding, f"{side.title}: nothing grounded for {side.output.text!r}"
        base, anns, colors = res.grounding_view(side)
        assert base.size == res.image.size and len(anns) == len(side.grounding) == len(colors)
        for (mask, label), g in zip(anns, side.grounding):
            assert mask.shape == (res.image.height, res.image.width) and mask.max() > 0
            assert label.startswith(g.phrase)
    if shapes_engine.can_ground_phrases:  # a phrase of the prompt, grounded whatever the answer says
        seed, prompt = E.EXAMPLES[1]  # "what colour is the hexagon ?"
        res = shapes_engine.run(str(E.example_path(seed)), prompt, policy, max_new_tokens=MAX_NEW,
                                phrases="the hexagon")
        assert "the hexagon" in [g.phrase for g in res.tuned.grounding]
    with pytest.raises(InputError, match="does not occur in the prompt"):  # reported, not ignored
        shapes_engine.run(str(E.example_path(seed)), prompt, policy, max_new_tokens=2, phrases="a unicorn")


@pytest.fixture(scope="module")
def served(shapes_engine):
    """The app on a free local port, in this process (so answers can be checked against the same model)."""
    from vlmfast.demo.app import build_demo, launch

    demo = build_demo(shapes_engine)
    port = free_port()
    launch(demo, "127.0.0.1", port, block=False, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def _api_args(image: str, prompt: str, policy: str = "tiny-llava-shapes", pruner: str = "fopru", keep: float = 0.25,
              yaml=None, ground: bool = True):
    from gradio_client import handle_file

    return (handle_file(image), prompt, policy, yaml, pruner, keep, E.OFF, ground, "", MAX_NEW)


@pytest.mark.slow
def test_eight_concurrent_requests_get_their_own_answers(served, shapes_engine):
    from gradio_client import Client

    jobs = []  # (image, prompt, pruner, keep): different questions, so answers swapped between requests show
    for i, (seed, prompt) in enumerate(E.EXAMPLES):
        jobs.append((str(E.example_path(seed)), prompt, "fopru", 0.25))
        jobs.append((str(E.example_path(seed)), E.EXAMPLES[(i + 1) % len(E.EXAMPLES)][1], "fastv", 0.5))
    expected = []
    model, processor = shapes_engine.acc.model, shapes_engine.acc.processor
    for image, prompt, pruner, keep in jobs:
        pol = E.apply_knobs(load_policy("tiny-llava-shapes"), pruner, keep, E.OFF)[0]
        img = Image.open(image).convert("RGB")
        expected.append(tuple(VLMAccelerator(model, processor, policy=p).generate([img], prompt,
                                                                                   max_new_tokens=MAX_NEW).text
                              for p in (None, pol)))
    client = Client(served, verbose=False, analytics_enabled=False, httpx_kwargs={"timeout": 120})
    futures = [client.submit(*_api_args(image, prompt, pruner=pruner, keep=keep), api_name="/run")
               for image, prompt, pruner, keep in jobs]
    deadline = time.time() + 300
    while not all(f.done() for f in futures):
        assert time.time() < deadline, f"{sum(not f.done() for f in futures)} of 8 requests did not finish in 300 s"
        time.sleep(0.2)
    for (_image, prompt, pruner, keep), fut, (want_full, want_policy) in zip(jobs, futures, expected):
        out = fut.result()
        assert len(out) == 9
        assert (out[0], out[4]) == (want_full, want_policy), (prompt, pruner)
        n = n_keep(144, keep)
        assert f"| visual tokens into the LLM | {n if pruner == 'fopru' else 144} / 144 |" in out[5]
        assert Path(out[2]).is_file() and Path(out[6]).is_file()  # the token-grid pictures
        masks = out[7]["value"] if "value" in out[7] else out[7]
        assert Path(masks["image"]).is_file()
        if shapes_engine.can_ground and prompt == E.EXAMPLES[0][1]:
            assert masks["annotations"], f"no grounding mask for {want_policy!r}"


def test_errors_come_back_as_messages_and_the_app_lives_on(served, tmp_path, capfd):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(served, verbose=False, analytics_enabled=False, httpx_kwargs={"timeout": 120})
    example = str(E.example_path(E.EXAMPLES[1][0]))
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods: [\n  - method: fopru\n")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("methods:\n  - method: nosuch\n")
    cases = [
        (_api_args(example, "q ?", policy=E.UPLOADED, yaml=handle_file(str(bad))), "not valid YAML"),
        (_api_args(example, "q ?", policy=E.UPLOADED, yaml=handle_file(str(unknown))), "unknown method 'nosuch'"),
        (_api_args(example, "q ?", keep=0.0), r"fopru\)\.keep: Input should be greater than 0"),
        (_api_args(str(ROOT / "pyproject.toml"), "q ?"), "is not an image this demo can read"),
        (_api_args(example, "   "), "prompt is empty"),
    ]
    huge = tmp_path / "huge.png"
    Image.new("RGB", (8000, 6000)).save(huge)  # 48 MP > the 40 MP limit; checked from the header
    cases.append((_api_args(str(huge), "q ?"), "too large"))
    for args, message in cases:
        with pytest.raises(AppError, match=message) as err:
            client.predict(*args, api_name="/run")
        assert "Traceback" not in str(err.value)
    out = client.predict(*_api_args(example, E.EXAMPLES[1][1], ground=False), api_name="/run")
    assert out[0] and out[4]  # still serving
    server_log = capfd.readouterr().err
    assert "Traceback" not in server_log  # a visitor's mistake is their message, not a traceback in the server log


# -- the page in a real browser ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_browser_end_to_end(tmp_path):
    """``vlmfast demo`` in a subprocess, driven by headless Chromium: upload an example, run, wait for the
    answers, check the answer text and the mask image are shown, and that a bad policy YAML is a message."""
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium; .ci/run does this)")
    from playwright.sync_api import sync_playwright

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "vlmfast", "demo", "--port", str(port)], cwd=ROOT, env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 180
        while True:
            assert server.poll() is None, f"vlmfast demo exited: {(tmp_path / 'server.log').read_text()[-3000:]}"
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "vlmfast demo did not answer within 180 s"
                time.sleep(0.5)
        seed, prompt = E.EXAMPLES[0]
        with sync_playwright() as p:
            ctx = p.chromium.launch_persistent_context(
                tempfile.mkdtemp(dir=tmp_path, prefix="chromium-profile-"), executable_path=CHROMIUM,
                headless=True, args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 1000})
            page = ctx.new_page()
            page.set_default_timeout(120_000)  # generous: CI machines can be busy; nothing here is timed
            external = []
            page.on("request", lambda r: external.append(r.url)
                    if not r.url.startswith((f"http://127.0.0.1:{port}", "data:", "blob:")) else None)
            page.goto(url, wait_until="networkidle")
            page.locator("#input-image input[type=file]").set_input_files(str(E.example_path(seed)))
            page.locator("#prompt textarea").fill(prompt)
            page.locator("#run").click()
            page.wait_for_function("() => { const t = document.querySelector('#answer-policy textarea');"
                                   " return t && t.value.length > 0; }", timeout=120_000)
            answers = [page.locator(f"#answer-{k} textarea").input_value() for k in ("full", "policy")]
            assert all(a.strip() for a in answers), answers
            assert "visual tokens into the LLM" in page.locator("#stats-policy").inner_text()
            for key in ("full", "policy"):
                page.locator(f"#tokens-{key} img").first.wait_for(state="visible")
                page.locator(f"#masks-{key} img.base-image").wait_for(state="visible")
            grounding = "Grounding not available" not in page.locator("body").inner_text()
            if grounding:  # the masks are drawn: one mask layer and one legend entry per grounded phrase
                page.locator("#masks-policy img.mask").first.wait_for(state="visible")
                legend = page.locator("#masks-policy .legend-item").all_inner_texts()
                assert legend, "no grounded phrase in the legend"
            page.wait_for_timeout(300)
            shot = tmp_path / "demo.png"
            page.screenshot(path=str(shot), full_page=True)
            if os.environ.get("VLMFAST_SAVE_SCREENSHOT") == "1":
                (ROOT / "docs" / "img").mkdir(parents=True, exist_ok=True)
                shutil.copyfile(shot, ROOT / "docs" / "img" / "demo.png")
            # a broken policy file is a message in the page, and the page keeps working
            bad = tmp_path / "bad.yaml"
            bad.write_text("methods: [\n  - method: fopru\n")
            page.locator("input[type=file][accept*='.yaml']").set_input_files(str(bad))
            page.get_by_text("not valid YAML").first.wait_for(state="visible")
            assert "Traceback" not in page.locator("body").inner_text()
            ctx.close()
        assert not external, f"the page reached outside the machine: {external[:5]}"
        assert shot.stat().st_size > 10_000
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def test_gradio_picture_cache_is_never_seen_half_written(tmp_path):
    """Concurrent requests that return the same picture write the same cache file; a reader must always see it
    whole (Gradio's own save_pil_to_cache truncates and rewrites it: the server then fails the download)."""
    import threading

    from vlmfast.demo.app import _gradio

    _gradio()
    from gradio import processing_utils as pu

    assert getattr(pu.save_pil_to_cache, "vlmfast_atomic", False)
    img = Image.fromarray((np.random.default_rng(0).random((768, 768, 3)) * 255).astype(np.uint8))  # ~1.7 MB
    size = len(pu.encode_pil_to_bytes(img, "png"))
    path = Path(pu.save_pil_to_cache(img, str(tmp_path), format="png"))
    assert path.stat().st_size == size and path.read_bytes() == pu.encode_pil_to_bytes(img, "png")
    inode = path.stat().st_ino
    stop, sizes = threading.Event(), []

    def writer():
        while not stop.is_set():
            pu.save_pil_to_cache(img, str(tmp_path), format="png")

    threads = [threading.Thread(target=writer) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            sizes.append(path.stat().st_size)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert set(sizes) == {size}
    assert path.stat().st_ino == inode  # an existing picture is not rewritten
