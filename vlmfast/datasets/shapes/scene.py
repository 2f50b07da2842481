"""ShapesWorld scenes: deterministic images of coloured shapes with exact per-pixel ground truth.

A scene is sampled from ``numpy.random.default_rng(seed)`` alone (never the global RNG):

1. a background: plain, noisy or striped neutral gray, light or dark (every background pixel has
   R = G = B in [50, 210], so it can never equal an object colour and has no hue);
2. ``n`` in 1..8 objects, each with a shape and colour drawn from the (skewed) priors in
   :mod:`.vocab`, a circumradius of 8%-18% of the image side, a centre that keeps the shape
   inside the image, and a rotation of at most +-20 degrees. Objects are drawn in order, later
   over earlier. A placement is rejected (and re-drawn, smaller as attempts fail) when it would
   leave an earlier object with less than :data:`MIN_VISIBLE_FRACTION` of its own full mask
   visible, split an earlier object's visible part into pieces (8-connectivity), or bring two objects of the same
   colour close enough to touch (they would merge into one blob).

Geometry is sampled in normalised coordinates and validated on a :data:`CANONICAL_SIZE` raster, so
the layout of a seed does not depend on the requested size; :meth:`Scene.render` re-rasterises
the same layout at another size (ground truth is exact at every size; the visibility guarantees
are checked at the canonical size only).

Masks are exact: each object's full mask is drawn with PIL ``ImageDraw`` (no anti-aliasing), its
visible mask is the full mask minus the masks of the objects drawn after it, and the image is
painted from the visible masks, so the pixels under a visible mask have exactly the object's RGB.

Coordinates: pixel ``(row i, col j)`` covers ``[j, j+1) x [i, i+1)``; ``bbox`` is half-open
``(x0, y0, x1, y1)`` like ``PIL.Image.getbbox`` (``mask[y0:y1, x0:x1]`` holds every visible pixel);
``center`` is the visible mask's centroid ``(x, y)`` in those continuous coordinates.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from .vocab import COLOR_NAMES, COLOR_PRIOR, COLORS, COLS, ROWS, SHAPE_PRIOR, SHAPES

CANONICAL_SIZE = 336
"""Side (pixels) at which layouts are validated; :func:`generate_scene`'s default size."""
MAX_OBJECTS = 8
MIN_RADIUS, MAX_RADIUS = 0.08, 0.18
"""Circumradius range of an object, as a fraction of the image side."""
MIN_VISIBLE_FRACTION = 0.6
"""Every object keeps at least this fraction of its full (unoccluded) mask visible."""
MAX_ROTATION_DEG = 20.0
EDGE_MARGIN = 0.01
"""Minimum distance between a shape's circumcircle and the image border (fraction of side)."""
SAME_COLOR_GAP = 0.02
"""Minimum gap between the circumcircles of two objects of the same colour (fraction of side)."""
MAX_ATTEMPTS = 60
"""Placement attempts per object; the radius range shrinks to the minimum over the first half.
If all fail the scene keeps the objects placed so far (has not happened in 20k tested seeds)."""

SPLIT_OFFSETS: dict[str, int] = {"train": 0, "dev": 10_000_000, "test": 20_000_000, "final": 30_000_000}
"""First seed of each split. Splits are the disjoint ranges ``[offset, offset + SPLIT_SIZE)``. Their roles:

- ``train``: training data only.
- ``dev``: every choice -- training recipes and checkpoints, defaults, ablations, ``vlmfast search``'s
  calibration data.
- ``test``: the first held-out split. It was used to choose recipes, checkpoints and defaults before ``final``
  existed, so its numbers are optimistic; kept for comparison with earlier reports.
- ``final``: reported numbers only (``vlmfast bench prune``'s default); never read to choose anything
  (``vlmfast search`` refuses it).
"""
SPLIT_SIZE = 10_000_000
SPLITS = tuple(SPLIT_OFFSETS)
"""Every split name, for ``--split`` choices."""

_SHAPE_CDF = np.cumsum([SHAPE_PRIOR[s] for s in SHAPES])
_COLOR_CDF = np.cumsum([COLOR_PRIOR[c] for c in COLOR_NAMES])
_TEXTURE_STREAM = 1  # sub-stream of the seed for per-pixel background noise


# --------------------------------------------------------------------------- data classes


@dataclass(frozen=True)
class Background:
    """A neutral gray background: ``kind`` in {plain, noise, stripes}, ``tone`` in {light, dark}."""

    kind: str
    tone: str
    level: int
    """base gray level (0-255)"""
    amplitude: int = 0
    """noise: values are level +- amplitude (uniform); stripes: level +- amplitude alternately"""
    period: float = 0.0
    """stripes: period as a fraction of the image side"""
    angle: int = 0
    """stripes: orientation in degrees (0 = vertical bands, 90 = horizontal)"""

    def __str__(self) -> str:
        return f"{self.kind} {self.tone} gray"


@dataclass(frozen=True)
class ShapeSpec:
    """Size-independent geometry of one object (normalised to the image side)."""

    shape: str
    color: str
    cx: float
    cy: float
    radius: float
    """circumradius"""
    rotation: float
    """radians"""


@dataclass(eq=False)
class ShapeObject:
    """Ground truth of one object as it appears in the image (after occlusion)."""

    shape: str
    color: str
    mask: np.ndarray = field(repr=False)
    """bool (H, W): the object's visible pixels"""
    bbox: tuple[int, int, int, int]
    """half-open (x0, y0, x1, y1) of the visible mask"""
    center: tuple[float, float]
    """centroid (x, y) of the visible mask"""
    cell: tuple[str, str]
    """3x3 cell (row, col) of the centroid: row in ROWS, col in COLS"""
    area: int
    """visible pixels"""
    full_area: int
    """pixels of the unoccluded shape"""

    @property
    def position(self) -> str:
        """The cell as text, e.g. ``"top left"`` (a position-question answer)."""
        return f"{self.cell[0]} {self.cell[1]}"

    @property
    def visible_fraction(self) -> float:
        return self.area / self.full_area

    @property
    def name(self) -> str:
        """``"<colour> <shape>"``"""
        return f"{self.color} {self.shape}"

    @classmethod
    def from_mask(cls, shape: str, color: str, mask: np.ndarray, full_area: int | None = None) -> ShapeObject:
        """Build the ground truth (bbox, centre, cell, area) of an object from its visible mask."""
        mask = np.asarray(mask, dtype=bool)
        return _object_from_crop(shape, color, mask.shape[0], mask.shape[1], 0, 0, mask,
                                 int(mask.sum()) if full_area is None else full_area)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ShapeObject):
            return NotImplemented
        return (self.shape, self.color, self.bbox, self.center, self.cell, self.area, self.full_area) == (
            other.shape, other.color, other.bbox, other.center, other.cell, other.area, other.full_area
        ) and np.array_equal(self.mask, other.mask)


@dataclass(eq=False)
class Scene:
    """One generated image and its objects, in drawing order (later objects are on top)."""

    seed: int
    size: int
    image: Image.Image = field(repr=False)
    objects: list[ShapeObject]
    background: Background
    layout: tuple[ShapeSpec, ...] = field(repr=False)
    """size-independent geometry, one spec per object, same order as ``objects``"""

    def render(self, size: int) -> Scene:
        """The same scene re-rasterised at ``size`` x ``size`` (exact ground truth at that size)."""
        if size == self.size:
            return self
        return _compose(self.seed, size, self.layout, [_rasterize(s, size) for s in self.layout], self.background)


# --------------------------------------------------------------------------- geometry


def _vertices(spec: ShapeSpec, size: int, x0: int, y0: int) -> list[tuple[float, float]]:
    """Polygon vertices in pixel coordinates relative to the crop origin ``(x0, y0)``."""
    cx, cy, r = spec.cx * size - x0, spec.cy * size - y0, spec.radius * size
    rot = spec.rotation
    if spec.shape == "square":
        local = [(r * math.cos(a), r * math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
    elif spec.shape == "triangle":  # apex up (image y grows downwards)
        local = [(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    elif spec.shape == "hexagon":
        local = [(r * math.cos(a), r * math.sin(a)) for a in (k * math.pi / 3 for k in range(6))]
    elif spec.shape == "star":  # five points, inner radius half the outer one
        local = [((r if k % 2 == 0 else 0.5 * r) * math.cos(a), (r if k % 2 == 0 else 0.5 * r) * math.sin(a))
                 for k, a in ((k, -math.pi / 2 + k * math.pi / 5) for k in range(10))]
    elif spec.shape == "cross":  # plus sign whose arm-end corners lie on the circumcircle
        w = 0.3 * r
        arm = math.sqrt(r * r - w * w)
        local = [(w, -arm), (w, -w), (arm, -w), (arm, w), (w, w), (w, arm),
                 (-w, arm), (-w, w), (-arm, w), (-arm, -w), (-w, -w), (-w, -arm)]
    else:
        raise ValueError(f"no polygon for shape {spec.shape!r}")
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in local]


@dataclass
class _Raster:
    """An object's full mask, stored as a crop at ``(x0, y0)`` of a ``size`` x ``size`` image."""

    x0: int
    y0: int
    crop: np.ndarray

    @property
    def x1(self) -> int:
        return self.x0 + self.crop.shape[1]

    @property
    def y1(self) -> int:
        return self.y0 + self.crop.shape[0]


def _rasterize(spec: ShapeSpec, size: int) -> _Raster:
    """Draw the full (unoccluded) mask of ``spec`` with PIL, without anti-aliasing."""
    cx, cy, r = spec.cx * size, spec.cy * size, spec.radius * size
    x0, y0 = max(0, math.floor(cx - r) - 1), max(0, math.floor(cy - r) - 1)
    x1, y1 = min(size, math.ceil(cx + r) + 2), min(size, math.ceil(cy + r) + 2)
    img = Image.new("1", (x1 - x0, y1 - y0), 0)
    draw = ImageDraw.Draw(img)
    if spec.shape == "circle":
        draw.ellipse((cx - r - x0, cy - r - y0, cx + r - x0, cy + r - y0), fill=1)
    else:
        draw.polygon(_vertices(spec, size, x0, y0), fill=1)
    return _Raster(x0, y0, np.array(img, dtype=bool))


def _is_connected(mask: np.ndarray) -> bool:
    """Whether the True pixels of ``mask`` form one 8-connected component (union-find on row runs).

    8- rather than 4-connectivity because PIL rasterises sharp polygon tips (stars, triangles) with
    pixels that touch the rest of the shape only diagonally."""
    h, w = mask.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    d = np.diff(padded, axis=1)
    sy, sx = np.nonzero(d == 1)
    _, ex = np.nonzero(d == -1)  # same row-major order as the starts: run k is [sx[k], ex[k]) on row sy[k]
    n = len(sy)
    if n <= 1:
        return True
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    row_start = np.searchsorted(sy, np.arange(h + 1))
    components = n
    for y in range(1, h):
        i, i_end = row_start[y - 1], row_start[y]
        j, j_end = row_start[y], row_start[y + 1]
        while i < i_end and j < j_end:
            if sx[i] <= ex[j] and sx[j] <= ex[i]:  # runs overlap or touch diagonally: 8-connected
                a, b = find(i), find(j)
                if a != b:
                    parent[a] = b
                    components -= 1
            if ex[i] < ex[j]:
                i += 1
            else:
                j += 1
    return components == 1


# --------------------------------------------------------------------------- sampling


def _sample_background(rng: np.random.Generator) -> Background:
    kind = ("plain", "noise", "stripes")[int(rng.integers(3))]
    tone = ("light", "dark")[int(rng.integers(2))]
    level = int(rng.integers(160, 191)) if tone == "light" else int(rng.integers(65, 96))
    if kind == "plain":
        return Background(kind, tone, level)
    if kind == "noise":
        return Background(kind, tone, level, amplitude=int(rng.integers(4, 11)))
    return Background(kind, tone, level, amplitude=int(rng.integers(4, 9)),
                      period=float(rng.uniform(0.03, 0.08)), angle=int(rng.integers(4)) * 45)


def _paint_background(bg: Background, size: int, seed: int) -> np.ndarray:
    """(size, size, 3) uint8 neutral-gray background."""
    if bg.kind == "plain":
        gray = np.full((size, size), bg.level, dtype=np.int16)
    elif bg.kind == "noise":
        tex = np.random.default_rng((seed, _TEXTURE_STREAM))
        gray = bg.level + tex.integers(-bg.amplitude, bg.amplitude + 1, size=(size, size), dtype=np.int16)
    elif bg.kind == "stripes":
        a = math.radians(bg.angle)
        ys, xs = np.ogrid[:size, :size]
        u = ((xs + 0.5) * math.cos(a) + (ys + 0.5) * math.sin(a)) / size
        band = np.floor(u / (bg.period / 2)).astype(np.int64) % 2
        gray = (bg.level + np.where(band == 0, bg.amplitude, -bg.amplitude)).astype(np.int16)
    else:
        raise ValueError(f"unknown background kind {bg.kind!r}")
    gray = np.clip(gray, 50, 210).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def _overlap(a: _Raster, a_mask: np.ndarray, b: _Raster) -> np.ndarray | None:
    """Pixels of ``a_mask`` (in ``a``'s crop frame) covered by ``b``'s full mask, or None if none."""
    x0, y0, x1, y1 = max(a.x0, b.x0), max(a.y0, b.y0), min(a.x1, b.x1), min(a.y1, b.y1)
    if x0 >= x1 or y0 >= y1:
        return None
    covered = np.zeros_like(a_mask)
    covered[y0 - a.y0:y1 - a.y0, x0 - a.x0:x1 - a.x0] = (
        a_mask[y0 - a.y0:y1 - a.y0, x0 - a.x0:x1 - a.x0] & b.crop[y0 - b.y0:y1 - b.y0, x0 - b.x0:x1 - b.x0]
    )
    return covered if covered.any() else None


def _sample_layout(rng: np.random.Generator) -> tuple[list[ShapeSpec], list[_Raster]]:
    """Place 1..8 objects (validated at CANONICAL_SIZE); returns specs and their canonical rasters."""
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    specs: list[ShapeSpec] = []
    rasters: list[_Raster] = []
    visible: list[np.ndarray] = []  # current visible part of each placed object, in its crop frame
    full_areas: list[int] = []
    max_rot = math.radians(MAX_ROTATION_DEG)
    for _ in range(n):
        shape = SHAPES[int(np.searchsorted(_SHAPE_CDF, rng.random(), side="right"))]
        color = COLOR_NAMES[int(np.searchsorted(_COLOR_CDF, rng.random(), side="right"))]
        for attempt in range(MAX_ATTEMPTS):
            hi = MAX_RADIUS - (MAX_RADIUS - MIN_RADIUS) * min(1.0, attempt / (MAX_ATTEMPTS / 2))
            r = float(rng.uniform(MIN_RADIUS, hi)) if hi > MIN_RADIUS else MIN_RADIUS
            lo_c, hi_c = r + EDGE_MARGIN, 1 - r - EDGE_MARGIN
            cx, cy = float(rng.uniform(lo_c, hi_c)), float(rng.uniform(lo_c, hi_c))
            rot = float(rng.uniform(-max_rot, max_rot))
            spec = ShapeSpec(shape, color, cx, cy, r, 0.0 if shape == "circle" else rot)
            if any(p.color == color and math.hypot(p.cx - cx, p.cy - cy) < p.radius + r + SAME_COLOR_GAP
                   for p in specs):
                continue
            raster = _rasterize(spec, CANONICAL_SIZE)
            updates: dict[int, np.ndarray] = {}
            ok = True
            for i, placed in enumerate(rasters):
                covered = _overlap(placed, visible[i], raster)
                if covered is None:
                    continue
                new_vis = visible[i] & ~covered
                if new_vis.sum() < MIN_VISIBLE_FRACTION * full_areas[i] or not _is_connected(new_vis):
                    ok = False
                    break
                updates[i] = new_vis
            if not ok:
                continue
            for i, new_vis in updates.items():
                visible[i] = new_vis
            specs.append(spec)
            rasters.append(raster)
            visible.append(raster.crop.copy())
            full_areas.append(int(raster.crop.sum()))
            break
    return specs, rasters


def _object_from_crop(shape: str, color: str, h: int, w: int, x0: int, y0: int,
                      crop: np.ndarray, full_area: int) -> ShapeObject:
    mask = np.zeros((h, w), dtype=bool)
    mask[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]] = crop
    ys, xs = np.nonzero(crop)
    if len(xs) == 0:
        raise ValueError(f"{color} {shape} has no visible pixels")
    cx, cy = float(xs.mean()) + x0 + 0.5, float(ys.mean()) + y0 + 0.5
    bbox = (int(xs.min()) + x0, int(ys.min()) + y0, int(xs.max()) + x0 + 1, int(ys.max()) + y0 + 1)
    cell = (ROWS[min(2, int(cy * 3 / h))], COLS[min(2, int(cx * 3 / w))])
    return ShapeObject(shape, color, mask, bbox, (cx, cy), cell, int(len(xs)), full_area)


def _compose(seed: int, size: int, layout: tuple[ShapeSpec, ...] | list[ShapeSpec],
             rasters: list[_Raster], background: Background) -> Scene:
    """Occlude (later over earlier), paint the image from the visible masks, build ground truth."""
    pixels = _paint_background(background, size, seed)
    cover = np.zeros((size, size), dtype=bool)
    objects: list[ShapeObject] = [None] * len(layout)  # type: ignore[list-item]
    for k in range(len(layout) - 1, -1, -1):
        spec, ras = layout[k], rasters[k]
        region = (slice(ras.y0, ras.y1), slice(ras.x0, ras.x1))
        vis = ras.crop & ~cover[region]
        cover[region] |= ras.crop
        pixels[region][vis] = COLORS[spec.color]
        objects[k] = _object_from_crop(spec.shape, spec.color, size, size, ras.x0, ras.y0, vis, int(ras.crop.sum()))
    return Scene(seed, size, Image.fromarray(pixels, "RGB"), objects, background, tuple(layout))


# --------------------------------------------------------------------------- public API


def generate_scene(seed: int, size: int = CANONICAL_SIZE) -> Scene:
    """The scene of ``seed`` (a non-negative int), rendered at ``size`` x ``size`` pixels.

    Fully deterministic: the same ``(seed, size)`` gives byte-identical images and identical
    ground truth; the layout (shapes, colours, geometry, background) does not depend on ``size``.
    """
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    rng = np.random.default_rng(seed)
    background = _sample_background(rng)
    layout, rasters = _sample_layout(rng)
    if size != CANONICAL_SIZE:
        rasters = [_rasterize(s, size) for s in layout]
    return _compose(seed, size, layout, rasters, background)


def split_seeds(split: str, n: int, start: int = 0) -> list[int]:
    """Seeds ``start .. start+n-1`` of ``split`` (train / dev / test / final); splits never share a seed.

    Split ``s`` owns ``[SPLIT_OFFSETS[s], SPLIT_OFFSETS[s] + SPLIT_SIZE)``; asking for seeds beyond
    that range raises instead of spilling into the next split.
    """
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_OFFSETS)}")
    if n < 0 or start < 0 or start + n > SPLIT_SIZE:
        raise ValueError(f"seeds [{start}, {start + n}) are outside split {split!r} (size {SPLIT_SIZE})")
    base = SPLIT_OFFSETS[split] + start
    return list(range(base, base + n))


def split_of(seed: int) -> str:
    """The split a seed belongs to (inverse of :func:`split_seeds`)."""
    for split, offset in SPLIT_OFFSETS.items():
        if offset <= seed < offset + SPLIT_SIZE:
            return split
    raise ValueError(f"seed {seed} belongs to no split")


def iter_scenes(split: str, n: int, size: int = CANONICAL_SIZE, start: int = 0) -> Iterator[Scene]:
    """Generate the scenes of :func:`split_seeds` lazily."""
    for seed in split_seeds(split, n, start):
        yield generate_scene(seed, size)


_ranges = sorted((o, o + SPLIT_SIZE) for o in SPLIT_OFFSETS.values())
assert all(a[1] <= b[0] for a, b in zip(_ranges, _ranges[1:])), "split seed ranges overlap"
del _ranges
