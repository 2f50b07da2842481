"""Point prompts from an attention map (VL-SAM's prompt generation; spec section 4.1 step 3-4).

Threshold the map, keep the connected component holding the most attention mass as the positive region, put
the positive point at the map's peak inside it (VL-SAM) or at the region's heat-weighted centroid (vlmfast's
default, ``GroundingConfig.positive_point``) and the negative point at the map's lowest value (the one farthest
from the positive point among ties). After a SAM round, :func:`refinement_points` adds a positive
point where the map is strong but the mask is missing and a negative one where the mask covers pixels the
map says are empty. Points are (x, y) pixel centres: pixel (row i, column j) is the point (j + 0.5, i + 0.5).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

#: label propagation stops after this many sweeps (a component's diameter in pixels is far below it)
_MAX_SWEEPS = 4096


def components(binary: torch.Tensor) -> torch.Tensor:
    """8-connected component labels of a (H, W) bool map: 0 outside, each component a distinct positive int.

    Iterative max-label propagation (3x3 max-pool restricted to the map), with pointer jumping every sweep
    so long components converge in few sweeps.
    """
    b = binary.bool()
    h, w = b.shape
    labels = torch.where(b, torch.arange(1, h * w + 1, dtype=torch.float32).view(h, w), torch.zeros(()))
    for _ in range(_MAX_SWEEPS):
        grown = F.max_pool2d(labels[None, None], 3, stride=1, padding=1)[0, 0] * b
        # pointer jumping: a pixel labelled k takes the label now held by pixel k - 1 (if larger)
        flat = grown.flatten()
        jumped = torch.maximum(grown, flat[(grown.long() - 1).clamp(min=0)].view(h, w) * b)
        if torch.equal(jumped, labels):
            break
        labels = jumped
    return labels.long()


def work_copy(heat: torch.Tensor, work_size: int = 64) -> tuple[torch.Tensor, float, float]:
    """An area-averaged copy of ``heat`` whose long side is at most ``work_size`` (the maps are bicubic
    upsamplings of a token grid, so nothing finer exists), with its x and y scale back to ``heat``."""
    h, w = heat.shape
    scale = max(1.0, max(h, w) / work_size)
    if scale == 1:
        return heat.float(), 1.0, 1.0
    size = (max(1, round(h / scale)), max(1, round(w / scale)))
    small = F.adaptive_avg_pool2d(heat.float()[None, None], size)[0, 0]
    return small, w / size[1], h / size[0]


def _heaviest(small: torch.Tensor, threshold: float) -> torch.Tensor:
    labels = components(small >= threshold * float(small.max()))
    ids, inverse = labels.flatten().unique(return_inverse=True)
    mass = torch.zeros(len(ids)).index_add_(0, inverse, small.flatten().float())
    mass[ids == 0] = -1
    return labels == ids[int(mass.argmax())]


def main_component(heat: torch.Tensor, threshold: float, work_size: int = 64) -> torch.Tensor:
    """Pixels of ``heat`` >= ``threshold`` x max, restricted to the connected component with the largest
    summed heat. (H, W) bool; empty for an all-zero map. Components are found on :func:`work_copy` and the
    chosen one is brought back to full size (nearest) and intersected with the full-size threshold."""
    return _region(heat, threshold, *work_copy(heat, work_size))[0]


def _region(heat, threshold, small, sx, sy) -> tuple[torch.Tensor, torch.Tensor]:
    top = float(heat.max())
    if top <= 0:
        return torch.zeros_like(heat, dtype=torch.bool), torch.zeros_like(small, dtype=torch.bool)
    chosen_small = _heaviest(small, threshold)
    chosen = chosen_small
    if small.shape != heat.shape:
        chosen = F.interpolate(chosen_small.float()[None, None], size=heat.shape, mode="nearest")[0, 0] > 0
    region = chosen & (heat >= threshold * top)
    return (region if bool(region.any()) else chosen), chosen_small


def peak(heat: torch.Tensor, region: torch.Tensor | None = None) -> tuple[float, float]:
    """(x, y) centre of the highest pixel of ``heat`` (inside ``region`` when given; first in raster order)."""
    h = heat if region is None else torch.where(region, heat, torch.full_like(heat, -torch.inf))
    i = int(h.flatten().argmax())
    return i % heat.shape[1] + 0.5, i // heat.shape[1] + 0.5


def centroid(heat: torch.Tensor, region: torch.Tensor) -> tuple[float, float]:
    """(x, y) of the heat-weighted centre of mass of ``region`` (pixel centres); when that falls outside the
    region (a ring, a crescent), the region's pixel nearest to it."""
    ys, xs = torch.nonzero(region, as_tuple=True)
    x, y = xs.float() + 0.5, ys.float() + 0.5
    w = heat[ys, xs].float().clamp(min=0)
    w = w if float(w.sum()) > 0 else torch.ones_like(w)
    cx, cy = float((x * w).sum() / w.sum()), float((y * w).sum() / w.sum())
    if bool(region[min(int(cy), region.shape[0] - 1), min(int(cx), region.shape[1] - 1)]):
        return cx, cy
    k = int(((x - cx) ** 2 + (y - cy) ** 2).argmin())
    return float(x[k]), float(y[k])


def lowest(heat: torch.Tensor, away_from: tuple[float, float], exclude: torch.Tensor | None = None,
           tol: float = 0.05) -> tuple[float, float]:
    """(x, y) of the lowest part of ``heat`` outside ``exclude``: among pixels within ``tol`` x max of the
    minimum, the one farthest from ``away_from``."""
    h = heat if exclude is None else torch.where(exclude, torch.full_like(heat, torch.inf), heat)
    low = h <= h.min() + tol * float(heat.max())
    ys, xs = torch.nonzero(low, as_tuple=True)
    d = (xs.float() + 0.5 - away_from[0]) ** 2 + (ys.float() + 0.5 - away_from[1]) ** 2
    k = int(d.argmax())
    return float(xs[k]) + 0.5, float(ys[k]) + 0.5


def bbox(mask: torch.Tensor | np.ndarray) -> np.ndarray | None:
    """(x0, y0, x1, y1) pixel box (x1, y1 exclusive) of a bool mask, None when empty."""
    m = torch.as_tensor(np.asarray(mask)).bool()
    ys, xs = torch.nonzero(m, as_tuple=True)
    if len(xs) == 0:
        return None
    return np.array([int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1], dtype=np.float32)


def initial_points(heat: torch.Tensor, threshold: float, negative: bool = True,
                   positive: str = "peak") -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """VL-SAM's first prompt: the positive region, a positive point in it (label 1; ``positive``: ``peak``, the
    map's maximum there as in VL-SAM, or ``centroid``, the region's heat-weighted centre of mass) and the map's
    lowest point (label 0). Returns (points N x 2, labels N, region)."""
    if positive not in ("peak", "centroid"):
        raise ValueError(f"positive = {positive!r}; expected 'peak' or 'centroid'")
    small, sx, sy = work_copy(heat)
    region, region_small = _region(heat, threshold, small, sx, sy)
    if not bool(region.any()):
        pos = peak(heat)
    else:
        pos = centroid(heat, region) if positive == "centroid" else peak(heat, region)
    pts, labels = [pos], [1]
    if negative:  # found on the work copy: a cell centre, scaled back
        x, y = lowest(small, (pos[0] / sx, pos[1] / sy), exclude=region_small)
        pts.append((x * sx, y * sy))
        labels.append(0)
    return np.array(pts, dtype=np.float32), np.array(labels, dtype=np.int64), region


def refinement_points(heat: torch.Tensor, mask: torch.Tensor, region: torch.Tensor, points: np.ndarray,
                      high: float = 0.8, low: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """New points after a SAM round: a positive one at the peak of the strong part of the region
    (map >= ``high`` x max) the mask misses, and a negative one at the lowest pixel of the mask when the map
    there is below ``low`` x max. Pixels already holding a point are skipped. Returns (points, labels),
    possibly empty."""
    top = float(heat.max())
    if top <= 0:
        return np.zeros((0, 2), np.float32), np.zeros(0, np.int64)
    taken = torch.zeros_like(mask, dtype=torch.bool)
    for x, y in points:
        taken[min(int(y), mask.shape[0] - 1), min(int(x), mask.shape[1] - 1)] = True
    new, labels = [], []
    missed = region & (heat >= high * top) & ~mask & ~taken
    if bool(missed.any()):
        new.append(peak(heat, missed))
        labels.append(1)
    weak = mask & (heat < low * top) & ~taken
    if bool(weak.any()):
        h = torch.where(weak, heat, torch.full_like(heat, torch.inf))
        i = int(h.flatten().argmin())
        new.append((i % heat.shape[1] + 0.5, i // heat.shape[1] + 0.5))
        labels.append(0)
    return np.array(new, dtype=np.float32).reshape(-1, 2), np.array(labels, dtype=np.int64)

