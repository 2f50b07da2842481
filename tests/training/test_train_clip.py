"""tiny-clip-shapes: the committed weights load by name offline, the matcher's dense maps, and the training script
(a few steps, deterministic by seed, resumable). CPU only, seconds."""

from __future__ import annotations

import json

import pytest
import torch

from training.train_clip import main, soft_clip_loss
from vlmfast.datasets.shapes import generate_scene, split_seeds
from vlmfast.eval.clip import _auc
from vlmfast.zoo import SHIPPED, resolve
from vlmfast.zoo.clip import (
    EOT,
    PAD,
    SOT,
    UNK,
    WEIGHTS_DIR,
    ClipMatcher,
    TinyClipConfig,
    WordTokenizer,
    build_tiny_clip,
    load_clip,
)

pytest.importorskip("open_clip")

@pytest.fixture(autouse=True)
def _restore_threads():
    """train_clip.main sets torch's thread count (--threads); put it back for the other tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


SMALL = "vision_layers=1,text_layers=1,vision_width=32,text_width=32,embed_dim=16,vision_head_width=16,text_heads=2"


def test_tokenizer_known_answer():
    tok = WordTokenizer(["<pad>", "<sot>", "<eot>", "<unk>", "red", "circle", "?"], context_length=6)
    ids = tok(["red circle ?", "Red  zebra", "red red red red red"])
    assert ids[0].tolist() == [SOT, 4, 5, 6, EOT, PAD]
    assert ids[1].tolist() == [SOT, 4, UNK, EOT, PAD, PAD]
    assert ids[2].tolist() == [SOT, 4, 4, 4, 4, EOT]  # truncated, <eot> kept


def test_avg_pool_patch_embeddings_average_to_the_image_embedding():
    torch.manual_seed(0)
    cfg = TinyClipConfig(vision_layers=1, text_layers=1, vision_width=32, text_width=32, embed_dim=16,
                         vision_head_width=16, text_heads=2)
    model = build_tiny_clip(cfg).eval()
    m = ClipMatcher(model, WordTokenizer(cfg.vocab, cfg.context_length), cfg.image_size, cfg.mean, cfg.std)
    px = m.preprocess([generate_scene(split_seeds("dev", 1)[0]).image])
    with torch.no_grad():
        torch.testing.assert_close(m.patch_embeddings(px).mean(1), model.encode_image(px), atol=1e-5, rtol=1e-4)
    sims, maps = m.match([generate_scene(1).image] * 2, ["red circle", "blue star"])
    assert sims.shape == (2,) and maps.shape == (2, cfg.grid, cfg.grid)
    assert maps.abs().max() <= 1 + 1e-5


def test_cls_pool_uses_value_value_attention():
    import open_clip

    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=16, vision_cfg={"image_size": 32, "patch_size": 8, "width": 32, "layers": 2,
                                                     "head_width": 16, "pool_type": "tok"},
                           text_cfg={"context_length": 8, "vocab_size": 10, "width": 32, "heads": 2, "layers": 1})
    m = ClipMatcher(model, lambda texts: torch.randint(1, 10, (len(texts), 8)), 32, (0.5,) * 3, (0.25,) * 3)
    _, maps = m.match([generate_scene(2).image], ["x"])
    assert maps.shape == (1, 4, 4) and torch.isfinite(maps).all()


def test_soft_clip_loss_and_auc_known_answers():
    img = torch.eye(3)
    pos = torch.eye(3, dtype=torch.bool)
    loss, logits = soft_clip_loss(img, img, torch.tensor(0.0), pos)  # scale 1: logits = identity
    expected = -torch.log_softmax(torch.eye(3), 1)[0, 0]
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert _auc([0.9, 0.8], [0.1, 0.2]) == 1.0 and _auc([0.5], [0.5]) == 0.5 and _auc([0.1], [0.9]) == 0.0


def test_committed_weights_load_by_name_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "tiny-clip-shapes" in SHIPPED and resolve("tiny-clip-shapes") == str(WEIGHTS_DIR)
    assert (WEIGHTS_DIR / "model.safetensors").stat().st_size < 5 * 2**20
    assert (WEIGHTS_DIR / "MODEL_CARD.md").is_file()
    m = load_clip("tiny-clip-shapes")
    assert not m.model.training and all(p.dtype == torch.float32 for p in m.model.parameters())
    scene = generate_scene(split_seeds("test", 1)[0])
    names = sorted({f"{o.color} {o.shape}" for o in scene.objects})
    sims, maps = m.match([scene.image] * len(names), names)
    assert maps.shape[1:] == (TinyClipConfig().grid,) * 2 and torch.isfinite(sims).all()


def test_training_few_steps_deterministic_and_resumable(tmp_path):
    args = ["--steps", "2", "--batch", "6", "--eval-every", "0", "--final-scenes", "4", "--warmup", "1",
            "--config", SMALL, "--seed", "3"]
    assert main(["--out", str(tmp_path / "a"), *args]) == 0
    assert main(["--out", str(tmp_path / "b"), *args]) == 0
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model.safetensors").read_bytes()  # deterministic by seed
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and {"retrieval_i2t", "pointing", "object_auc"} <= set(metrics["dev"])
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["vision_width"] == 32 and load_clip(str(tmp_path / "a")).image_size == cfg["image_size"]
    # a zero-minute budget stops before the first step (checkpoint only); --resume then runs to the end and gives
    # the same weights as an uninterrupted run (the data is a function of the seed and the step)
    three = ["--steps", "3", "--batch", "6", "--eval-every", "0", "--final-scenes", "0", "--warmup", "1",
             "--config", SMALL]
    assert main(["--out", str(tmp_path / "c"), *three, "--minutes", "0"]) == 0
    assert not (tmp_path / "c" / "model.safetensors").exists() and (tmp_path / "c" / "checkpoint.pt").exists()
    assert main(["--out", str(tmp_path / "c"), "--resume", *three]) == 0
    ckpt = torch.load(tmp_path / "c" / "checkpoint.pt", map_location="cpu", weights_only=True)  # plain contents
    assert ckpt["step"] == 3 and ckpt["args"]["steps"] == 3 and ckpt["config"]["vision_width"] == 32
    log = [json.loads(x) for x in (tmp_path / "c" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert main(["--out", str(tmp_path / "d"), *three]) == 0
    assert (tmp_path / "c" / "model.safetensors").read_bytes() == (tmp_path / "d" / "model.safetensors").read_bytes()
