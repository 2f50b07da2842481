"""SAM for grounding: loading a predictor safely, and turning a map's point prompts into a mask.

Any object with segment-anything's predictor API works (``set_image(HxWx3 uint8 RGB)``,
``predict(point_coords, point_labels, box, mask_input, multimask_output) -> (masks, scores, low_res)``):
segment-anything's ``SamPredictor`` (the default, on ``tiny-sam-shapes`` or a ViT-B/L/H checkpoint), MobileSAM's
(``vit_t``), or one you assign to ``acc.sam_predictor``. Checkpoints are loaded with
``torch.load(weights_only=True)`` (or safetensors); segment-anything's own builders, which call a bare
``torch.load``, only ever receive ``checkpoint=None``.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import PolicyError
from . import prompts
from .config import GroundingConfig


def _state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle with code in it, or not a torch file
        raise PolicyError(f"grounding.sam_checkpoint: cannot load {str(path)!r} with weights_only=True ({e}); "
                          "expected a plain state dict (.pth / .pt) or a .safetensors file") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # {"model": state_dict} files
        state = state["model"]
    if not isinstance(state, dict):
        raise PolicyError(f"grounding.sam_checkpoint: {str(path)!r} holds a {type(state).__name__}, expected a "
                          "state dict")
    return state


def load_predictor(cfg: GroundingConfig, device: torch.device | str = "cpu"):
    """The SAM predictor ``cfg`` names, on ``device``, in eval mode."""
    try:
        import segment_anything
    except ImportError:
        raise PolicyError("grounding needs segment-anything: pip install 'vlmfast[grounding]'") from None
    if cfg.sam_type == "tiny-sam-shapes":
        from ..zoo.sam import load_sam

        try:
            sam = load_sam(cfg.sam_checkpoint or "tiny-sam-shapes", device=str(device))
        except FileNotFoundError as e:
            raise PolicyError(f"grounding.sam_checkpoint: {e}") from None
        return segment_anything.SamPredictor(sam)
    if cfg.sam_checkpoint is None:
        raise PolicyError(f"grounding.sam_type = {cfg.sam_type!r} needs grounding.sam_checkpoint (a weights file)")
    path = Path(cfg.sam_checkpoint).expanduser()
    if not path.is_file():
        raise PolicyError(f"grounding.sam_checkpoint: no file at {str(path)!r}")
    if cfg.sam_type == "vit_t":
        try:
            import mobile_sam as package
        except ImportError:
            raise PolicyError("grounding.sam_type = 'vit_t' (MobileSAM) needs the mobile_sam package: "
                              "pip install git+https://github.com/ChaoningZhang/MobileSAM") from None
    else:
        package = segment_anything
    sam = package.sam_model_registry[cfg.sam_type](checkpoint=None)
    try:
        sam.load_state_dict(_state_dict(path))
    except RuntimeError as e:
        raise PolicyError(f"grounding.sam_checkpoint: {str(path)!r} does not fit a {cfg.sam_type} SAM: "
                          f"{str(e).splitlines()[0]}") from None
    return package.SamPredictor(sam.to(device).eval())


class ImageEmbeddings:
    """SAM image embeddings by image content: each distinct image is encoded once, optionally ahead of time in a
    background thread (:meth:`prefetch`, so the encoder runs while the VLM prefills and decodes), and restored
    into the predictor before prompting (:meth:`set`). The last ``capacity`` images are remembered.

    Ahead-of-time encoding needs segment-anything's ``SamPredictor`` state (``features``, ``original_size``,
    ``input_size``; MobileSAM's predictor is the same class); other predictors are given ``set_image`` when
    needed."""

    def __init__(self, predictor, capacity: int = 8):
        self.predictor = predictor
        self.capacity = capacity
        self.states: OrderedDict[str, Future | tuple] = OrderedDict()
        self.current: str | None = None
        self._features = None
        self.snapshots = all(hasattr(predictor, a) for a in ("set_torch_image", "features", "transform", "model"))

    @staticmethod
    def key(image: np.ndarray) -> str:
        return hashlib.blake2b(np.ascontiguousarray(image).data, digest_size=16).hexdigest() + str(image.shape)

    def _encode(self, image: np.ndarray) -> tuple:
        """What ``SamPredictor.set_image`` computes, without touching the predictor's state."""
        p = self.predictor
        with torch.inference_mode():
            x = p.transform.apply_image(image)
            x = torch.as_tensor(x, device=p.device).permute(2, 0, 1).contiguous()[None]
            return p.model.image_encoder(p.model.preprocess(x)), image.shape[:2], tuple(x.shape[-2:])

    def _remember(self, key: str, state) -> None:
        self.states[key] = state
        self.states.move_to_end(key)
        while len(self.states) > self.capacity:
            self.states.popitem(last=False)

    def prefetch(self, images: list[np.ndarray], keys: list[str] | None = None) -> None:
        """Start encoding ``images`` in a background thread (no-op for predictors without SamPredictor state).
        ``keys``: their :meth:`key` when already known. The thread ends once they are encoded: a thread that has
        run torch's intra-op (OpenMP) work and stays alive slows every later torch call of the process down (the
        OpenMP runtime then manages more threads than there are cores and stops spinning; measured: a plain
        generate call of the embedded model 17 -> 36 ms while an idle pool thread lived)."""
        if not self.snapshots:
            return
        todo = [(image, k) for image, k in zip(images, keys or [self.key(im) for im in images]) if k not in self.states]
        if not todo:
            return
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmfast-sam")
        for image, k in todo:
            self._remember(k, pool.submit(self._encode, image))
        pool.shutdown(wait=False)  # the worker exits after the last image

    def set(self, image: np.ndarray, key: str | None = None) -> None:
        """Make the predictor hold ``image`` (encoding it now if it was not prefetched); ``key``: its
        :meth:`key` when already known."""
        k = key or self.key(image)
        p = self.predictor
        if k == self.current and getattr(p, "is_image_set", True) and (
                not self.snapshots or p.features is self._features):  # another holder may have set the predictor
            return
        if not self.snapshots:
            p.set_image(image)
            self.current = k
            return
        state = self.states.get(k)
        if state is None:
            state = self._encode(image)
        elif isinstance(state, Future):
            state = state.result()
        self._remember(k, state)
        p.features, p.original_size, p.input_size = state
        p.is_image_set = True
        self.current, self._features = k, p.features

    def forget(self) -> None:
        """Drop every remembered embedding (the next ``set`` encodes again)."""
        for state in self.states.values():
            if isinstance(state, Future):
                state.result()
        self.states.clear()
        self.current = None


@dataclass
class Segmentation:
    points: np.ndarray
    labels: np.ndarray
    box: np.ndarray | None
    mask: np.ndarray
    score: float


def _best(masks, scores, low) -> tuple[np.ndarray, float, np.ndarray]:
    """The candidate with the highest predicted IoU: (mask, score, its low-res logits (1, h, w))."""
    best = int(np.argmax(scores))
    return np.asarray(masks[best]).astype(bool), float(scores[best]), low[best][None]


def _predict(predictor, points, labels, box, mask_input, multimask: bool):
    return _best(*predictor.predict(point_coords=points if len(points) else None,
                                    point_labels=labels if len(points) else None, box=box,
                                    mask_input=mask_input, multimask_output=multimask))


def _predict_batch(predictor, points: list, labels: list, boxes: list, multimask: bool) -> list[tuple]:
    """:func:`_predict` for several prompts of the image the predictor holds, in one call of segment-anything's
    ``predict_torch`` (what ``SamPredictor.predict`` does for one, with a batch dimension). Falls back to one
    call each for other predictors or prompts of different shapes."""
    same = len({len(p) for p in points}) == 1 and len(points[0]) > 0 and len({b is None for b in boxes}) == 1
    if len(points) < 2 or not same or not all(hasattr(predictor, a) for a in ("predict_torch", "transform",
                                                                              "original_size", "device")):
        return [_predict(predictor, p, lab, b, None, multimask) for p, lab, b in zip(points, labels, boxes)]
    size, device = predictor.original_size, predictor.device
    coords = torch.as_tensor(predictor.transform.apply_coords(np.stack(points), size), dtype=torch.float,
                             device=device)
    box = None if boxes[0] is None else torch.as_tensor(predictor.transform.apply_boxes(np.stack(boxes), size),
                                                        dtype=torch.float, device=device)
    with torch.inference_mode():
        masks, scores, low = predictor.predict_torch(coords, torch.as_tensor(np.stack(labels), dtype=torch.int,
                                                                             device=device), box, None, multimask)
    return [_best(*x) for x in zip(masks.cpu().numpy(), scores.float().cpu().numpy(), low.float().cpu().numpy())]


def segment_all(predictor, heats: list[torch.Tensor], cfg: GroundingConfig) -> list[Segmentation]:
    """VL-SAM's prompt generation and iterative refinement on maps of the image the predictor holds:

    1. per map, the positive region, its centroid or peak (+, ``cfg.positive_point``) and lowest point (-)
       (:func:`~.prompts.initial_points`), optional box;
    2. SAM for all maps at once (``cfg.multimask``: three candidates each, best by predicted IoU);
    3. per map, ``cfg.refine`` rounds: :func:`~.prompts.refinement_points` (plus the previous low-res logits as
       ``mask_input`` when mask feedback is on); stops when no point is added (after at least one cascade when
       mask feedback is on).
    """
    firsts = []
    for heat in heats:
        points, labels, region = prompts.initial_points(heat, cfg.threshold, cfg.negative_point,
                                                         cfg.positive_point)
        firsts.append((points, labels, region,
                       prompts.bbox(region) if cfg.use_box and bool(region.any()) else None))
    predicted = _predict_batch(predictor, [f[0] for f in firsts], [f[1] for f in firsts], [f[3] for f in firsts],
                               cfg.multimask)
    feedback = cfg.mask_feedback == "on" or (cfg.mask_feedback == "auto" and cfg.sam_type != "tiny-sam-shapes")
    out = []
    for heat, (points, labels, region, box), (mask, score, low) in zip(heats, firsts, predicted):
        for r in range(cfg.refine):
            new, new_labels = prompts.refinement_points(heat, torch.from_numpy(mask), region, points)
            if not len(new) and (r > 0 or not feedback):
                break
            points = np.concatenate([points, new]).astype(np.float32)
            labels = np.concatenate([labels, new_labels])
            mask, score, low = _predict(predictor, points, labels, box, low if feedback else None, False)
        out.append(Segmentation(points, labels, box, mask, score))
    return out


def segment(predictor, heat: torch.Tensor, cfg: GroundingConfig) -> Segmentation:
    """:func:`segment_all` for one map."""
    return segment_all(predictor, [heat], cfg)[0]


def segment_points(predictor, points, labels, box=None, multimask: bool = False) -> tuple[np.ndarray, float]:
    """One SAM call from explicit prompts (baselines: the attention peak, the ground-truth centre)."""
    mask, score, _ = _predict(predictor, np.asarray(points, np.float32).reshape(-1, 2), np.asarray(labels),
                              box, None, multimask)
    return mask, score
