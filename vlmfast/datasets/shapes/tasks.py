"""Tasks derived from a ShapesWorld scene: VQA, POPE probes, captions, referring expressions.

Everything is a deterministic function of the scene (its objects and seed). Random choices use
``numpy.random.default_rng((scene.seed, stream, ...))``, a stream per task (and per VQA type and
POPE split), so asking for one task or type never changes another.

Text conventions (see :mod:`.vocab`): lowercase words from :data:`~.vocab.VOCABULARY`, separated
by single spaces, punctuation as its own token: ``"what colour is the star ?"``,
``"a red circle , a blue star and two green squares ."``. ``text.split()`` tokenizes.

An object is *named* by ``"<colour> <shape>"`` only when that combination is unique in the scene;
every question and expression below is generated only when it is unambiguous.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from .scene import Scene, ShapeObject
from .vocab import (
    COLOR_NAMES,
    COLS,
    NUMBER_WORDS,
    POPE_SPLITS,
    QUESTION_TYPES,
    ROWS,
    SHAPE_PLURALS,
    SHAPES,
    article,
    objects_by_frequency,
)

POSITION_MARGIN = 0.03
"""Position questions need the centroid at least this far (fraction of the side) from a cell border."""
LEFT_OF_MARGIN = 0.08
"""left_of questions and left/right (top/bottom) expressions need centroids this far apart in x (y)."""
ZERO_COUNT_PROB = 0.25
"""Probability that a scene also gets a count question whose answer is ``zero``."""

_VQA_STREAM, _POPE_STREAM = 101, 102


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng((seed, *stream))


# --------------------------------------------------------------------------- VQA


@dataclass(frozen=True)
class VQAItem:
    """One question about a scene with its ground-truth answer (a word / phrase from ``ANSWERS``)."""

    qid: str
    seed: int
    type: str
    question: str
    answer: str
    targets: tuple[int, ...] = ()
    """indices (into ``scene.objects``) of the objects the question is about"""

    def to_dict(self) -> dict:
        return asdict(self)


def _combo_counts(objects: Sequence[ShapeObject]) -> Counter:
    return Counter((o.color, o.shape) for o in objects)


def _color_questions(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str, tuple[int, ...]]]:
    shapes = Counter(o.shape for o in scene.objects)
    return [(f"what colour is the {o.shape} ?", o.color, (i,))
            for i, o in enumerate(scene.objects) if shapes[o.shape] == 1]


def _shape_questions(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str, tuple[int, ...]]]:
    colors = Counter(o.color for o in scene.objects)
    return [(f"what shape is the {o.color} object ?", o.shape, (i,))
            for i, o in enumerate(scene.objects) if colors[o.color] == 1]


def _count_questions(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str, tuple[int, ...]]]:
    objs = scene.objects
    out = [("how many objects are there ?", NUMBER_WORDS[len(objs)], tuple(range(len(objs))))]
    for s in SHAPES:
        idx = tuple(i for i, o in enumerate(objs) if o.shape == s)
        if idx:
            out.append((f"how many {SHAPE_PLURALS[s]} are there ?", NUMBER_WORDS[len(idx)], idx))
    for c in COLOR_NAMES:
        idx = tuple(i for i, o in enumerate(objs) if o.color == c)
        if idx:
            out.append((f"how many {c} objects are there ?", NUMBER_WORDS[len(idx)], idx))
    if rng.random() < ZERO_COUNT_PROB:
        absent_shapes = [s for s in SHAPES if all(o.shape != s for o in objs)]
        absent_colors = [c for c in COLOR_NAMES if all(o.color != c for o in objs)]
        by_shape = rng.random() < 0.5
        if (by_shape and absent_shapes) or not absent_colors:
            if absent_shapes:
                s = absent_shapes[int(rng.integers(len(absent_shapes)))]
                out.append((f"how many {SHAPE_PLURALS[s]} are there ?", NUMBER_WORDS[0], ()))
        else:
            c = absent_colors[int(rng.integers(len(absent_colors)))]
            out.append((f"how many {c} objects are there ?", NUMBER_WORDS[0], ()))
    return out


def _position_questions(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str, tuple[int, ...]]]:
    combos = _combo_counts(scene.objects)
    m = POSITION_MARGIN * scene.size
    borders = (scene.size / 3, 2 * scene.size / 3)
    out: list[tuple[str, str, tuple[int, ...]]] = []
    for i, o in enumerate(scene.objects):
        if combos[(o.color, o.shape)] != 1:
            continue
        if any(abs(v - b) < m for v in o.center for b in borders):
            continue
        out.append((f"where is the {o.color} {o.shape} ?", o.position, (i,)))
    return out


def _left_of_questions(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str, tuple[int, ...]]]:
    """One ``yes`` and one ``no`` question per scene (exactly balanced) when any pair qualifies."""
    combos = _combo_counts(scene.objects)
    named = [i for i, o in enumerate(scene.objects) if combos[(o.color, o.shape)] == 1]
    m = LEFT_OF_MARGIN * scene.size
    pairs = [(a, b) for a in named for b in named  # a clearly left of b
             if scene.objects[b].center[0] - scene.objects[a].center[0] >= m]
    if not pairs:
        return []
    k_yes = int(rng.integers(len(pairs)))
    k_no = int(rng.integers(len(pairs) - 1)) if len(pairs) > 1 else 0
    if len(pairs) > 1 and k_no >= k_yes:  # a different pair for the "no" question when possible
        k_no += 1
    (a, b), (d, c) = pairs[k_yes], pairs[k_no]  # c is clearly right of d: "is c left of d" -> no
    o = scene.objects

    def q(x: int, y: int) -> str:
        return f"is the {o[x].color} {o[x].shape} left of the {o[y].color} {o[y].shape} ?"

    return [(q(a, b), "yes", (a, b)), (q(c, d), "no", (c, d))]


_GENERATORS = {
    "color": _color_questions, "shape": _shape_questions, "count": _count_questions,
    "position": _position_questions, "left_of": _left_of_questions,
}
assert tuple(_GENERATORS) == QUESTION_TYPES


def vqa_items(scene: Scene, types: Iterable[str] = QUESTION_TYPES, max_per_type: int | None = None) -> list[VQAItem]:
    """All unambiguous VQA questions of ``scene`` for ``types`` (optionally at most ``max_per_type``
    of each type, a deterministic random subset kept in order).

    - ``color``: "what colour is the <shape> ?" -- only for shapes that occur once.
    - ``shape``: "what shape is the <colour> object ?" -- only for colours that occur once.
    - ``count``: "how many objects are there ?" (uniform over one..eight), then
      "how many <shapes> are there ?" / "how many <colour> objects are there ?" for every
      present shape and colour, plus (probability :data:`ZERO_COUNT_PROB`) one about an absent
      shape or colour, answered ``zero``. Answers are ``NUMBER_WORDS``.
    - ``position``: "where is the <colour> <shape> ?" -> "<row> <col>" of the centroid's 3x3 cell,
      for uniquely named objects whose centroid is at least :data:`POSITION_MARGIN` from cell borders.
    - ``left_of``: "is the <A> left of the <B> ?" between uniquely named objects whose centroids
      differ by at least :data:`LEFT_OF_MARGIN` in x; one ``yes`` and one ``no`` per scene, so the
      type is exactly balanced (with ``max_per_type=1`` one of the two is kept at random).
    """
    items: list[VQAItem] = []
    for t in types:
        if t not in _GENERATORS:
            raise ValueError(f"unknown question type {t!r}; expected one of {QUESTION_TYPES}")
        rng = _rng(scene.seed, _VQA_STREAM, QUESTION_TYPES.index(t))
        qs = list(enumerate(_GENERATORS[t](scene, rng)))  # qid numbering is kept when subsampling
        if max_per_type is not None and len(qs) > max_per_type:
            keep = sorted(rng.choice(len(qs), size=max_per_type, replace=False).tolist())
            qs = [qs[k] for k in keep]
        items.extend(VQAItem(f"{scene.seed}:{t}:{k}", scene.seed, t, q, a, tg) for k, (q, a, tg) in qs)
    return items


# --------------------------------------------------------------------------- POPE


@dataclass(frozen=True)
class PopeItem:
    """A POPE existence probe "is there a <colour> <shape> in the image ?" -> yes / no."""

    qid: str
    seed: int
    split: str
    question: str
    answer: str
    color: str
    shape: str
    type: str = "pope"

    def to_dict(self) -> dict:
        return asdict(self)


def pope_question(color: str, shape: str) -> str:
    return f"is there {article(color)} {color} {shape} in the image ?"


def _present_combos(scene: Scene) -> list[tuple[str, str]]:
    present = {(o.color, o.shape) for o in scene.objects}
    return [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) in present]


def pope_negative_candidates(scene: Scene, split: str) -> list[tuple[str, str]]:
    """Absent ``(colour, shape)`` combinations that ``split`` may probe, in a fixed order.

    - ``random``: every absent combination (vocabulary order).
    - ``popular``: every absent combination, most frequent first under the generator prior
      (:func:`~.vocab.objects_by_frequency`; colour and shape are drawn independently from the
      skewed ``COLOR_PRIOR`` / ``SHAPE_PRIOR``, so this is the exact training-set frequency).
    - ``adversarial``: absent combinations differing from some present object in exactly one
      attribute (same shape and another colour, or same colour and another shape).
    """
    present = set(_present_combos(scene))
    if split == "random":
        return [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in present]
    if split == "popular":
        return [k for k in objects_by_frequency() if k not in present]
    if split == "adversarial":
        return [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in present
                and any((c == pc) != (s == ps) for pc, ps in present)]
    raise ValueError(f"unknown POPE split {split!r}; expected one of {POPE_SPLITS}")


def pope_items(scene: Scene, split: str, per_scene: int = 3) -> list[PopeItem]:
    """``n`` present and ``n`` absent probes for ``scene``, ``n = min(per_scene, distinct objects)``.

    Present probes are distinct ``(colour, shape)`` combinations of the scene chosen at random;
    absent ones come from :func:`pope_negative_candidates`: a random sample for ``random`` and
    ``adversarial``, the ``n`` most frequent absent objects for ``popular`` (as in POPE). The
    ``2n`` probes are shuffled. Yes/no is exactly balanced for every scene.
    """
    cands = pope_negative_candidates(scene, split)
    present = _present_combos(scene)
    rng = _rng(scene.seed, _POPE_STREAM, POPE_SPLITS.index(split))
    n = min(per_scene, len(present), len(cands))
    pos = [present[k] for k in rng.choice(len(present), size=n, replace=False)]
    if split == "popular":
        neg = cands[:n]
    else:
        neg = [cands[k] for k in rng.choice(len(cands), size=n, replace=False)]
    probes = [(c, s, "yes") for c, s in pos] + [(c, s, "no") for c, s in neg]
    order = rng.permutation(len(probes))
    return [PopeItem(f"{scene.seed}:pope-{split}:{k}", scene.seed, split, pope_question(c, s), a, c, s)
            for k, (c, s, a) in enumerate(probes[j] for j in order)]


def pope_set(scenes: Iterable[Scene], split: str, per_scene: int = 3) -> list[PopeItem]:
    """POPE probes of ``split`` over many scenes; exactly as many ``yes`` as ``no`` answers."""
    items = [it for scene in scenes for it in pope_items(scene, split, per_scene)]
    n_yes = sum(it.answer == "yes" for it in items)
    assert 2 * n_yes == len(items), "POPE set is not balanced"
    return items


# --------------------------------------------------------------------------- captions


def raster_order(scene: Scene) -> list[int]:
    """Object indices in reading order: by 3x3 cell (rows top to bottom, then columns), then by
    centroid y, then x."""
    def key(i: int) -> tuple:
        o = scene.objects[i]
        return (ROWS.index(o.cell[0]), COLS.index(o.cell[1]), o.center[1], o.center[0])
    return sorted(range(len(scene.objects)), key=key)


CAPTION_PROMPT = "what objects are in the image ?"
"""the prompt a caption is asked with (training, evaluation and the lmms-eval task use this one)"""


def caption(scene: Scene) -> str:
    """Canonical caption naming every object, e.g. ``"a red circle , a blue star and two green squares ."``.

    Objects with the same colour and shape are grouped with a number word; groups appear in
    :func:`raster_order` of their first member.
    """
    groups: dict[tuple[str, str], int] = {}
    for i in raster_order(scene):
        o = scene.objects[i]
        groups[(o.color, o.shape)] = groups.get((o.color, o.shape), 0) + 1
    phrases = [f"{article(c)} {c} {s}" if k == 1 else f"{NUMBER_WORDS[k]} {c} {SHAPE_PLURALS[s]}"
               for (c, s), k in groups.items()]
    if len(phrases) == 1:
        body = phrases[0]
    else:
        body = " , ".join(phrases[:-1]) + " and " + phrases[-1]
    return body + " ."


def caption_objects(scene: Scene) -> set[tuple[str, str]]:
    """The ground-truth ``(colour, shape)`` set of a scene, for CHAIR."""
    return {(o.color, o.shape) for o in scene.objects}


# --------------------------------------------------------------------------- referring expressions


@dataclass(frozen=True, eq=False)
class RefExp:
    """An unambiguous referring expression and the object it denotes."""

    rid: str
    seed: int
    expression: str
    target: int
    """index into ``scene.objects``"""
    kind: str
    """``shape`` ("the star"), ``color`` ("the red object"), ``color_shape`` ("the red star") or
    ``spatial`` ("the star on the left", "the red object at the top")"""
    mask: np.ndarray = field(repr=False)
    """the target's visible mask (bool H x W)"""
    bbox: tuple[int, int, int, int] = (0, 0, 0, 0)


def referring_expressions(scene: Scene) -> list[RefExp]:
    """Every unambiguous expression of the scene's templates, ordered by target then kind.

    A plain description is used when it matches exactly one object. A description matching exactly
    two objects is disambiguated spatially ("on the left" / "on the right" when their centroids
    differ by :data:`LEFT_OF_MARGIN` in x, "at the top" / "at the bottom" likewise in y).
    """
    objs = scene.objects
    m = LEFT_OF_MARGIN * scene.size
    found: list[tuple[int, int, str, str]] = []  # (target, kind order, kind, expression)
    describers = (  # kind, key, noun phrase
        ("shape", lambda o: o.shape, lambda o: o.shape),
        ("color", lambda o: o.color, lambda o: f"{o.color} object"),
        ("color_shape", lambda o: (o.color, o.shape), lambda o: f"{o.color} {o.shape}"),
    )
    for order, (kind, key, noun) in enumerate(describers):
        groups: dict[object, list[int]] = {}
        for i, o in enumerate(objs):
            groups.setdefault(key(o), []).append(i)
        for members in groups.values():
            if len(members) == 1:
                i = members[0]
                found.append((i, order, kind, f"the {noun(objs[i])}"))
            elif len(members) == 2:
                a, b = members
                for axis, (lo, hi) in ((0, ("on the left", "on the right")), (1, ("at the top", "at the bottom"))):
                    first, second = (a, b) if objs[a].center[axis] <= objs[b].center[axis] else (b, a)
                    if objs[second].center[axis] - objs[first].center[axis] >= m:
                        found.append((first, 3, "spatial", f"the {noun(objs[first])} {lo}"))
                        found.append((second, 3, "spatial", f"the {noun(objs[second])} {hi}"))
    found.sort(key=lambda f: (f[0], f[1]))
    return [RefExp(f"{scene.seed}:ref:{k}", scene.seed, expr, i, kind, objs[i].mask, objs[i].bbox)
            for k, (i, _, kind, expr) in enumerate(found)]


def scene_texts(scene: Scene) -> list[str]:
    """Every text the tasks produce for a scene (questions, answers, POPE probes, caption,
    expressions); handy to check or build a tokenizer."""
    texts = [t for it in vqa_items(scene) for t in (it.question, it.answer)]
    texts += [t for split in POPE_SPLITS for it in pope_items(scene, split) for t in (it.question, it.answer)]
    texts.append(caption(scene))
    texts += [r.expression for r in referring_expressions(scene)]
    return texts
