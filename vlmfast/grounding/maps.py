"""Attention maps: head aggregation, attention flow across layers, sink removal, token grid to pixels.

Pure tensor functions (known-answer tests in tests/model/test_grounding.py). VL-SAM (arXiv 2410.05963; spec:
shared/reference/hallucination_grounding.md section 4.1):

* head weights ``W = mean_query(max_key(S))`` per (layer, head); ``S' = mean_heads(S * W)``;
* regularised attention flow: ``S~_l = (I + S'_l)(I + S~_{l-1})``, every column multiplied by
  ``1 - (L0 - 1) / L`` (``L0`` the column's unmasked length, ``L`` the sequence length) so the causal mask's
  early columns do not collect all the mass; only the target rows are needed, so a row vector is pushed from
  the top layer down: ``v <- v (I + S'_l)``;
* the target's row restricted to the image columns, reshaped to the token grid, is the object's map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def head_weights(probs: torch.Tensor | None, row_max: torch.Tensor | None = None) -> torch.Tensor:
    """VL-SAM's head weights: mean over (non-empty) query rows of the row's maximum attention.

    ``probs`` (..., H, Q, K) or the precomputed ``row_max`` (..., H, Q). Fully masked rows (max 0) are left
    out of the mean. Returns (..., H).
    """
    if row_max is None:
        assert probs is not None, "head_weights needs probs or row_max"
        row_max = probs.amax(-1)
    live = (row_max > 0).float()
    return (row_max * live).sum(-1) / live.sum(-1).clamp(min=1)


def aggregate_heads(probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``mean_h(S_h * W_h)``: (..., H, Q, K) with (..., H) weights -> (..., Q, K)."""
    return (probs * weights[..., None, None]).mean(-3)


def flow_column_factors(valid: torch.Tensor) -> torch.Tensor:
    """VL-SAM's column regularisation ``1 - (L0 - 1) / L`` for a causal (n, n) attention over ``valid``
    positions (n,): ``L`` valid positions, ``L0`` = valid rows at or after the column. The first valid column
    gets ``1 / L``, the last one 1; invalid columns 0."""
    v = valid.float()
    total = v.sum().clamp(min=1)
    rows_after = v.flip(0).cumsum(0).flip(0)  # valid rows i >= j
    return (1 - (rows_after - 1) / total) * v


def propagate(mats: list[torch.Tensor], start: torch.Tensor, mode: str = "regularised",
              valid: torch.Tensor | None = None) -> torch.Tensor:
    """Relevance of every position for the rows in ``start`` (n,), through the layers' (n, n) attention.

    ``mode``: ``regularised`` (VL-SAM's flow), ``rollout`` (``v <- v (I + A_l)`` from the top layer down,
    unregularised) or ``none`` (the layers' direct attention ``start @ A_l``, averaged). The result is
    normalised to sum 1 (only relative values matter).
    """
    if mode == "none":
        v = torch.stack([start @ m for m in mats]).mean(0)
        return v / v.sum().clamp(min=1e-12)
    if mode not in ("regularised", "rollout"):
        raise ValueError(f"unknown flow mode {mode!r}; expected regularised, rollout or none")
    n = start.shape[0]
    factors = flow_column_factors(valid if valid is not None else torch.ones(n, dtype=torch.bool))
    v = start.float()
    for m in reversed(mats):
        a = m * factors.to(m.device)[None, :] if mode == "regularised" else m
        v = v + v @ a
        v = v / v.sum().clamp(min=1e-12)
    return v


def sink_tokens(phi: dict[int, torch.Tensor], image: torch.Tensor, tau: float = 20.0,
                from_layer: int = 2) -> torch.Tensor:
    """Visual attention sinks (VAR, spec section 3.2): image positions whose massive-activation score
    ``phi = max_d |x_d| / rms(x)`` of the residual stream exceeds ``tau`` at the input of any layer
    ``>= from_layer`` (all layers when the model is shallower). ``phi``: layer -> (n,) scores; ``image`` (n,)."""
    layers = [k for k in sorted(phi) if k >= from_layer] or sorted(phi)
    if not layers:
        return torch.zeros_like(image, dtype=torch.bool)
    score = torch.stack([phi[k].float().cpu() for k in layers]).amax(0)
    return image.cpu() & (score > tau)


def grid_map(values: torch.Tensor, cells: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Scatter per-token values onto an image's token grid: ``cells`` are the tokens' raster indices in the
    (t, h, w) grid (pruned tokens are absent and read 0); frames are averaged. Returns (h, w) float32."""
    t, h, w = grid
    flat = torch.zeros(t * h * w, dtype=torch.float32, device=values.device)
    flat[cells.to(values.device)] = values.float()
    return flat.view(t, h, w).mean(0)


def grid_to_pixels(grid: torch.Tensor, region: tuple[float, float, float, float],
                   size: tuple[int, int]) -> torch.Tensor:
    """Upsample an (h, w) token map bicubically onto the original image.

    ``region`` (x0, y0, x1, y1): the box of the original image (pixels, may extend past its borders) the grid
    covers, as the processor laid it out; ``size`` (W, H) of the original image. Cell (i, j) covers
    ``[x0 + j * cw, x0 + (j + 1) * cw)`` horizontally (``cw = (x1 - x0) / w``), likewise vertically (the box is
    rounded to whole pixels). Pixels outside the region read 0. Returns (H, W) float32, clamped at 0.
    """
    width, height = size
    x0, y0, x1, y1 = (int(round(v)) for v in region)
    up = F.interpolate(grid.float()[None, None], size=(max(1, y1 - y0), max(1, x1 - x0)), mode="bicubic",
                       align_corners=False)[0, 0].clamp(min=0)
    if (x0, y0, x1, y1) == (0, 0, width, height):
        return up
    out = torch.zeros(height, width, dtype=up.dtype, device=up.device)
    ox, oy = max(0, x0), max(0, y0)
    ex, ey = min(width, x1), min(height, y1)
    if ex > ox and ey > oy:
        out[oy:ey, ox:ex] = up[oy - y0:ey - y0, ox - x0:ex - x0]
    return out


def normalise(heat: torch.Tensor) -> torch.Tensor:
    """Scale to [0, 1] by the maximum (an all-zero map stays zero)."""
    top = heat.max()
    return heat / top if float(top) > 0 else heat
