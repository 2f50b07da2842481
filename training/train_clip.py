"""Train ``tiny-clip-shapes``: a tiny open_clip CLIP on ShapesWorld image-text pairs (CPU, minutes).

    python -m training.train_clip --out /tmp/tiny-clip --minutes 20 --seed 0 --steps 500 [--resume]

Each step draws ``--batch`` train-split scenes (scene seeds from ``numpy.random.default_rng((seed, step))``, so
the data is a function of the seed and the step alone), renders each at 96 or 192 px and resizes it to the
model input with the same :func:`~vlmfast.zoo.clip.preprocess` the matcher uses. Each image is paired with one
text: its canonical caption (40%), the name of one of its objects, ``"<colour> <shape>"`` (40%), or one
attribute word, a colour or a shape it contains (20%). Several texts of a batch can be true of the same image
(two scenes with a red circle), so the loss is CLIP's symmetric cross-entropy with *soft* targets: every
(image, text) pair whose text holds for the image (known exactly from the ground truth) is a positive, weighted
uniformly. AdamW, linear warm-up, cosine decay; open_clip's learnable temperature.

``--steps`` fixes the schedule (and so the result, given ``--seed``); ``--minutes`` caps the wall clock of one
invocation: ``checkpoint.pt`` (model, optimizer, step, RNG states) is saved every ``--ckpt-every`` steps and when
it stops, and ``--resume`` continues from it. At the end it writes ``model.safetensors`` (fp16) + ``config.json``
(loadable by :func:`~vlmfast.zoo.clip.load_clip`) and the dev metrics into ``metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np

from training.harness import Run, adamw, add_optim_args, add_run_args, lr_at, optimizer_step, parse_overrides, set_lr
from vlmfast.datasets.shapes import SPLIT_SIZE, VOCABULARY, caption, generate_scene, split_seeds
from vlmfast.eval.clip import evaluate
from vlmfast.zoo.clip import (
    SPECIALS,
    ClipMatcher,
    TinyClipConfig,
    WordTokenizer,
    build_tiny_clip,
    preprocess,
    save_tiny_clip,
)

RENDER_SIZES = (96, 192)


# --------------------------------------------------------------------------- data


def _holds(kind: str, value, scene_objects: set[tuple[str, str]], scene_caption: str) -> bool:
    """Is a text of this kind true of a scene?"""
    if kind == "caption":
        return value == scene_caption
    if kind == "object":
        return value in scene_objects
    if kind == "color":
        return any(c == value for c, _ in scene_objects)
    return any(s == value for _, s in scene_objects)  # "shape"


def sample_batch(seed: int, step: int, n: int, cfg: TinyClipConfig) -> tuple:
    """(pixels (n, 3, S, S), texts [n], positives (n images, n texts) bool) for one step."""
    import torch

    rng = np.random.default_rng((seed, step))
    images, texts, truths = [], [], []
    for _ in range(n):
        scene = generate_scene(int(split_seeds("train", 1, start=int(rng.integers(SPLIT_SIZE)))[0]),
                               int(rng.choice(RENDER_SIZES)))
        objs = {(o.color, o.shape) for o in scene.objects}
        cap = caption(scene)
        u = rng.random()
        if u < 0.4:
            kind, value, text = "caption", cap, cap
        elif u < 0.8:
            c, s = sorted(objs)[int(rng.integers(len(objs)))]
            kind, value, text = "object", (c, s), f"{c} {s}"
        else:
            c, s = sorted(objs)[int(rng.integers(len(objs)))]
            kind, value = ("color", c) if rng.random() < 0.5 else ("shape", s)
            text = value
        images.append(scene.image)
        texts.append(text)
        truths.append((objs, cap, kind, value))
    pos = torch.tensor([[_holds(t[2], t[3], i[0], i[1]) for t in truths] for i in truths])
    return preprocess(images, cfg.image_size, cfg.mean, cfg.std), texts, pos


def soft_clip_loss(img, txt, logit_scale, pos):
    """Symmetric cross-entropy of CLIP with soft targets spread uniformly over the positives."""
    import torch.nn.functional as F

    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    logits = logit_scale.exp() * img @ txt.T
    p = pos.float()
    i2t = -(F.log_softmax(logits, 1) * p / p.sum(1, keepdim=True)).sum(1).mean()
    t2i = -(F.log_softmax(logits.T, 1) * p.T / p.T.sum(1, keepdim=True)).sum(1).mean()
    return (i2t + t2i) / 2, logits


# --------------------------------------------------------------------------- command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.train_clip", description=__doc__.split("\n")[0])
    add_run_args(p, minutes=20.0, steps=500)
    p.add_argument("--batch", type=int, default=64, help="image-text pairs per step")
    add_optim_args(p, lr=1e-3, warmup=60, weight_decay=0.1, eval_every=150, eval_scenes=50)
    p.add_argument("--final-scenes", type=int, default=200, help="dev scenes for the final evaluation (0: none)")
    p.add_argument("--config", default="", help="size overrides, e.g. 'vision_layers=2,text_layers=1'")
    return p.parse_args(argv)


def shapes_vocab() -> tuple[str, ...]:
    """The tokenizer's words: the specials, then ShapesWorld's closed vocabulary."""
    return SPECIALS + tuple(w for w in VOCABULARY if w not in SPECIALS)


def _config_from(text: str) -> TinyClipConfig:
    return TinyClipConfig.from_dict({**TinyClipConfig(vocab=shapes_vocab()).to_dict(), **parse_overrides(text)})


def main(argv=None) -> int:
    import torch
    from tqdm import tqdm

    args = parse_args(argv)
    run = Run(args)
    ckpt = run.load() if args.resume else None
    if args.resume and ckpt is None:
        return 2
    cfg = TinyClipConfig.from_dict(ckpt["config"]) if ckpt is not None else _config_from(args.config)
    torch.manual_seed(args.seed)
    model = build_tiny_clip(cfg)
    tokenizer = WordTokenizer(cfg.vocab, cfg.context_length)
    opt = adamw(model.named_parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.98),
                decays=lambda n, p: p.ndim >= 2 and "embedding" not in n)
    run.begin(model, opt, ckpt)
    model.train()

    def matcher() -> ClipMatcher:
        return ClipMatcher(model, tokenizer, cfg.image_size, cfg.mean, cfg.std)

    bar = tqdm(total=args.steps, initial=run.step, desc="tiny-clip", mininterval=5, dynamic_ncols=True)
    while run.next_step():
        lr = set_lr(opt, lr_at(run.step, args.steps, args.lr, args.warmup))
        pixels, texts, pos = sample_batch(args.seed, run.step, args.batch, cfg)
        img = model.encode_image(pixels)
        txt = model.encode_text(tokenizer(texts))
        loss, logits = soft_clip_loss(img, txt, model.logit_scale, pos)
        optimizer_step(opt, loss, model.parameters(), args.clip)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        run.step += 1
        bar.update(1)
        acc = float((pos[torch.arange(len(texts)), logits.argmax(1)]).float().mean())
        record = {"step": run.step, "lr": lr, "loss": round(float(loss.detach()), 5), "train_i2t": round(acc, 4),
                  "scale": round(float(model.logit_scale.detach().exp()), 2), "elapsed_s": round(run.elapsed(), 1)}
        if run.eval_due():
            model.eval()
            dev = evaluate(matcher(), args.eval_scenes, split="dev")
            model.train()
            record.update({f"dev_{k}": round(v, 4) for k, v in dev.items() if isinstance(v, float)})
            run.log.append(record)
            bar.write(json.dumps(record))
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}", acc=f"{acc:.2f}", lr=f"{lr:.1e}", refresh=False)
        run.end_step(record, model, opt, cfg)
    bar.close()
    if not run.finish(model, opt, cfg):
        return 0
    model.eval()
    save_tiny_clip(model, cfg, run.out)
    metrics = {"steps": run.step, "train_minutes": round(run.elapsed() / 60, 2), "seed": args.seed,
               "batch": args.batch}
    if args.final_scenes > 0:
        from vlmfast.zoo.clip import load_clip

        metrics["dev"] = evaluate(load_clip(str(run.out)), args.final_scenes, split="dev")  # the saved (fp16) weights
    (run.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
