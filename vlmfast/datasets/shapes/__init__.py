"""ShapesWorld: a deterministic generated world of coloured shapes with exact ground truth.

Scenes (:func:`generate_scene`) are images of 1-8 coloured shapes on a gray background, with an
exact visible mask, bbox, centroid, 3x3 cell and area per object. From a scene the package derives
VQA questions, POPE existence probes (random / popular / adversarial), a canonical caption and
unambiguous referring expressions, all in a small closed vocabulary (:data:`VOCABULARY`), and
scores model outputs with :mod:`.metrics`. Only numpy and PIL are used.

>>> from vlmfast.datasets.shapes import generate_scene, vqa_items, caption
>>> scene = generate_scene(7)
>>> caption(scene), vqa_items(scene)[0].question  # doctest: +SKIP
"""

from .metrics import (
    chair,
    mask_iou,
    miou,
    normalize_answer,
    parse_mentions,
    pointing_accuracy,
    pope_metrics,
    vqa_accuracy,
)
from .scene import (
    CANONICAL_SIZE,
    MIN_VISIBLE_FRACTION,
    SPLIT_OFFSETS,
    SPLIT_SIZE,
    SPLITS,
    Background,
    Scene,
    ShapeObject,
    ShapeSpec,
    generate_scene,
    iter_scenes,
    split_of,
    split_seeds,
)
from .tasks import (
    CAPTION_PROMPT,
    PopeItem,
    RefExp,
    VQAItem,
    caption,
    caption_objects,
    pope_items,
    pope_negative_candidates,
    pope_question,
    pope_set,
    raster_order,
    referring_expressions,
    scene_texts,
    vqa_items,
)
from .vocab import (
    ANSWERS,
    COLOR_NAMES,
    COLOR_PRIOR,
    COLORS,
    COLS,
    NUMBER_WORDS,
    POPE_SPLITS,
    POSITIONS,
    QUESTION_TYPES,
    ROWS,
    SHAPE_PLURALS,
    SHAPE_PRIOR,
    SHAPES,
    VOCABULARY,
    YES_NO,
    object_prior,
    objects_by_frequency,
)

__all__ = [
    # scenes
    "generate_scene", "iter_scenes", "split_seeds", "split_of", "Scene", "ShapeObject", "ShapeSpec", "Background",
    "CANONICAL_SIZE", "MIN_VISIBLE_FRACTION", "SPLIT_OFFSETS", "SPLIT_SIZE", "SPLITS",
    # tasks
    "vqa_items", "VQAItem", "pope_items", "pope_set", "pope_question", "pope_negative_candidates", "PopeItem",
    "caption", "caption_objects", "CAPTION_PROMPT", "raster_order", "referring_expressions", "RefExp", "scene_texts",
    # metrics
    "normalize_answer", "vqa_accuracy", "pope_metrics", "chair", "parse_mentions", "mask_iou", "miou",
    "pointing_accuracy",
    # vocabulary
    "SHAPES", "SHAPE_PLURALS", "COLORS", "COLOR_NAMES", "SHAPE_PRIOR", "COLOR_PRIOR", "NUMBER_WORDS", "ROWS",
    "COLS", "POSITIONS", "YES_NO", "QUESTION_TYPES", "POPE_SPLITS", "ANSWERS", "VOCABULARY", "object_prior",
    "objects_by_frequency",
]
