"""Which phrases to ground and which query rows carry their attention.

* Answer phrases: object nouns of the generated text (ShapesWorld's shapes and the 80 COCO categories by
  default, singular or plural, multi-word names first) with the colour adjectives right before them
  ("two green squares" -> "green squares"). Their rows are the positions whose logits *chose* the phrase's
  tokens (the attention that decided the word); the last prompt token chose the first answer token.
* Prompt phrases (``ground_phrases``): found in the prompt's token ids (the last occurrence); their rows are
  the phrase's own tokens and / or the last prompt token (``GroundingConfig.prompt_rows``).

Character spans are mapped to tokens by decoding growing prefixes, so any tokenizer works.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

from ..errors import InputError

SHAPES_WORLD_OBJECTS = ("circle", "square", "triangle", "star", "hexagon", "cross")
COCO_OBJECTS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)
DEFAULT_OBJECT_WORDS = SHAPES_WORLD_OBJECTS + COCO_OBJECTS
MODIFIERS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black", "brown", "pink", "gray",
             "grey", "small", "large", "big")
_IRREGULAR = {"person": "people", "mouse": "mice", "knife": "knives", "skis": "skis", "scissors": "scissors"}


def _plural(word: str) -> str:
    last = word.split()[-1]
    if last in _IRREGULAR:
        p = _IRREGULAR[last]
    elif last.endswith(("s", "x", "ch", "sh")):
        p = last + "es"
    elif last.endswith("y") and last[-2:-1] not in "aeiou":
        p = last[:-1] + "ies"
    else:
        p = last + "s"
    return " ".join(word.split()[:-1] + [p])


def object_phrases(text: str, object_words: Sequence[str] | None = None,
                   modifiers: Sequence[str] = MODIFIERS) -> list[tuple[str, int, int]]:
    """Object mentions in ``text``: (phrase, start, end) character spans, in order. A mention is an object
    noun (singular or plural; the longest name wins) with the modifier words directly before it. A word that
    is both a modifier and an object ("orange") counts as a modifier when an object follows."""
    pattern = _mention_pattern(tuple(object_words or DEFAULT_OBJECT_WORDS), tuple(modifiers))
    return [(m.group(0), m.start(), m.end()) for m in pattern.finditer(text)]


@functools.lru_cache(maxsize=16)
def _mention_pattern(words: tuple[str, ...], modifiers: tuple[str, ...]) -> re.Pattern:
    forms = sorted({f for w in words for f in (w.lower(), _plural(w.lower()))}, key=lambda f: -len(f))
    mods = "|".join(re.escape(m) for m in sorted(modifiers, key=len, reverse=True))
    nouns = "|".join(re.escape(f) for f in forms)
    return re.compile(rf"\b(?:(?:{mods})\s+)*(?:{nouns})\b", re.IGNORECASE)


def token_spans(tokenizer, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """The decoded text of ``ids`` and each token's (start, end) character span in it (decoded prefixes)."""
    spans, prev = [], 0
    text = ""
    for k in range(len(ids)):
        text = tokenizer.decode(list(ids[: k + 1]), skip_special_tokens=True)
        end = len(text)
        spans.append((min(prev, end), end))
        prev = end
    return text, spans


def tokens_in(spans: list[tuple[int, int]], start: int, end: int) -> list[int]:
    """Indices of the tokens overlapping the character span [start, end)."""
    return [k for k, (a, b) in enumerate(spans) if b > start and a < end and b > a]


def find_phrase(tokenizer, ids: Sequence[int], phrase: str) -> list[int]:
    """Token indices of the last occurrence of ``phrase`` in ``ids``: first as a token-id subsequence (the
    phrase tokenised alone, with and without a leading space), then by decoded characters. Raises
    InputError when it is not there."""
    ids = list(ids)
    for variant in (phrase, " " + phrase, phrase.strip()):
        sub = tokenizer(variant, add_special_tokens=False)["input_ids"]
        if not sub:
            continue
        for s in range(len(ids) - len(sub), -1, -1):
            if ids[s : s + len(sub)] == sub:
                return list(range(s, s + len(sub)))
    text, spans = token_spans(tokenizer, ids)
    at = text.lower().rfind(phrase.strip().lower())
    if at >= 0:
        found = tokens_in(spans, at, at + len(phrase.strip()))
        if found:
            return found
    raise InputError(f"ground_phrases: {phrase!r} does not occur in the prompt {text!r}; a phrase to ground "
                     "must be part of the prompt (its tokens' attention makes the map)")
