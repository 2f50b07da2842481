"""Train ``tiny-sam-shapes``: a tiny Segment Anything on ShapesWorld (CPU, minutes).

    python -m training.train_sam --out /tmp/tiny-sam --minutes 60 --seed 0 --steps 2800 [--resume]

Each step takes ``--images`` train-split scenes (scene seeds drawn from ``numpy.random.default_rng((seed,
step))``, so the data order is a function of the seed and the step alone) and ``--prompts`` prompts per
image, sampled like SAM training: one positive point (the :func:`~vlmfast.zoo.sam.center_point` half the
time, else a uniform point inside the mask), sometimes with a second positive or negative point, and
sometimes a box (the bbox with small jitter) instead. Scenes are rendered at 256-448 px and resized to the
model input with the same ``ResizeLongestSide`` as :class:`segment_anything.SamPredictor`; targets are the
exact masks of the same layout rendered at the input size. Loss: SAM's 20:1 focal + dice on the mask
logits (bilinearly upsampled to the input size, as ``Sam.postprocess_masks`` does) for output 0 plus the
best of outputs 1-3, and MSE between predicted and actual IoU. AdamW, linear warmup, cosine decay.

``--steps`` fixes the schedule (and so the result, given ``--seed``); ``--minutes`` caps the wall clock of
one invocation: the script saves ``checkpoint.pt`` (model, optimizer, step, RNG states) every
``--ckpt-every`` steps and when it stops, and ``--resume`` continues from it. At the end it writes
``model.safetensors`` + ``config.json`` (loadable by :func:`~vlmfast.zoo.sam.load_tiny_sam`) and the test
mIoU into ``metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np

from training.harness import Run, adamw, add_optim_args, add_run_args, lr_at, optimizer_step, parse_overrides, set_lr
from vlmfast.datasets.shapes import SPLIT_SIZE, generate_scene, iter_scenes, miou, split_seeds
from vlmfast.zoo.sam import TinySamConfig, build_tiny_sam, center_point, save_tiny_sam, tiny_sam_config

RENDER_SIZES = (256, 336, 336, 448)
"""Scene sizes drawn for training images (then resized to the model input, like SamPredictor does)."""


# --------------------------------------------------------------------------- evaluation


def evaluate(sam, n_scenes: int, split: str = "test", size: int = 336, start: int = 0) -> dict:
    """mIoU of ``sam`` on every object of the first ``n_scenes`` scenes of ``split`` at ``size`` px.

    Through :class:`segment_anything.SamPredictor` (which resizes), ``multimask_output=False``, masks
    thresholded at ``sam.mask_threshold``: ``point`` from one positive point at
    :func:`~vlmfast.zoo.sam.center_point` of the object's mask, ``box`` from its bbox (half-open pixel
    bounds ``x0, y0, x1, y1``). Returns ``{"point", "box", "n_objects", "n_scenes", "split", "size"}``.
    """
    import torch
    from segment_anything import SamPredictor

    was_training = sam.training
    sam.eval()
    predictor = SamPredictor(sam)
    point_masks, box_masks, gts = [], [], []
    with torch.inference_mode():
        for scene in iter_scenes(split, n_scenes, size, start=start):
            predictor.set_image(np.asarray(scene.image))
            for obj in scene.objects:
                m, _, _ = predictor.predict(point_coords=np.array([center_point(obj.mask)]),
                                            point_labels=np.array([1]), multimask_output=False)
                point_masks.append(m[0])
                m, _, _ = predictor.predict(box=np.array(obj.bbox, dtype=np.float64), multimask_output=False)
                box_masks.append(m[0])
                gts.append(obj.mask)
    sam.train(was_training)
    return {"point": miou(point_masks, gts), "box": miou(box_masks, gts), "n_objects": len(gts),
            "n_scenes": n_scenes, "split": split, "size": size}


# --------------------------------------------------------------------------- data


def _random_pixel(rng: np.random.Generator, mask: np.ndarray) -> tuple[float, float] | None:
    """A uniform continuous point ``(x, y)`` inside a uniformly chosen True pixel of ``mask``."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    k = int(rng.integers(len(xs)))
    return float(xs[k] + rng.uniform(0.1, 0.9)), float(ys[k] + rng.uniform(0.1, 0.9))


def _negative_point(rng: np.random.Generator, mask: np.ndarray, bbox) -> tuple[float, float]:
    """A point outside ``mask``, preferably near the object (its bbox grown by 25% each side)."""
    h, w = mask.shape
    x0, y0, x1, y1 = bbox
    gx, gy = (x1 - x0) // 4 + 1, (y1 - y0) // 4 + 1
    x0, y0, x1, y1 = max(0, x0 - gx), max(0, y0 - gy), min(w, x1 + gx), min(h, y1 + gy)
    near = np.zeros_like(mask)
    near[y0:y1, x0:x1] = True
    pt = _random_pixel(rng, near & ~mask)
    return pt if pt is not None else _random_pixel(rng, ~mask)


def sample_image(rng: np.random.Generator, n_prompts: int, img_size: int, transform) -> dict:
    """One training image: the input (uint8 HxWx3 at ``img_size``), exact target masks and prompts.

    Prompts are ``(kind, coords, labels, target_index)``; kind ``"point"`` has 1 or 2 points (labels 1/0),
    kind ``"box"`` has coords ``(x0, y0, x1, y1)``. Coordinates are in the model input frame.
    """
    seed = int(split_seeds("train", 1, start=int(rng.integers(SPLIT_SIZE)))[0])
    size = int(rng.choice(RENDER_SIZES))
    scene = generate_scene(seed, size)
    image = transform.apply_image(np.asarray(scene.image))  # what SamPredictor.set_image does
    target_scene = scene.render(img_size)
    targets = np.stack([o.mask for o in target_scene.objects])
    n_obj = len(scene.objects)
    order = np.concatenate([rng.permutation(n_obj) for _ in range(math.ceil(n_prompts / n_obj))])[:n_prompts]
    prompts = []
    for k in order:
        obj = scene.objects[int(k)]
        u = rng.random()
        if u < 0.3:  # box with jitter: N(0, 5% of the side) per coordinate, at most 8% of the image
            x0, y0, x1, y1 = (float(v) for v in obj.bbox)
            bw, bh = x1 - x0, y1 - y0
            cap = 0.08 * size
            j = np.clip(rng.normal(0, 0.05, 4) * np.array([bw, bh, bw, bh]), -cap, cap)
            x0, y0, x1, y1 = x0 + j[0], y0 + j[1], x1 + j[2], y1 + j[3]
            x0, x1 = np.clip(min(x0, x1 - 2), 0, size), np.clip(max(x1, x0 + 2), 0, size)
            y0, y1 = np.clip(min(y0, y1 - 2), 0, size), np.clip(max(y1, y0 + 2), 0, size)
            box = transform.apply_boxes(np.array([[x0, y0, x1, y1]]), (size, size))[0]
            prompts.append(("box", box.astype(np.float32), None, int(k)))
            continue
        pts = [center_point(obj.mask) if rng.random() < 0.5 else _random_pixel(rng, obj.mask)]
        labels = [1]
        if u > 0.8:  # a second point: positive inside, or negative near the object
            if rng.random() < 0.5:
                pts.append(_random_pixel(rng, obj.mask))
                labels.append(1)
            else:
                pts.append(_negative_point(rng, obj.mask, obj.bbox))
                labels.append(0)
        coords = transform.apply_coords(np.array(pts, dtype=np.float64), (size, size)).astype(np.float32)
        prompts.append(("point", coords, np.array(labels, dtype=np.float32), int(k)))
    return {"image": image, "targets": targets, "prompts": prompts, "seed": seed, "size": size}


def sample_batch(seed: int, step: int, n_images: int, n_prompts: int, img_size: int, transform) -> list[dict]:
    """The batch of ``step``: a pure function of ``(seed, step)`` (so resuming replays nothing)."""
    rng = np.random.default_rng((seed, step))
    return [sample_image(rng, n_prompts, img_size, transform) for _ in range(n_images)]


# --------------------------------------------------------------------------- loss


def focal_loss(logits, targets, alpha: float = 0.25, gamma: float = 2.0):
    """Per-mask sigmoid focal loss (mean over pixels), as in SAM / RetinaNet. Shapes (..., H, W)."""
    import torch.nn.functional as F

    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.flatten(-2).mean(-1)


def dice_loss(logits, targets, eps: float = 1.0):
    p = logits.sigmoid().flatten(-2)
    t = targets.flatten(-2)
    return 1 - (2 * (p * t).sum(-1) + eps) / (p.sum(-1) + t.sum(-1) + eps)


def batch_loss(sam, batch: list[dict]) -> tuple:
    """SAM's loss on a batch; returns ``(loss, stats)``."""
    import torch
    import torch.nn.functional as F

    img = sam.image_encoder.img_size
    x = torch.stack([sam.preprocess(torch.as_tensor(b["image"]).permute(2, 0, 1).float()) for b in batch])
    embeddings = sam.image_encoder(x)
    image_pe = sam.prompt_encoder.get_dense_pe()
    losses, ious, mask_losses, iou_losses = [], [], [], []
    for emb, b in zip(embeddings, batch):
        # group prompts by sparse token count (1 point + pad = box = 2 tokens; 2 points + pad = 3) so each
        # decoder call sees exactly what SamPredictor would give it
        groups: dict[int, list] = {}
        for kind, coords, labels, k in b["prompts"]:
            if kind == "box":
                sparse, _ = sam.prompt_encoder(points=None, boxes=torch.as_tensor(coords)[None], masks=None)
            else:
                pts = (torch.as_tensor(coords)[None], torch.as_tensor(labels)[None])
                sparse, _ = sam.prompt_encoder(points=pts, boxes=None, masks=None)
            groups.setdefault(sparse.shape[1], []).append((sparse, k))
        targets = torch.as_tensor(b["targets"]).float()
        for items in groups.values():
            sparse = torch.cat([s for s, _ in items])
            dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                len(items), -1, *sam.prompt_encoder.image_embedding_size)
            low_res, iou_pred = _decode_all(sam, emb[None], image_pe, sparse, dense)
            logits = F.interpolate(low_res, (img, img), mode="bilinear", align_corners=False)  # (N, 4, H, W)
            tgt = targets[[k for _, k in items]][:, None].expand_as(logits)
            per_mask = 20 * focal_loss(logits, tgt) + dice_loss(logits, tgt)  # (N, 4)
            mask_loss = per_mask[:, 0] + per_mask[:, 1:].min(dim=1).values
            with torch.no_grad():
                pred = logits > sam.mask_threshold
                inter = (pred & (tgt > 0.5)).flatten(-2).sum(-1).float()
                union = (pred | (tgt > 0.5)).flatten(-2).sum(-1).float()
                true_iou = inter / union.clamp(min=1)
            iou_loss = F.mse_loss(iou_pred, true_iou, reduction="none").sum(-1)
            losses.append(mask_loss + iou_loss)
            mask_losses.append(mask_loss.detach())
            iou_losses.append(iou_loss.detach())
            ious.append(true_iou[:, 0])
    loss = torch.cat(losses).mean()
    stats = {"loss": loss.item(), "mask": float(torch.cat(mask_losses).mean()),
             "iou_mse": float(torch.cat(iou_losses).mean()) / 4, "train_iou": float(torch.cat(ious).mean())}
    return loss, stats


def _decode_all(sam, image_embeddings, image_pe, sparse, dense):
    """All 1 + num_multimask_outputs masks and IoU predictions (MaskDecoder.predict_masks, no slicing)."""
    return sam.mask_decoder.predict_masks(
        image_embeddings=image_embeddings, image_pe=image_pe, sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
    )


# --------------------------------------------------------------------------- training loop


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.train_sam", description=__doc__.split("\n")[0])
    add_run_args(p, minutes=60.0, steps=2800)
    p.add_argument("--images", type=int, default=4, help="scenes per step")
    p.add_argument("--prompts", type=int, default=8, help="prompts per scene")
    add_optim_args(p, lr=4e-4, warmup=150, weight_decay=0.05, eval_every=250, eval_scenes=25)
    p.add_argument("--test-scenes", type=int, default=200, help="test scenes for the final evaluation (0: none)")
    p.add_argument("--config", default="", help="size overrides, e.g. 'embed_dim=64,depth=2'")
    return p.parse_args(argv)


def _config_from(text: str, base: dict | None = None) -> TinySamConfig:
    return TinySamConfig.from_dict({**tiny_sam_config().to_dict(), **(base or {}), **parse_overrides(text)})


def main(argv=None) -> int:
    import torch
    from segment_anything.utils.transforms import ResizeLongestSide
    from tqdm import tqdm

    args = parse_args(argv)
    run = Run(args)
    ckpt = run.load() if args.resume else None
    if args.resume and ckpt is None:
        return 2
    cfg = TinySamConfig.from_dict(ckpt["config"]) if ckpt is not None else _config_from(args.config)
    torch.manual_seed(args.seed)
    sam = build_tiny_sam(cfg)
    opt = adamw(sam.named_parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999),
                decays=lambda n, p: p.ndim >= 2 and "rel_pos" not in n and "pos_embed" not in n)
    run.begin(sam, opt, ckpt)
    sam.train()
    transform = ResizeLongestSide(cfg.img_size)

    bar = tqdm(total=args.steps, initial=run.step, desc="tiny-sam", mininterval=5, dynamic_ncols=True)
    while run.next_step():
        lr = set_lr(opt, lr_at(run.step, args.steps, args.lr, args.warmup))
        batch = sample_batch(args.seed, run.step, args.images, args.prompts, cfg.img_size, transform)
        loss, stats = batch_loss(sam, batch)
        optimizer_step(opt, loss, sam.parameters(), args.clip)
        run.step += 1
        bar.update(1)
        record = {"step": run.step, "lr": lr, **{k: round(v, 5) for k, v in stats.items()},
                  "elapsed_s": round(run.elapsed(), 1)}
        if run.eval_due():
            dev = evaluate(sam, args.eval_scenes, split="dev")
            record.update(dev_point=round(dev["point"], 4), dev_box=round(dev["box"], 4))
            run.log.append(record)
            bar.write(json.dumps(record))
        bar.set_postfix(loss=f"{stats['loss']:.3f}", iou=f"{stats['train_iou']:.3f}", lr=f"{lr:.1e}", refresh=False)
        run.end_step(record, sam, opt, cfg)
    bar.close()
    if not run.finish(sam, opt, cfg):
        return 0
    save_tiny_sam(sam, cfg, run.out)
    metrics = {"steps": run.step, "train_minutes": round(run.elapsed() / 60, 2), "seed": args.seed,
               "images_per_step": args.images, "prompts_per_image": args.prompts}
    if args.test_scenes > 0:
        from vlmfast.zoo.sam import load_tiny_sam

        metrics["test"] = evaluate(load_tiny_sam(run.out), args.test_scenes, split="test")  # the saved weights
    (run.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
