"""The closed vocabulary of ShapesWorld: object attributes, answers and every word of the text.

All text the package produces (questions, answers, captions, referring expressions) is lowercase
and made of the words in :data:`VOCABULARY` separated by single spaces; punctuation (``,`` ``.``
``?``) is its own space-separated token. A word-level tokenizer is therefore ``text.split()``.
"""

from __future__ import annotations

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "cross")
"""Object shape classes."""

SHAPE_PLURALS: dict[str, str] = {
    "circle": "circles", "square": "squares", "triangle": "triangles",
    "star": "stars", "hexagon": "hexagons", "cross": "crosses",
}
"""Plural of each shape word (used in count questions and captions)."""

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (210, 25, 35),
    "green": (30, 170, 60),
    "blue": (30, 80, 230),
    "yellow": (250, 240, 40),
    "purple": (150, 50, 190),
    "orange": (255, 140, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
"""Object colour names and their exact RGB values (pairwise far apart; none is a mid gray, so no
object colour can coincide with a background pixel, whose channels are equal and in [50, 210])."""

COLOR_NAMES: tuple[str, ...] = tuple(COLORS)

SHAPE_PRIOR: dict[str, float] = {
    "circle": 0.24, "square": 0.20, "triangle": 0.17, "star": 0.14, "hexagon": 0.13, "cross": 0.12,
}
"""Generator prior over shapes. Deliberately skewed (about 2:1 between most and least frequent) so
that "popular" POPE negatives and language priors mean something, as objects do in COCO."""

COLOR_PRIOR: dict[str, float] = {
    "red": 0.18, "blue": 0.16, "green": 0.15, "yellow": 0.12,
    "white": 0.11, "black": 0.10, "orange": 0.09, "purple": 0.09,
}
"""Generator prior over colours (independent of the shape), also skewed about 2:1."""

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
"""Count answers; ``NUMBER_WORDS[n]`` is the word for ``n`` (a scene has at most 8 objects)."""

ROWS: tuple[str, ...] = ("top", "middle", "bottom")
COLS: tuple[str, ...] = ("left", "center", "right")
POSITIONS: tuple[str, ...] = tuple(f"{r} {c}" for r in ROWS for c in COLS)
"""Answers of position questions: 3x3 cell of the object's centroid, ``"<row> <col>"``."""

YES_NO: tuple[str, ...] = ("yes", "no")

QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "count", "position", "left_of")
"""VQA question types (the ``type`` field of a VQA item)."""

POPE_SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")

ANSWERS: tuple[str, ...] = COLOR_NAMES + SHAPES + NUMBER_WORDS + YES_NO + POSITIONS
"""Every possible VQA / POPE answer (position answers are two words)."""

PUNCTUATION: tuple[str, ...] = (",", ".", "?")

TEMPLATE_WORDS: tuple[str, ...] = (
    "what", "colour", "is", "the", "shape", "object", "objects", "how", "many", "are", "there",
    "where", "of", "a", "an", "and", "in", "image", "on", "at",
)
"""Function words used by the question / caption / referring-expression templates."""


def _vocabulary() -> tuple[str, ...]:
    words: list[str] = []
    for group in (PUNCTUATION, TEMPLATE_WORDS, COLOR_NAMES, SHAPES, tuple(SHAPE_PLURALS.values()),
                  NUMBER_WORDS, YES_NO, ROWS, COLS):
        for w in group:
            if w not in words:
                words.append(w)
    return tuple(words)


VOCABULARY: tuple[str, ...] = _vocabulary()
"""Every word (token) that any generated question, answer, caption or referring expression uses,
in a fixed order (no special tokens: the tokenizer adds its own)."""

assert abs(sum(SHAPE_PRIOR.values()) - 1) < 1e-9 and set(SHAPE_PRIOR) == set(SHAPES)
assert abs(sum(COLOR_PRIOR.values()) - 1) < 1e-9 and set(COLOR_PRIOR) == set(COLORS)


def article(word: str) -> str:
    """``"an"`` before a vowel sound (only ``orange`` in this vocabulary), else ``"a"``."""
    return "an" if word[0] in "aeiou" else "a"


def object_prior() -> dict[tuple[str, str], float]:
    """Probability of each ``(colour, shape)`` combination for one generated object.

    Colour and shape are drawn independently, so this is the product of :data:`COLOR_PRIOR` and
    :data:`SHAPE_PRIOR`. It defines object *frequency* for POPE's "popular" split.
    """
    return {(c, s): COLOR_PRIOR[c] * SHAPE_PRIOR[s] for c in COLOR_NAMES for s in SHAPES}


def objects_by_frequency() -> list[tuple[str, str]]:
    """All 48 ``(colour, shape)`` combinations, most frequent first (ties: vocabulary order)."""
    prior = object_prior()
    order = {k: i for i, k in enumerate(prior)}
    return sorted(prior, key=lambda k: (-prior[k], order[k]))
