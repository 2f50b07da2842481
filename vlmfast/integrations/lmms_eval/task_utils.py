"""The functions behind the exported ShapesWorld lmms-eval tasks (``!function utils.<name>`` in the YAMLs).

The ``utils.py`` written next to the task YAMLs by :func:`vlmfast.integrations.lmms_eval.tasks.export_lmms` re-exports
this module, so scoring lives (and is tested) in the package. Every metric uses vlmfast's own ShapesWorld
metrics (:func:`~vlmfast.datasets.shapes.vqa_accuracy`, :func:`~vlmfast.datasets.shapes.pope_metrics`,
:func:`~vlmfast.datasets.shapes.chair`), so lmms-eval scores equal ``vlmfast eval shapes`` scores on the same
items and predictions.

Per-document results are small dicts; the aggregations recompute the corpus-level metric from them
(POPE F1 and yes-ratio, CHAIR are not means of per-item scores).
"""

from __future__ import annotations

from typing import Any

from ...datasets.shapes import QUESTION_TYPES, chair, pope_metrics, vqa_accuracy

__all__ = [
    "doc_to_visual", "doc_to_text", "vqa_process_results", "pope_process_results", "caption_process_results",
    "pope_accuracy", "pope_precision", "pope_recall", "pope_f1", "pope_yes_ratio",
    "chair_s", "chair_i", "chair_recall", "VQA_TYPE_METRICS",
]

VQA_TYPE_METRICS = tuple(f"acc_{t}" for t in QUESTION_TYPES)
"""Per-question-type accuracy metrics of ``shapes_vqa`` (each aggregated over that type's questions only)."""


def doc_to_visual(doc: dict) -> list:
    return [doc["image"].convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question exactly as ``vlmfast eval shapes`` asks it (optional ``pre_prompt`` / ``post_prompt``
    from the YAML's ``lmms_eval_specific_kwargs``; the exported tasks set none)."""
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def _pred(results: list) -> str:
    pred = results[0] if results else ""
    return pred if isinstance(pred, str) else str(pred)


# --------------------------------------------------------------------------- VQA


def vqa_process_results(doc: dict, results: list) -> dict[str, Any]:
    """``exact_match`` (0/1) and ``acc_<type>`` for the question's type; scored by
    :func:`~vlmfast.datasets.shapes.vqa_accuracy` (``normalize_answer``, first word for yes/no types)."""
    hit = vqa_accuracy([_pred(results)], [{"answer": doc["answer"], "type": doc["type"]}])["overall"]
    return {"exact_match": hit, f"acc_{doc['type']}": hit}


# --------------------------------------------------------------------------- POPE

_POPE_METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def pope_process_results(doc: dict, results: list) -> dict[str, Any]:
    item = {"pred": _pred(results), "answer": doc["answer"]}
    return {m: item for m in _POPE_METRICS}


def _pope(items: list[dict], key: str) -> float:
    return pope_metrics([it["pred"] for it in items], [it["answer"] for it in items])[key]


def pope_accuracy(items):
    return _pope(items, "accuracy")


def pope_precision(items):
    return _pope(items, "precision")


def pope_recall(items):
    return _pope(items, "recall")


def pope_f1(items):
    return _pope(items, "f1")


def pope_yes_ratio(items):
    """Fraction of *predictions* that are yes (as in ``vlmfast eval shapes``)."""
    return _pope(items, "yes_ratio")


# --------------------------------------------------------------------------- captions / CHAIR


def caption_process_results(doc: dict, results: list) -> dict[str, Any]:
    item = {"caption": _pred(results), "objects": list(doc["objects"])}
    return {"chair_s": item, "chair_i": item, "recall": item}


def _chair(items: list[dict], key: str) -> float:
    return chair([it["caption"] for it in items], [it["objects"] for it in items])[key]


def chair_s(items):
    return _chair(items, "chair_s")


def chair_i(items):
    return _chair(items, "chair_i")


def chair_recall(items):
    return _chair(items, "recall")
