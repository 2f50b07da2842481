"""lmms-eval integration: ``lmms-eval --model vlmfast`` and ShapesWorld as offline lmms-eval tasks.

- :mod:`.model`: the lmms-eval model classes (a chat class and a simple twin for loglikelihood tasks).
  lmms-eval finds them through the entry point
  ``lmms_eval.models: vlmfast = "vlmfast.integrations.lmms_eval:MANIFESTS"``.
- :mod:`.tasks`: :func:`~.tasks.export_lmms` writes the ShapesWorld tasks (parquet + YAML + ``utils.py``).
- :mod:`.task_utils`: the ``doc_to_*`` / ``process_results`` / aggregation functions those tasks use.

Importing this package does not import lmms-eval; ``MANIFESTS`` (and the model classes) do, lazily.
See docs/lmms_eval.md.
"""

from __future__ import annotations

MODEL_ID = "vlmfast"
CHAT_CLASS_PATH = "vlmfast.integrations.lmms_eval.model.VlmfastChat"
SIMPLE_CLASS_PATH = "vlmfast.integrations.lmms_eval.model.VlmfastSimple"


def manifests() -> list:
    """The lmms-eval ``ModelManifest`` list registering ``--model vlmfast`` (chat class by default,
    the simple class with ``--force_simple``)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, chat_class_path=CHAT_CLASS_PATH, simple_class_path=SIMPLE_CLASS_PATH)]


def __getattr__(name: str):
    if name == "MANIFESTS":
        return manifests()
    if name in ("VlmfastChat", "VlmfastSimple"):
        from . import model

        return getattr(model, name)
    if name == "export_lmms":
        from .tasks import export_lmms

        return export_lmms
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MANIFESTS", "MODEL_ID", "VlmfastChat", "VlmfastSimple", "export_lmms", "manifests"]
