"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP tower with a CLS token, 1-D positions."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Sequence

import torch

from ..errors import UnsupportedModelError
from .base import Adapter, ImageTokens, head_mean_attention, resize_pixels, text_positions, unnormalise_grey


class LlavaAdapter(Adapter):
    family = "llava"
    title = "LLaVA"
    model_classes: tuple[str, ...] = ("LlavaForConditionalGeneration",)
    resample_unsupported = ""

    def __init__(self, model) -> None:
        super().__init__(model)
        tower = model.model.vision_tower
        if not hasattr(getattr(tower, "vision_model", tower), "encoder"):
            raise UnsupportedModelError(
                f"LLaVA with a {type(tower).__name__} vision tower is not supported: vlmfast reads the tower's "
                "encoder layers, which CLIP- and SigLIP-style towers have (llava-hf/llava-1.5-7b-hf, "
                "llava-interleave); Pixtral-tower models (mistral-community/pixtral-12b) are not supported yet")

    @property
    def vision_layers(self):
        tower = self.model.model.vision_tower
        tower = getattr(tower, "vision_model", tower)  # CLIPVisionModel wraps a CLIPVisionTransformer in 4.x
        return tower.encoder.layers

    def default_vision_layer(self) -> int:
        # hidden_states[i] is the output of layer i-1; LLaVA feeds hidden_states[vision_feature_layer].
        f = self.model.config.vision_feature_layer
        if isinstance(f, (list, tuple)):
            f = f[-1]
        n = len(self.vision_layers)
        return f + n if f < 0 else f - 1

    def fallback_prompt(self, prompt: str, n_images: int, n_videos: int = 0) -> str:
        return "USER: " + "<image>\n" * n_images + prompt + " ASSISTANT:"

    def image_tokens(self, inputs, attention_layer: int | None, grey: bool = False,
                     means_only: bool = False) -> list[ImageTokens]:
        # means_only is a hint: the matrix of a CLIP / SigLIP crop (577 x 577 at 336 px) is small, so it is always built
        pixel_values = inputs.get("pixel_values")
        if pixel_values is None:
            return []
        has_cls = self.tower_has_cls
        kwargs = {}
        attn: Sequence[tuple[torch.Tensor, torch.Tensor] | tuple[None, None]]  # (attention, keys) per image
        if "image_sizes" in inputs:
            kwargs["image_sizes"] = inputs["image_sizes"]
        if attention_layer is None:
            with self.skip_unused_layers(None):
                feats = self.model.model.get_image_features(pixel_values=pixel_values, **kwargs).pooler_output
            attn = [(None, None)] * len(feats)
        else:
            attn_module = self.vision_layers[attention_layer].self_attn
            with self.capture_outputs(q=attn_module.q_proj, k=attn_module.k_proj) as seen, \
                    self.skip_unused_layers(attention_layer):
                feats = self.model.model.get_image_features(pixel_values=pixel_values, **kwargs).pooler_output
            t0 = time.perf_counter()
            attn = self._attention(attn_module, seen["q"], seen["k"])
            self.last_attention_s = time.perf_counter() - t0
        greys = unnormalise_grey(pixel_values, self.pixel_norm, channel_dim=1) if grey else [None] * len(feats)
        patch = self.model.config.vision_config.patch_size
        out = []
        for f, (a, keys), g in zip(feats, attn, greys):  # g: (H, W) or None
            fixed = None
            if self.keeps_cls:  # the CLS feature enters the LLM first; it is kept, never pruned or scored
                fixed, f = f[:1], f[1:]
            side = int(round(f.shape[0] ** 0.5))
            if side * side != f.shape[0]:
                raise UnsupportedModelError(
                    f"LLaVA image has {f.shape[0]} patch tokens, which is not a square grid (vision_feature_select_"
                    f"strategy={self.model.config.vision_feature_select_strategy!r}); vlmfast supports one square "
                    "grid per image (CLIP / SigLIP towers, 'default' or 'full')")
            cls_row = None
            if a is not None and has_cls:
                assert keys is not None  # captured with the attention
                cls_row, a, keys = a[0, 1:], a[1:, 1:], keys[1:]
            if g is not None:
                g = patch_greys(g, side, patch)
            out.append(ImageTokens(features=f, grid=(1, side, side), attention=a, cls_attention=cls_row, keys=keys,
                                   grey=g, fixed=fixed))
        return out

    def resampled_features(self, inputs, index: int, grid: tuple[int, int]) -> torch.Tensor:
        """The CLIP / SigLIP tower is trained at one resolution: the preprocessed crop resized to (h, w) patches
        runs with ``interpolate_pos_encoding`` (the position embeddings bicubically resized, transformers' own), then
        the feature layer and the projector as usual (a kept CLS feature stays the image's own, ``fixed``)."""
        patch = self.model.config.vision_config.patch_size
        pixels = resize_pixels(inputs["pixel_values"][index : index + 1], (grid[0] * patch, grid[1] * patch))
        with self.skip_unused_layers(None):
            feats = self.model.model.get_image_features(pixel_values=pixels,
                                                        interpolate_pos_encoding=True).pooler_output[0]
        return feats[1:] if self.keeps_cls else feats

    @property
    def tower_has_cls(self) -> bool:
        """CLIP-style towers prepend a CLS token (``class_embedding``); SigLIP's do not."""
        tower = self.model.model.vision_tower
        return hasattr(getattr(getattr(tower, "vision_model", tower), "embeddings", None), "class_embedding")

    @property
    def keeps_cls(self) -> bool:
        """``vision_feature_select_strategy="full"`` on a CLS tower: the LLM receives the CLS feature before the
        patches (17 tokens for a 4 x 4 grid)."""
        return self.tower_has_cls and self.model.config.vision_feature_select_strategy == "full"

    def image_token_mask(self, inputs) -> torch.Tensor:
        mask = super().image_token_mask(inputs)
        fixed = self.fixed_token_mask(inputs)
        return mask if fixed is None else mask & ~fixed

    def fixed_token_mask(self, inputs) -> torch.Tensor | None:
        """With the CLS kept ("full"): the first placeholder of each image's run (each run of ``<image>`` tokens
        holds whole images of n_patches + 1 tokens)."""
        if not self.keeps_cls:
            return None
        ids = inputs["input_ids"]
        image = ids == self.image_token_id
        vc = self.model.config.vision_config
        per = (vc.image_size // vc.patch_size) ** 2 + 1
        run_start = image & ~torch.cat([torch.zeros_like(image[:, :1]), image[:, :-1]], 1)
        # offset of each placeholder inside its run: position - position of the run's start
        pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        start = torch.where(run_start, pos, torch.zeros_like(pos)).cummax(1).values
        return image & ((pos - start) % per == 0)

    def layers_run(self, attention_layer: int | None) -> int:
        """How many of the tower's layers run: up to the last one LLaVA feeds or a pruner scores."""
        n = len(self.vision_layers)
        f = self.model.config.vision_feature_layer
        needed = [x + n if x < 0 else x - 1 for x in (f if isinstance(f, (list, tuple)) else [f])]
        if attention_layer is not None:
            needed.append(attention_layer % n)
        return max(needed) + 1

    @contextmanager
    def skip_unused_layers(self, attention_layer: int | None):
        """Run the tower only up to the last layer anything reads: LLaVA feeds ``vision_feature_layer`` (-2: the
        last layer's output is never used) and a pruner may score another layer. The layers after both have
        their ``forward`` swapped for the identity during the call (the instances, and transformers' hooks on
        them, stay); features are bit-identical (tests/model/test_mechanics.py)."""
        unused = list(self.vision_layers)[self.layers_run(attention_layer):]
        for layer in unused:
            layer.forward = _identity
        try:
            yield
        finally:
            for layer in unused:
                del layer.forward

    @staticmethod
    def _attention(module, q: torch.Tensor, k: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Head-mean attention per image from the layer's own q / k projections (B, N, H * d)."""
        b, n, _ = q.shape
        h, d = module.num_heads, module.head_dim
        q, k = q.view(b, n, h, d).transpose(1, 2), k.view(b, n, h, d).transpose(1, 2)
        return [head_mean_attention(q[i], k[i], module.scale) for i in range(b)]

    def positions(self, inputs) -> torch.Tensor:
        return text_positions(inputs["attention_mask"])[None]

    def model_position_ids(self, positions: torch.Tensor) -> torch.Tensor:
        return positions[0]

    def grid_region(self, processor, size: tuple[int, int]) -> tuple[float, float, float, float]:
        """LLaVA's processor: optional pad to a centred square (``do_pad``), resize (shortest edge, or to a fixed
        height x width), optional centre crop; the grid covers the crop. Returned in original pixels."""
        ip = getattr(processor, "image_processor", processor)

        def get(d, key):
            return d.get(key) if isinstance(d, dict) else getattr(d, key, None)

        w, h = float(size[0]), float(size[1])
        x0, y0, cw, ch = 0.0, 0.0, w, h
        if getattr(ip, "do_pad", False):
            side = max(w, h)
            x0, y0, cw, ch = (w - side) / 2, (h - side) / 2, side, side
        rw, rh = cw, ch
        target = getattr(ip, "size", None) if getattr(ip, "do_resize", True) else None
        if target is not None and get(target, "shortest_edge"):
            scale = get(target, "shortest_edge") / min(cw, ch)
            rw, rh = cw * scale, ch * scale
        elif target is not None and get(target, "height") and get(target, "width"):
            rw, rh = float(get(target, "width")), float(get(target, "height"))
        sx, sy = rw / cw, rh / ch
        crop = getattr(ip, "crop_size", None)
        if getattr(ip, "do_center_crop", False) and crop is not None and get(crop, "height"):
            left, top = (rw - get(crop, "width")) / 2, (rh - get(crop, "height")) / 2
            return (x0 + left / sx, y0 + top / sy, x0 + (left + get(crop, "width")) / sx,
                    y0 + (top + get(crop, "height")) / sy)
        return x0, y0, x0 + cw, y0 + ch


def _identity(hidden_states, *args, **kwargs):
    return hidden_states


def patch_greys(g: torch.Tensor, side: int, patch: int) -> torch.Tensor:
    """(..., H, W) grey values -> (..., side * side, patch * patch): the pixels under each patch of a ``side`` x
    ``side`` grid, patches in raster order (pixels past the grid are dropped)."""
    lead = g.shape[:-2]
    g = g[..., : side * patch, : side * patch].reshape(*lead, side, patch, side, patch).transpose(-3, -2)
    return g.reshape(*lead, side * side, patch * patch)
