"""tiny-sam-shapes: offline loading, SamPredictor compatibility, a quick accuracy bound, the centre-point
helper and the training script (a few steps + resume). CPU only, well under 30 s."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from training.train_sam import evaluate
from vlmfast.datasets.shapes import generate_scene, split_seeds
from vlmfast.zoo.sam import (
    DEFAULT_WEIGHTS,
    NAMES,
    TinySamConfig,
    build_tiny_sam,
    center_point,
    load_sam,
    load_tiny_sam,
    tiny_sam_config,
)

segment_anything = pytest.importorskip("segment_anything")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny model gains nothing from more threads, and on a busy 2-core machine 2 OpenMP threads make
    the 10-scene evaluation ~50x slower (0.6 s vs 40 s); restore the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sam():
    return load_sam("tiny-sam-shapes")


def test_committed_weights_are_small_and_match_config():
    assert DEFAULT_WEIGHTS.is_file(), "the committed tiny-sam-shapes weights are missing"
    assert DEFAULT_WEIGHTS.stat().st_size < 10 * 2**20
    cfg = TinySamConfig.from_dict(json.loads((DEFAULT_WEIGHTS.parent / "config.json").read_text()))
    assert (DEFAULT_WEIGHTS.parent / "MODEL_CARD.md").is_file()
    assert cfg == tiny_sam_config()  # the card's sizes are the defaults
    assert "tiny-sam-shapes" in NAMES


def test_load_by_name_offline_and_predictor_runs(sam, monkeypatch):
    from segment_anything import SamPredictor
    from segment_anything.modeling import Sam

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert isinstance(sam, Sam) and not sam.training
    assert all(p.dtype == torch.float32 for p in sam.parameters())
    assert load_tiny_sam(DEFAULT_WEIGHTS.parent).image_encoder.img_size == sam.image_encoder.img_size
    scene = generate_scene(split_seeds("test", 1)[0], 336)
    predictor = SamPredictor(sam)  # ResizeLongestSide(img_size), unchanged
    predictor.set_image(np.asarray(scene.image))
    assert predictor.input_size == (sam.image_encoder.img_size,) * 2
    obj = scene.objects[0]
    masks, scores, low_res = predictor.predict(point_coords=np.array([center_point(obj.mask)]),
                                               point_labels=np.array([1]), multimask_output=False)
    assert masks.shape == (1, 336, 336) and masks.dtype == bool and scores.shape == (1,)
    assert low_res.shape[-2:] == (4 * sam.prompt_encoder.image_embedding_size[0],) * 2
    masks3, scores3, _ = predictor.predict(box=np.array(obj.bbox), multimask_output=True)
    assert masks3.shape == (3, 336, 336) and scores3.shape == (3,)


def test_committed_model_segments_test_scenes_from_centre_points(sam):
    result = evaluate(sam, 10, split="test")
    assert result["n_objects"] >= 30
    assert result["point"] >= 0.75, result
    assert result["box"] >= 0.75, result


def test_load_errors_on_missing_weights(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tiny_sam(tmp_path / "nope.safetensors")


# --------------------------------------------------------------------------- center_point


def _inside(mask: np.ndarray, pt: tuple[float, float]) -> bool:
    x, y = int(np.floor(pt[0])), int(np.floor(pt[1]))
    return 0 <= x < mask.shape[1] and 0 <= y < mask.shape[0] and bool(mask[y, x])


def test_center_point_is_the_centroid_for_convex_masks():
    scene = generate_scene(split_seeds("test", 1)[0], 336)
    for obj in scene.objects:
        pt = center_point(obj.mask)
        assert _inside(obj.mask, pt)
        if _inside(obj.mask, obj.center):
            assert pt == pytest.approx(obj.center)


def test_center_point_for_c_shaped_and_occluded_masks():
    yy, xx = np.mgrid[:100, :100]
    r = np.hypot(xx + 0.5 - 50, yy + 0.5 - 50)
    c_shape = (r >= 25) & (r < 40) & ~((xx > 50) & (np.abs(yy + 0.5 - 50) < 12))  # ring open to the right
    cx, cy = xx[c_shape].mean() + 0.5, yy[c_shape].mean() + 0.5
    assert not _inside(c_shape, (cx, cy))  # the centroid falls in the hole
    pt = center_point(c_shape)
    assert _inside(c_shape, pt)
    d = np.hypot(xx[c_shape] + 0.5 - cx, yy[c_shape] + 0.5 - cy).min()
    assert np.hypot(pt[0] - cx, pt[1] - cy) == pytest.approx(d)  # the nearest mask pixel's centre

    occluded = np.zeros((60, 60), bool)  # a square with its middle covered by another object
    occluded[10:50, 10:50] = True
    occluded[20:40, 15:45] = False
    assert _inside(occluded, center_point(occluded))
    with pytest.raises(ValueError):
        center_point(np.zeros((5, 5), bool))


# --------------------------------------------------------------------------- training script


def _train(out: Path, capsys, *extra: str) -> str:
    """Run the training script's ``main`` in-process (saves ~5 s of imports per run); returns its stderr."""
    from training.train_sam import main

    threads = torch.get_num_threads()
    try:
        rc = main(["--out", str(out), "--minutes", "2", "--seed", "0", "--images", "1", "--prompts", "2",
                   "--ckpt-every", "2", "--eval-every", "3", "--eval-scenes", "1", "--test-scenes", "1", "--config",
                   "embed_dim=32,depth=1,out_chans=32,decoder_mlp_dim=64,decoder_depth=1,iou_head_hidden_dim=32",
                   *extra])
    finally:
        torch.set_num_threads(threads)  # main() sets --threads (1)
    err = capsys.readouterr().err
    assert rc == 0, err[-3000:]
    return err


def test_train_script_runs_checkpoints_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    _train(out, capsys, "--steps", "3")
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 3 and {"model", "optimizer", "rng"} <= set(ckpt)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert json.loads((out / "metrics.json").read_text())["test"]["n_objects"] > 0
    before = load_tiny_sam(out).state_dict()

    err = _train(out, capsys, "--steps", "5", "--resume")
    assert "resumed" in err and "at step 3" in err
    assert torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["step"] == 5
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    after = load_tiny_sam(out).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_training_batches_depend_only_on_seed_and_step():
    from segment_anything.utils.transforms import ResizeLongestSide

    from training.train_sam import sample_batch

    t = ResizeLongestSide(256)
    a, b = sample_batch(0, 7, 2, 3, 256, t), sample_batch(0, 7, 2, 3, 256, t)
    assert [x["seed"] for x in a] == [x["seed"] for x in b]
    assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, b))
    assert all(s >= 0 and s < 10_000_000 for s in (x["seed"] for x in a))  # train split only
    for x in a:
        assert x["image"].shape == (256, 256, 3) and x["targets"].shape[1:] == (256, 256)
        assert len(x["prompts"]) == 3


def test_build_tiny_sam_is_a_plain_sam():
    from segment_anything.modeling import Sam

    cfg = tiny_sam_config()
    model = build_tiny_sam(cfg)
    assert isinstance(model, Sam)
    assert model.prompt_encoder.image_embedding_size == (cfg.img_size // 16,) * 2
    assert list(model.pixel_mean.flatten().tolist()) == pytest.approx([123.675, 116.28, 103.53])
