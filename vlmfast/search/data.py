"""Calibration data for ``vlmfast search``: ShapesWorld questions or a user's JSONL of images + prompts.

Specs (``--data``):

* ``shapes:dev`` / ``shapes:dev:N`` / ``shapes:train:N`` -- N ShapesWorld questions (default 32): sample i is
  scene i of the split with one of its VQA questions, the question types taken in turn (colour, shape,
  count, position, left_of) so every type is represented. The held-out splits are refused: a search chooses,
  and choosing on ``final`` (kept for reported numbers) or ``test`` would make their numbers optimistic.
* ``jsonl:PATH`` -- one JSON object per line: ``{"image": "a.png", "prompt": "..."}`` with optional
  ``"answer"`` (then accuracy is reported beside the objective) and ``"type"`` (``"yes_no"`` scores only the
  first word of the reply). ``image`` may be a list of paths; relative paths are relative to the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError

DEFAULT_SHAPES_N = 32
_JSONL_KEYS = {"image", "prompt", "answer", "type", "id"}


@dataclass
class Sample:
    images: list
    """PIL images (usually one)"""
    prompt: str
    answer: str | None = None
    type: str = "custom"
    """question type, for per-type accuracy; ``left_of``, ``pope`` and ``yes_no`` are scored as yes/no"""


@dataclass
class CalibrationData:
    spec: str
    samples: list[Sample] = field(default_factory=list)

    @property
    def has_answers(self) -> bool:
        return bool(self.samples) and all(s.answer is not None for s in self.samples)

    def batches(self, size: int) -> list[list[Sample]]:
        return [self.samples[i:i + size] for i in range(0, len(self.samples), size)]


def load_data(spec: str) -> CalibrationData:
    """Parse a ``--data`` spec and load its samples; errors name the spec and what was expected."""
    if not isinstance(spec, str) or ":" not in spec and spec != "shapes":
        raise InputError(f"--data {spec!r}: expected shapes:SPLIT[:N] (e.g. shapes:dev:64) or jsonl:PATH")
    kind, _, rest = spec.partition(":")
    if kind == "shapes":
        return CalibrationData(spec, _shapes(spec, rest))
    if kind == "jsonl":
        return CalibrationData(spec, _jsonl(spec, rest))
    raise InputError(f"--data {spec!r}: unknown source {kind!r}; expected shapes:SPLIT[:N] or jsonl:PATH")


def _shapes(spec: str, rest: str) -> list[Sample]:
    from ..datasets.shapes import QUESTION_TYPES, SPLIT_SIZE, iter_scenes, vqa_items

    parts = rest.split(":") if rest else ["dev"]
    if len(parts) > 2:
        raise InputError(f"--data {spec!r}: expected shapes:SPLIT[:N]")
    split = parts[0] or "dev"
    if split == "final":
        raise InputError(f"--data {spec!r}: the final split is kept for reported numbers only, and a search "
                         "chooses: calibrating on it would spoil it (its numbers would be optimistic); calibrate on "
                         "shapes:dev or shapes:train")
    if split == "test":
        raise InputError(f"--data {spec!r}: the test split is for evaluation (`vlmfast eval shapes --split test`); "
                         "calibrate on shapes:dev or shapes:train")
    if split not in ("dev", "train"):
        raise InputError(f"--data {spec!r}: unknown ShapesWorld split {split!r}; expected dev or train")
    n = DEFAULT_SHAPES_N
    if len(parts) == 2:
        try:
            n = int(parts[1])
        except ValueError:
            raise InputError(f"--data {spec!r}: N must be a positive integer, got {parts[1]!r}") from None
        if not 0 < n <= SPLIT_SIZE:
            raise InputError(f"--data {spec!r}: N must be in 1..{SPLIT_SIZE}, got {n}")
    samples = []
    for i, scene in enumerate(iter_scenes(split, n)):
        items = vqa_items(scene, max_per_type=1)
        want = QUESTION_TYPES[i % len(QUESTION_TYPES)]
        item = next((it for it in items if it.type == want), items[i % len(items)])
        samples.append(Sample([scene.image], item.question, item.answer, item.type))
    return samples


def _jsonl(spec: str, rest: str) -> list[Sample]:
    from ..inputs import load_image

    path = Path(rest)
    if not rest or not path.is_file():
        raise InputError(f"--data {spec!r}: {str(path)!r} is not a file (expected jsonl:PATH to a JSONL file of "
                         '{"image": ..., "prompt": ...} objects)')
    samples = []
    for no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON: {e.msg}") from None
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected an object like {{\"image\": ..., \"prompt\": ...}}, "
                             f"got {type(row).__name__}")
        unknown = sorted(set(row) - _JSONL_KEYS)
        if unknown:
            raise InputError(f"{where}: unknown key(s) {unknown}; expected {sorted(_JSONL_KEYS)}")
        missing = [k for k in ("image", "prompt") if k not in row]
        if missing:
            raise InputError(f"{where}: missing {missing}; every line needs \"image\" and \"prompt\"")
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise InputError(f"{where}: \"prompt\" must be a non-empty string")
        files = row["image"] if isinstance(row["image"], list) else [row["image"]]
        if not files or not all(isinstance(f, str) for f in files):
            raise InputError(f"{where}: \"image\" must be a path or a non-empty list of paths")
        images = [load_image(f if Path(f).is_absolute() else path.parent / f, where) for f in files]
        answer = row.get("answer")
        if answer is not None and not isinstance(answer, str):
            raise InputError(f"{where}: \"answer\" must be a string")
        samples.append(Sample(images, row["prompt"], answer, str(row.get("type", "custom"))))
    if not samples:
        raise InputError(f"--data {spec!r}: {path} has no samples")
    answered = sum(s.answer is not None for s in samples)
    if 0 < answered < len(samples):
        raise InputError(f"--data {spec!r}: {answered} of {len(samples)} lines have an \"answer\"; give every line "
                         "an answer (accuracy is reported) or none")
    return samples
