"""Pictures for the demo, with numpy and PIL only: kept-token grid, attention heat map, grounding layers.

Nothing here imports Gradio, so every picture is unit-tested as plain arrays.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

#: anchors of the heat-map colour scale (dark blue -> cyan -> yellow -> red), value in [0, 1] -> RGB
_HEAT = np.array([[0.0, 20, 20, 120], [0.35, 0, 170, 220], [0.65, 250, 230, 40], [1.0, 220, 20, 20]])


def token_grid_overlay(image: Image.Image, grid: Sequence[int], kept: Any,
                       box: tuple[float, float, float, float] | None = None) -> Image.Image:
    """``image`` with the model's visual-token grid drawn over the part it sees (``box``): kept tokens
    clear, dropped tokens darkened, the area outside the model's view greyed out.

    ``grid`` is the (t, h, w) of the image's LLM tokens (raster order; t > 1 frames share the picture, a
    cell is kept when any frame keeps it); ``kept`` the indices of the tokens that entered the LLM.
    """
    t, h, w = (int(x) for x in grid)
    img = np.asarray(image.convert("RGB"), dtype=np.float32)
    height, width = img.shape[:2]
    x0, y0, x1, y1 = box if box is not None else (0.0, 0.0, float(width), float(height))
    kept_idx = np.asarray(kept.cpu() if hasattr(kept, "cpu") else kept, dtype=np.int64).reshape(-1)
    if kept_idx.size and (kept_idx.min() < 0 or kept_idx.max() >= t * h * w):
        raise ValueError(f"kept indices must lie in [0, {t * h * w}) for a {t}x{h}x{w} grid")
    token_kept = np.zeros(t * h * w, dtype=bool)
    token_kept[kept_idx] = True
    cell_kept = np.asarray(token_kept.reshape(t, h, w).any(0))  # numpy types any(axis) as bool | array
    # per-pixel cell index over the model's view
    ys = np.floor((np.arange(height) + 0.5 - y0) / (y1 - y0) * h).astype(np.int64)
    xs = np.floor((np.arange(width) + 0.5 - x0) / (x1 - x0) * w).astype(np.int64)
    in_y, in_x = (ys >= 0) & (ys < h), (xs >= 0) & (xs < w)
    inside = in_y[:, None] & in_x[None, :]
    kept_px = np.zeros((height, width), dtype=bool)
    kept_px[np.ix_(in_y, in_x)] = cell_kept[np.ix_(ys[in_y], xs[in_x])]
    out = img.copy()
    dropped = inside & ~kept_px
    out[dropped] = out[dropped] * 0.35 + np.array([10, 10, 30], dtype=np.float32) * 0.65
    out[~inside] = out[~inside] * 0.3 + 128 * 0.7
    pic = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pic)
    line = (255, 255, 255)
    for r in range(h + 1):
        y = y0 + (y1 - y0) * r / h
        draw.line([(x0, y), (x1, y)], fill=line, width=1)
    for c in range(w + 1):
        x = x0 + (x1 - x0) * c / w
        draw.line([(x, y0), (x, y1)], fill=line, width=1)
    return pic


def side_by_side(pictures: Sequence[Image.Image], labels: Sequence[str], gap: int = 6) -> Image.Image:
    """``pictures`` in a row, ``gap`` white pixels apart, each under a white strip with its label (a multi-view
    image's token grids: base, high-res)."""
    strip = 14
    width = sum(p.width for p in pictures) + gap * (len(pictures) - 1)
    out = Image.new("RGB", (width, strip + max(p.height for p in pictures)), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    x = 0
    for pic, label in zip(pictures, labels):
        out.paste(pic.convert("RGB"), (x, strip))
        draw.text((x + 2, 1), label, fill=(0, 0, 0))
        x += pic.width + gap
    return out


def heat_colors(heat: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB (float32, 0-255) on the demo's heat scale."""
    v = np.clip(np.nan_to_num(np.asarray(heat, dtype=np.float32)), 0.0, 1.0)
    return np.stack([np.interp(v, _HEAT[:, 0], _HEAT[:, k]) for k in (1, 2, 3)], axis=-1).astype(np.float32)


def heat_overlay(image: Image.Image, heatmaps: Sequence[np.ndarray], alpha: float = 0.55) -> Image.Image:
    """``image`` blended with the pixel-wise maximum of ``heatmaps`` (each HxW in [0, 1], image-sized);
    each pixel's blend weight grows with its heat, so cold areas stay readable."""
    img = np.asarray(image.convert("RGB"), dtype=np.float32)
    if not heatmaps:
        return Image.fromarray(img.astype(np.uint8))
    for hm in heatmaps:
        if np.shape(hm) != img.shape[:2]:
            raise ValueError(f"heat map of shape {np.shape(hm)} does not match the image "
                             f"({img.shape[0]}x{img.shape[1]})")
    heat = np.clip(np.max(np.stack([np.asarray(h, dtype=np.float32) for h in heatmaps]), axis=0), 0.0, 1.0)
    a = (alpha * (0.35 + 0.65 * heat))[..., None]
    out = img * (1 - a) + heat_colors(heat) * a
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def draw_points(image: Image.Image, points: np.ndarray, labels: np.ndarray, radius: int = 5) -> Image.Image:
    """Positive point prompts as green dots, negative ones as red crosses (x, y pixels)."""
    pic = image.copy()
    draw = ImageDraw.Draw(pic)
    for (x, y), lab in zip(np.asarray(points, dtype=np.float32).reshape(-1, 2), np.asarray(labels).reshape(-1)):
        if int(lab) > 0:
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=(40, 220, 60), outline=(0, 0, 0))
        else:
            draw.line([(x - radius, y - radius), (x + radius, y + radius)], fill=(230, 30, 30), width=3)
            draw.line([(x - radius, y + radius), (x + radius, y - radius)], fill=(230, 30, 30), width=3)
    return pic


#: mask colours per grounded phrase (AnnotatedImage wants hex)
PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45")


def grounding_layers(image: Image.Image, groundings: Sequence[Any], image_index: int = 0, mask_alpha: float = 0.6
                     ) -> tuple[Image.Image, list[tuple[np.ndarray, str]], dict[str, str]]:
    """What ``gr.AnnotatedImage`` shows for one image: the image under the attention heat map with the point
    prompts and boxes drawn in, one (mask in [0, ``mask_alpha``], label) per grounded phrase, and a colour
    per label.

    ``groundings``: objects with ``phrase``, ``image_index``, ``heatmap``, ``points``, ``point_labels``,
    ``box``, ``mask`` and ``score`` (vlmfast.grounding.Grounding).
    """
    mine = [g for g in groundings if int(getattr(g, "image_index", 0)) == image_index]
    base = heat_overlay(image, [np.asarray(g.heatmap, dtype=np.float32) for g in mine])
    annotations: list[tuple[np.ndarray, str]] = []
    colors: dict[str, str] = {}
    for i, g in enumerate(mine):
        label = f"{g.phrase} ({float(g.score):.2f})"
        if label in colors:  # AnnotatedImage keys colours by label: keep repeated phrases apart
            label = f"{label} #{i + 1}"
        colors[label] = PALETTE[i % len(PALETTE)]
        base = draw_points(base, g.points, g.point_labels)
        if getattr(g, "box", None) is not None:
            x0, y0, x1, y1 = (float(v) for v in np.asarray(g.box).reshape(-1)[:4])
            ImageDraw.Draw(base).rectangle([x0, y0, x1, y1], outline=colors[label], width=2)
        annotations.append((np.asarray(g.mask, dtype=np.float32) * mask_alpha, label))
    return base, annotations, colors
