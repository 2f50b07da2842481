"""ShapesWorld: determinism, exact ground truth, derived tasks and metrics (fast, CPU only)."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest

from vlmfast.datasets.shapes import (
    ANSWERS,
    COLOR_NAMES,
    COLORS,
    MIN_VISIBLE_FRACTION,
    NUMBER_WORDS,
    POPE_SPLITS,
    QUESTION_TYPES,
    SHAPE_PLURALS,
    SHAPES,
    SPLIT_OFFSETS,
    SPLIT_SIZE,
    VOCABULARY,
    Background,
    Scene,
    ShapeObject,
    caption,
    caption_objects,
    chair,
    generate_scene,
    iter_scenes,
    mask_iou,
    miou,
    normalize_answer,
    object_prior,
    parse_mentions,
    pointing_accuracy,
    pope_items,
    pope_metrics,
    pope_set,
    referring_expressions,
    scene_texts,
    split_of,
    split_seeds,
    vqa_accuracy,
    vqa_items,
)
from vlmfast.datasets.shapes.tasks import LEFT_OF_MARGIN, POSITION_MARGIN

ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")
SINGULAR = {p: s for s, p in SHAPE_PLURALS.items()}


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    seeds = split_seeds("train", 120) + split_seeds("dev", 40) + split_seeds("test", 40) + split_seeds("final", 40)
    return [generate_scene(s) for s in seeds]  # every scene test below runs on every split's seeds


def _named(scene: Scene, color: str, shape: str) -> list[int]:
    return [i for i, o in enumerate(scene.objects) if o.color == color and o.shape == shape]


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 (8-neighbour) binary dilation."""
    padded = np.pad(mask, 1)
    h, w = mask.shape
    return np.any([padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], axis=0)


def _connected(mask: np.ndarray) -> bool:
    """Independent check: grow a region from one pixel by 8-neighbour dilation inside the mask."""
    ys, xs = np.nonzero(mask)
    sub = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    reach = np.zeros_like(sub)
    reach[ys[0] - ys.min(), xs[0] - xs.min()] = True
    while True:
        grown = _dilate(reach) & sub
        if (grown == reach).all():
            return bool((reach == sub).all())
        reach = grown


# --------------------------------------------------------------------------- scenes


def test_determinism() -> None:
    a, b = generate_scene(1234), generate_scene(1234)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.objects == b.objects and a.layout == b.layout and a.background == b.background
    images = {generate_scene(s).image.tobytes() for s in range(20)}
    assert len(images) == 20
    rng_state = np.random.get_state()[1].copy()  # the global RNG is never touched
    generate_scene(99)
    assert (np.random.get_state()[1] == rng_state).all()


def test_splits_are_disjoint() -> None:
    assert set(SPLIT_OFFSETS) == {"train", "dev", "test", "final"}
    ranges = sorted((o, o + SPLIT_SIZE) for o in SPLIT_OFFSETS.values())  # whole ranges, not only prefixes
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(ranges))
    last = {s: split_seeds(s, 1, start=SPLIT_SIZE - 1)[0] for s in SPLIT_OFFSETS}
    assert len(set(last.values()) | {split_seeds(s, 1)[0] for s in SPLIT_OFFSETS}) == 2 * len(SPLIT_OFFSETS)
    sets = {s: set(split_seeds(s, 5000)) for s in SPLIT_OFFSETS}
    for x, y in itertools.combinations(sets, 2):
        assert not sets[x] & sets[y]
    for s in SPLIT_OFFSETS:
        assert split_of(split_seeds(s, 1, start=SPLIT_SIZE - 1)[0]) == s
        assert {split_of(x) for x in split_seeds(s, 10)} == {s}
    with pytest.raises(ValueError):
        split_seeds("train", 2, start=SPLIT_SIZE - 1)  # would spill into dev
    with pytest.raises(ValueError):
        split_seeds("val", 1)
    assert [sc.seed for sc in iter_scenes("dev", 3, size=64)] == split_seeds("dev", 3)


def test_colours_far_apart_and_not_gray() -> None:
    rgb = np.array(list(COLORS.values()), dtype=float)
    dists = [np.linalg.norm(rgb[i] - rgb[j]) for i, j in itertools.combinations(range(len(rgb)), 2)]
    assert min(dists) > 100
    for r, g, b in COLORS.values():  # background pixels are grays with channels in [50, 210]
        assert not (r == g == b and 50 <= r <= 210)


def test_ground_truth_is_exact(scenes: list[Scene]) -> None:
    for scene in scenes:
        assert scene.image.mode == "RGB" and scene.image.size == (336, 336)
        assert 1 <= len(scene.objects) <= 8
        pix = np.asarray(scene.image)
        stack = np.stack([o.mask for o in scene.objects])
        assert stack.sum(axis=0).max() == 1  # visible masks are disjoint
        for o in scene.objects:
            assert o.shape in SHAPES and o.color in COLORS
            assert (pix[o.mask] == COLORS[o.color]).all()
            ys, xs = np.nonzero(o.mask)
            assert o.area == len(xs)
            assert o.bbox == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert o.center == pytest.approx((xs.mean() + 0.5, ys.mean() + 0.5))
            assert o.cell == (ROWS[int(o.center[1] // 112)], COLS[int(o.center[0] // 112)])
            assert o.area >= MIN_VISIBLE_FRACTION * o.full_area
            assert _connected(o.mask)
        bg = pix[~stack.any(axis=0)]
        assert (bg[:, 0] == bg[:, 1]).all() and (bg[:, 1] == bg[:, 2]).all()
        assert bg.min() >= 50 and bg.max() <= 210
        # same-colour objects never touch (they would merge into one blob)
        for a, b in itertools.combinations(scene.objects, 2):
            if a.color == b.color:
                assert not (_dilate(a.mask) & b.mask).any()


def test_every_attribute_occurs() -> None:
    sample = [generate_scene(s) for s in range(250)]
    assert {o.shape for sc in sample for o in sc.objects} == set(SHAPES)
    assert {o.color for sc in sample for o in sc.objects} == set(COLORS)
    assert {len(sc.objects) for sc in sample} == set(range(1, 9))
    assert {(sc.background.kind, sc.background.tone) for sc in sample} == {
        (k, t) for k in ("plain", "noise", "stripes") for t in ("light", "dark")}
    assert {o.cell for sc in sample for o in sc.objects} == {(r, c) for r in ROWS for c in COLS}


def test_render_at_other_size() -> None:
    scene = generate_scene(42)
    small = scene.render(112)
    assert small.image.size == (112, 112)
    assert small.image.tobytes() == generate_scene(42, size=112).image.tobytes()
    assert [(o.color, o.shape) for o in small.objects] == [(o.color, o.shape) for o in scene.objects]
    pix = np.asarray(small.image)
    for o, big in zip(small.objects, scene.objects):
        assert (pix[o.mask] == COLORS[o.color]).all()
        assert math.dist((o.center[0] * 3, o.center[1] * 3), big.center) < 6


def test_generation_is_fast() -> None:
    t = time.perf_counter()
    for s in range(40):
        generate_scene(s)
    per_scene = (time.perf_counter() - t) / 40
    assert per_scene < 0.05, f"{per_scene * 1000:.1f} ms per scene"  # ~2 ms on one CPU core


# --------------------------------------------------------------------------- VQA


def test_vqa_answers_match_ground_truth(scenes: list[Scene]) -> None:
    seen_types = set()
    for scene in scenes:
        objs = scene.objects
        items = vqa_items(scene)
        assert len({it.qid for it in items}) == len(items)
        for it in items:
            seen_types.add(it.type)
            words = it.question.split()
            assert it.answer in ANSWERS and words[-1] == "?"
            assert set(words) <= set(VOCABULARY) and it.question == it.question.lower()
            if it.type == "color":  # what colour is the <shape> ?
                matches = [o for o in objs if o.shape == words[4]]
                assert len(matches) == 1 and it.answer == matches[0].color
            elif it.type == "shape":  # what shape is the <colour> object ?
                matches = [o for o in objs if o.color == words[4]]
                assert len(matches) == 1 and it.answer == matches[0].shape
            elif it.type == "count":  # how many <shapes> / <colour> objects are there ?
                if words[2] == "objects":
                    n = len(objs)
                elif words[2] in SINGULAR:
                    n = sum(o.shape == SINGULAR[words[2]] for o in objs)
                else:
                    n = sum(o.color == words[2] for o in objs)
                assert it.answer == NUMBER_WORDS[n]
            elif it.type == "position":  # where is the <colour> <shape> ?
                (i,) = _named(scene, words[3], words[4])
                cx, cy = objs[i].center
                assert it.answer == f"{ROWS[int(cy * 3 // 336)]} {COLS[int(cx * 3 // 336)]}"
                for v in (cx, cy):
                    assert min(abs(v - 112), abs(v - 224)) >= POSITION_MARGIN * 336
            elif it.type == "left_of":  # is the <c> <s> left of the <c> <s> ?
                (a,) = _named(scene, words[2], words[3])
                (b,) = _named(scene, words[7], words[8])
                dx = objs[b].center[0] - objs[a].center[0]
                assert abs(dx) >= LEFT_OF_MARGIN * 336
                assert it.answer == ("yes" if dx > 0 else "no")
        # completeness: a colour question for every unique shape, a shape question for every unique colour
        shapes = [o.shape for o in objs]
        colors = [o.color for o in objs]
        asked = {it.question for it in items}
        for s in SHAPES:
            assert (f"what colour is the {s} ?" in asked) == (shapes.count(s) == 1)
        for c in COLOR_NAMES:
            assert (f"what shape is the {c} object ?" in asked) == (colors.count(c) == 1)
        answers = [it.answer for it in items if it.type == "left_of"]
        assert answers.count("yes") == answers.count("no") <= 1
    assert seen_types == set(QUESTION_TYPES)
    assert {it.answer for sc in scenes for it in vqa_items(sc, types=["count"])} == set(NUMBER_WORDS)


def test_vqa_is_deterministic_and_types_independent(scenes: list[Scene]) -> None:
    scene = max(scenes, key=lambda s: len(s.objects))
    assert vqa_items(scene) == vqa_items(generate_scene(scene.seed))
    everything = vqa_items(scene)
    for t in QUESTION_TYPES:
        assert vqa_items(scene, types=[t]) == [it for it in everything if it.type == t]
    capped = vqa_items(scene, max_per_type=1)
    assert all(sum(it.type == t for it in capped) <= 1 for t in QUESTION_TYPES)
    assert set(capped) <= set(everything)


def test_all_text_is_in_the_vocabulary(scenes: list[Scene]) -> None:
    for scene in scenes[:60]:
        for text in scene_texts(scene):
            assert text == " ".join(text.split()) and set(text.split()) <= set(VOCABULARY), text


# --------------------------------------------------------------------------- POPE


@pytest.mark.parametrize("split", POPE_SPLITS)
def test_pope_balanced_and_correct(scenes: list[Scene], split: str) -> None:
    prior = object_prior()
    items = pope_set(scenes, split)
    assert sum(it.answer == "yes" for it in items) * 2 == len(items)
    for scene in scenes:
        probes = pope_items(scene, split)
        present = caption_objects(scene)
        assert len(probes) == 2 * min(3, len(present))
        assert sum(p.answer == "yes" for p in probes) == sum(p.answer == "no" for p in probes)
        assert len({(p.color, p.shape) for p in probes}) == len(probes)
        assert probes == pope_items(generate_scene(scene.seed), split)
        for p in probes:
            assert p.question == f"is there {'an' if p.color == 'orange' else 'a'} {p.color} {p.shape} in the image ?"
            assert ((p.color, p.shape) in present) == (p.answer == "yes")
        negatives = [(p.color, p.shape) for p in probes if p.answer == "no"]
        if split == "adversarial":
            for c, s in negatives:
                assert any((c == pc) + (s == ps) == 1 for pc, ps in present)
        if split == "popular":  # the most frequent absent objects under the generator prior
            absent = sorted((k for k in prior if k not in present), key=lambda k: -prior[k])
            assert sorted(prior[k] for k in negatives) == sorted(prior[k] for k in absent[:len(negatives)])


# --------------------------------------------------------------------------- captions & referring expressions


def _rect(size: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    m = np.zeros((size, size), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _toy_scene() -> Scene:
    """30x30: red circle top left, two green squares in the middle row, a blue star bottom right."""
    objs = [
        ShapeObject.from_mask("star", "blue", _rect(30, 22, 22, 28, 28)),
        ShapeObject.from_mask("square", "green", _rect(30, 20, 12, 26, 18)),
        ShapeObject.from_mask("circle", "red", _rect(30, 1, 1, 7, 7)),
        ShapeObject.from_mask("square", "green", _rect(30, 2, 12, 8, 18)),
    ]
    return Scene(0, 30, None, objs, Background("plain", "light", 180), ())  # type: ignore[arg-type]


def test_caption_hand_example() -> None:
    scene = _toy_scene()
    assert [o.position for o in scene.objects] == ["bottom right", "middle right", "top left", "middle left"]
    assert caption(scene) == "a red circle , two green squares and a blue star ."


def test_captions_cover_ground_truth(scenes: list[Scene]) -> None:
    caps = [caption(s) for s in scenes]
    for cap, scene in zip(caps, scenes):
        assert set(parse_mentions(cap)) == caption_objects(scene)
        assert cap.endswith(" .")
    assert chair(caps, [s.objects for s in scenes]) == {"chair_s": 0.0, "chair_i": 0.0, "recall": 1.0}


def _resolve(scene: Scene, expression: str) -> list[int]:
    """Independent resolver for "the <noun phrase> [on the left|on the right|at the top|at the bottom]"."""
    words = expression.split()
    assert words[0] == "the"
    spatial = None
    if words[-2:] in (["the", "left"], ["the", "right"], ["the", "top"], ["the", "bottom"]):
        spatial, words = words[-1], words[1:-3]
    else:
        words = words[1:]
    if words[-1] == "object":
        cands = [i for i, o in enumerate(scene.objects) if o.color == words[0]]
    elif len(words) == 2:
        cands = _named(scene, words[0], words[1])
    else:
        cands = [i for i, o in enumerate(scene.objects) if o.shape == words[0]]
    if spatial is None:
        return cands
    assert len(cands) == 2
    axis = 0 if spatial in ("left", "right") else 1
    a, b = sorted(cands, key=lambda i: scene.objects[i].center[axis])
    assert scene.objects[b].center[axis] - scene.objects[a].center[axis] >= LEFT_OF_MARGIN * scene.size
    return [a] if spatial in ("left", "top") else [b]


def test_referring_expressions_are_unambiguous(scenes: list[Scene]) -> None:
    kinds = set()
    for scene in scenes:
        refs = referring_expressions(scene)
        assert len({r.expression for r in refs}) == len(refs)
        for r in refs:
            kinds.add(r.kind)
            assert _resolve(scene, r.expression) == [r.target], r.expression
            assert r.mask is scene.objects[r.target].mask and r.bbox == scene.objects[r.target].bbox
        # every object has at least one expression when its colour+shape is unique
        for i, o in enumerate(scene.objects):
            if len(_named(scene, o.color, o.shape)) == 1:
                assert any(r.target == i for r in refs)
    assert kinds == {"shape", "color", "color_shape", "spatial"}
    toy = referring_expressions(_toy_scene())
    assert {(r.expression, r.target) for r in toy} >= {
        ("the star", 0), ("the red object", 2), ("the square on the left", 3), ("the green square on the right", 1)}


# --------------------------------------------------------------------------- metrics (hand-computed)


def test_normalize_answer() -> None:
    assert normalize_answer("  Red. ") == "red"
    assert normalize_answer("Top-Left") == "top left"
    assert normalize_answer("the centre") == "center"
    assert normalize_answer("3") == "three"
    assert normalize_answer("Yes, it is.", yes_no=True) == "yes"
    assert normalize_answer("No", yes_no=True) == "no"
    assert normalize_answer("", yes_no=True) == ""


def test_vqa_accuracy_hand_example() -> None:
    items = [
        {"type": "color", "answer": "red"},
        {"type": "count", "answer": "three"},
        {"type": "left_of", "answer": "yes"},
        {"type": "position", "answer": "top left"},
        {"type": "shape", "answer": "star"},
    ]
    preds = ["Red.", "3", "Yes, it is", "top-left", "circle"]
    acc = vqa_accuracy(preds, items)
    assert acc["overall"] == pytest.approx(0.8) and acc["n"] == 5
    assert acc["color"] == acc["count"] == acc["left_of"] == acc["position"] == 1.0 and acc["shape"] == 0.0


def test_pope_metrics_hand_example() -> None:
    # TP = 1 (#0), FP = 2 (#1, #3), TN = 1 (#2), FN = 0
    m = pope_metrics(["Yes.", "yes there is", "no", True], ["yes", "no", "no", "no"])
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["precision"] == pytest.approx(1 / 3)
    assert m["recall"] == pytest.approx(1.0)
    assert m["f1"] == pytest.approx(0.5)
    assert m["yes_ratio"] == pytest.approx(0.75)  # of predictions, not labels (0.25)
    none_yes = pope_metrics(["no", "nope"], ["yes", "no"])
    assert none_yes["precision"] == 0.0 and none_yes["f1"] == 0.0 and none_yes["accuracy"] == 0.5


def test_chair_hand_example() -> None:
    caps = ["a red circle and two blue stars .", "a yellow triangle , a green cross and a square ."]
    gts = [[("red", "circle"), ("blue", "star"), ("blue", "star"), ("green", "square")],
           ["yellow triangle", "black square"]]
    assert parse_mentions(caps[1]) == [("yellow", "triangle"), ("green", "cross"), (None, "square")]
    # mentions: 2 + 3 = 5, hallucinated: green cross -> chair_i 1/5, chair_s 1/2;
    # recall: kinds 3 + 2 = 5, mentioned with colour and shape: red circle, blue star, yellow triangle -> 3/5
    assert chair(caps, gts) == pytest.approx({"chair_s": 0.5, "chair_i": 0.2, "recall": 0.6})


def test_masks_and_pointing_hand_example() -> None:
    pred, gt = _rect(4, 0, 0, 2, 2), _rect(4, 1, 1, 3, 3)  # overlap 1 pixel, union 7
    assert mask_iou(pred, gt) == pytest.approx(1 / 7)
    assert mask_iou(np.zeros((4, 4), bool), np.zeros((4, 4), bool)) == 1.0
    assert miou([pred, gt], [gt, gt]) == pytest.approx((1 / 7 + 1) / 2)
    points = [(1.5, 1.2), (0.5, 0.5), None, (10.0, 10.0), (2.9, 2.9)]
    assert pointing_accuracy(points, [gt] * 5) == pytest.approx(2 / 5)
