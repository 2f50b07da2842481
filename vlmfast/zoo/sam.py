"""``tiny-sam-shapes``: Segment Anything's own classes at a tiny size, trained on ShapesWorld.

The model is a plain :class:`segment_anything.modeling.Sam` (``ImageEncoderViT`` + ``PromptEncoder`` +
``MaskDecoder`` with a ``TwoWayTransformer``), so :class:`segment_anything.SamPredictor` and every other
code path written for SAM run on it unchanged; only the sizes differ (see :class:`TinySamConfig`).
Trained by ``python -m training.train_sam`` (see the model card next to the weights).

>>> from segment_anything import SamPredictor
>>> from vlmfast.zoo.sam import load_tiny_sam, center_point
>>> predictor = SamPredictor(load_tiny_sam())          # doctest: +SKIP
>>> predictor.set_image(np.asarray(scene.image))        # doctest: +SKIP
>>> masks, iou, _ = predictor.predict(np.array([center_point(obj.mask)]), np.array([1]),
...                                   multimask_output=False)  # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

WEIGHTS_DIR = Path(__file__).parent / "weights" / "tiny-sam-shapes"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "model.safetensors"
NAMES = ("tiny-sam-shapes",)
"""Zoo names :func:`load_sam` accepts."""
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class TinySamConfig:
    """Sizes of a tiny SAM (the real ViT-B/L/H use img 1024, embed 768+, out_chans 256)."""

    img_size: int = 256
    patch_size: int = 16
    embed_dim: int = 160
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 4.0
    use_rel_pos: bool = True
    window_size: int = 0
    """0: global attention in every block (16x16 tokens are few); >0: windowed except global_attn_indexes"""
    global_attn_indexes: tuple[int, ...] = ()
    out_chans: int = 128
    """prompt/decoder embedding dim (256 in SAM)"""
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 512
    decoder_heads: int = 4
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 128
    pixel_mean: tuple[float, float, float] = PIXEL_MEAN
    pixel_std: tuple[float, float, float] = PIXEL_STD

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TinySamConfig:
        names = {f.name for f in fields(cls)}
        kw: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
        return cls(**kw)


def tiny_sam_config(**overrides) -> TinySamConfig:
    """The ``tiny-sam-shapes`` sizes (keyword overrides for experiments)."""
    return TinySamConfig(**overrides)


def build_tiny_sam(cfg: TinySamConfig | None = None):
    """A randomly initialised :class:`segment_anything.modeling.Sam` of the sizes in ``cfg``."""
    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    cfg = cfg or tiny_sam_config()
    if cfg.img_size % cfg.patch_size:
        raise ValueError(f"img_size {cfg.img_size} is not a multiple of patch_size {cfg.patch_size}")
    grid = cfg.grid
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=3, embed_dim=cfg.embed_dim, depth=cfg.depth,
            num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, out_chans=cfg.out_chans, qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), act_layer=torch.nn.GELU, use_abs_pos=True,
            use_rel_pos=cfg.use_rel_pos, rel_pos_zero_init=True, window_size=cfg.window_size,
            global_attn_indexes=tuple(cfg.global_attn_indexes),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=cfg.out_chans, image_embedding_size=(grid, grid),
            input_image_size=(cfg.img_size, cfg.img_size), mask_in_chans=cfg.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=cfg.num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=cfg.decoder_depth, embedding_dim=cfg.out_chans, mlp_dim=cfg.decoder_mlp_dim,
                num_heads=cfg.decoder_heads,
            ),
            transformer_dim=cfg.out_chans, iou_head_depth=cfg.iou_head_depth,
            iou_head_hidden_dim=cfg.iou_head_hidden_dim,
        ),
        pixel_mean=list(cfg.pixel_mean), pixel_std=list(cfg.pixel_std),
    )
    return sam


def save_tiny_sam(sam, cfg: TinySamConfig, directory: str | Path, dtype: str = "float16") -> Path:
    """Write ``model.safetensors`` (weights cast to ``dtype``) and ``config.json`` into ``directory``."""
    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dt = getattr(torch, dtype)
    state = {k: v.detach().to("cpu", dt).contiguous() for k, v in sam.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt", "name": "tiny-sam-shapes"})
    (directory / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return directory / "model.safetensors"


def load_tiny_sam(path: str | Path | None = None, device: str = "cpu"):
    """The trained ``tiny-sam-shapes`` as a float32 :class:`~segment_anything.modeling.Sam` in eval mode.

    ``path`` is a ``model.safetensors`` file or its folder (default: the committed weights); the sizes come
    from the ``config.json`` next to it (the default sizes when there is none). No network is used.
    """
    from safetensors.torch import load_file

    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no tiny-sam weights at {path}")
    cfg_file = path.parent / "config.json"
    cfg = TinySamConfig.from_dict(json.loads(cfg_file.read_text())) if cfg_file.is_file() else tiny_sam_config()
    sam = build_tiny_sam(cfg)
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    sam.load_state_dict(state)
    return sam.to(device).eval()


def center_point(mask: np.ndarray) -> tuple[float, float]:
    """A "centre" point prompt ``(x, y)`` that always lies inside ``mask``.

    The centroid of the mask (continuous coordinates: pixel ``(i, j)`` covers ``[j, j+1) x [i, i+1)``, as
    :attr:`ShapeObject.center`) when its pixel belongs to the mask; otherwise (a C-shaped or occluded
    object) the centre of the mask pixel nearest to the centroid.
    """
    mask = np.asarray(mask, dtype=bool)
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("empty mask has no centre point")
    cx, cy = float(xs.mean()) + 0.5, float(ys.mean()) + 0.5
    j, i = int(np.floor(cx)), int(np.floor(cy))
    if 0 <= i < mask.shape[0] and 0 <= j < mask.shape[1] and mask[i, j]:
        return cx, cy
    k = int(np.argmin((xs + 0.5 - cx) ** 2 + (ys + 0.5 - cy) ** 2))
    return float(xs[k]) + 0.5, float(ys[k]) + 0.5


def load_sam(name_or_path: str | Path = "tiny-sam-shapes", device: str = "cpu"):
    """A SAM by zoo name (``"tiny-sam-shapes"``: the committed weights) or by a tiny-sam folder /
    ``.safetensors`` path (with its ``config.json``); offline."""
    if str(name_or_path) == "tiny-sam-shapes":
        return load_tiny_sam(None, device)
    return load_tiny_sam(name_or_path, device)
