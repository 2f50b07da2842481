"""Qwen2-VL (``Qwen2VLForConditionalGeneration``): no CLS token, 2x2 patch merger, 3-D M-RoPE positions, video input."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import InputError
from .base import (
    Adapter,
    ImageTokens,
    head_mean_attention,
    head_mean_attention_means,
    resize_pixels,
    text_positions,
    unnormalise_grey,
)


@dataclass(frozen=True)
class Scored:
    """What was read off the scoring layer for one image / frame group (all None when nothing was)."""

    attention: torch.Tensor | None = None
    received: torch.Tensor | None = None
    given: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    n: int = 0
    """patches covered"""


class Qwen2VLAdapter(Adapter):
    """Images and videos. A video's frames go through the model's own video processor; the tower folds
    ``temporal_patch_size`` (2) consecutive frames into one *frame group*, so a video of T frames has
    t = ceil(T / 2) groups of (h/2) x (w/2) LLM tokens each, grid (t, h/2, w/2), one contiguous span of
    ``<|video_pad|>`` tokens. The tower attends within each frame group only, so a video's captured attention is
    one block per group."""

    family = "qwen2_vl"
    title = "Qwen2-VL"
    model_classes: tuple[str, ...] = ("Qwen2VLForConditionalGeneration",)
    supports_video = True
    resample_unsupported = ""

    @property
    def vision_layers(self):
        return self.model.model.visual.blocks

    def default_vision_layer(self) -> int:
        return len(self.vision_layers) - 1  # the merger reads the last block's output

    def fallback_prompt(self, prompt: str, n_images: int, n_videos: int = 0) -> str:
        vision = ("<|vision_start|><|image_pad|><|vision_end|>" * n_images
                  + "<|vision_start|><|video_pad|><|vision_end|>" * n_videos)
        return f"<|im_start|>user\n{vision}{prompt}<|im_end|>\n<|im_start|>assistant\n"

    def prepare(self, processor, images, prompts, videos=None):
        self.check_sizes(images, videos or [[] for _ in prompts])
        return super().prepare(processor, images, prompts, videos)

    def check_sizes(self, images: list[list], videos: list[list]) -> None:
        """Refuse what the processor would silently blow up: an image (or video frame) smaller than one vision
        patch, whose tokens would be all interpolation, and a video shorter than one frame group (the tower folds
        ``temporal_patch_size`` consecutive frames into one step; transformers repeats the frame or fails)."""
        vc = self.model.config.vision_config
        patch, group = int(vc.patch_size), int(vc.temporal_patch_size)
        one = len(images) == 1

        def name(kind: str, b: int, i: int) -> str:
            return f"{kind}[{i}]" if one else f"{kind}[{b}][{i}]"

        for b, imgs in enumerate(images):
            for i, im in enumerate(imgs):
                if min(im.size) < patch:
                    raise InputError(f"{name('images', b, i)} is {im.size[0]}x{im.size[1]} px, smaller than one "
                                     f"{self.title} vision patch ({patch} px): it would carry no detail of its own; "
                                     f"pass an image of at least {patch}x{patch} px")
        for b, vids in enumerate(videos):
            for i, v in enumerate(vids):
                t, h, w = v.shape[:3]
                if t < group:
                    raise InputError(f"{name('videos', b, i)} has {t} frame; a {self.title} video needs at least "
                                     f"{group} (the tower folds {group} consecutive frames into one step): pass a "
                                     "single frame as an image")
                if min(h, w) < patch:
                    raise InputError(f"{name('videos', b, i)} has {w}x{h} px frames, smaller than one {self.title} "
                                     f"vision patch ({patch} px)")

    @property
    def merge(self) -> int:
        return self.model.config.vision_config.spatial_merge_size

    def image_token_mask(self, inputs) -> torch.Tensor:
        ids = inputs["input_ids"]
        return (ids == self.image_token_id) | (ids == int(self.model.config.video_token_id))

    def image_tokens(self, inputs, attention_layer: int | None, grey: bool = False,
                     means_only: bool = False) -> list[ImageTokens]:
        return self._tokens(inputs.get("pixel_values"), inputs.get("image_grid_thw"),
                            self.model.model.get_image_features, attention_layer, "image", self.pixel_norm, grey,
                            means_only)

    def video_tokens(self, inputs, attention_layer: int | None, grey: bool = False,
                     means_only: bool = False) -> list[ImageTokens]:
        return self._tokens(inputs.get("pixel_values_videos"), inputs.get("video_grid_thw"),
                            self.model.model.get_video_features, attention_layer, "video", self.video_norm, grey,
                            means_only)

    def _tokens(self, pixel_values, grid_thw, features, attention_layer, kind, norm,
                grey: bool, means_only: bool) -> list[ImageTokens]:
        if pixel_values is None:
            return []
        attn: Sequence[Scored]
        if attention_layer is None:
            tower = features(pixel_values, grid_thw)
            attn = [Scored()] * len(tower.pooler_output)
        else:
            module = self.vision_layers[attention_layer].attn
            with self.capture_inputs(module) as seen, self.capture_outputs(qkv=module.qkv) as out:
                tower = features(pixel_values, grid_thw)
            t0 = time.perf_counter()
            attn = self._group(self._attention(module, seen, out["qkv"], self.tower_order(grid_thw), means_only),
                               grid_thw)
            self.last_attention_s = time.perf_counter() - t0
        feats, deep = tower.pooler_output, self.deepstack(tower)
        m = self.merge
        # patches are flattened as (channel, temporal, p, p); 4 consecutive patches make one merged token
        greys: Sequence[torch.Tensor | None] = [None] * len(feats)
        if grey:
            g = unnormalise_grey(pixel_values.view(pixel_values.shape[0], 3, -1), norm, channel_dim=1)
            greys = torch.split(g.view(-1, m * m * g.shape[-1]), [f.shape[0] for f in feats])
        return [
            ImageTokens(features=f, grid=(int(t), int(h) // m, int(w) // m), attention=a.attention,
                        received=a.received, given=a.given, patches_per_token=m * m,
                        keys=None if a.keys is None else a.keys.view(-1, m * m, a.keys.shape[-1]).mean(1), grey=g,
                        kind=kind, deepstack=d)
            for f, a, (t, h, w), g, d in zip(feats, attn, grid_thw.tolist(), greys, deep)
        ]

    def resampled_features(self, inputs, index: int, grid: tuple[int, int]) -> torch.Tensor:
        """Dynamic resolution: the image's preprocessed pixels (unflattened from the processor's patch layout) resized
        to (h * merge * patch, w * merge * patch) px, re-patchified and run through the tower and merger, which gives
        exactly h x w LLM tokens."""
        vc = self.model.config.vision_config
        p, m, t = int(vc.patch_size), self.merge, int(vc.temporal_patch_size)
        thw = inputs["image_grid_thw"]
        start = int(thw[:index].prod(-1).sum())
        gh, gw = int(thw[index, 1]), int(thw[index, 2])
        image = unpatchify(inputs["pixel_values"][start : start + gh * gw], gh, gw, p, m, t)
        image = resize_pixels(image, (grid[0] * m * p, grid[1] * m * p))
        new_thw = torch.tensor([[1, grid[0] * m, grid[1] * m]], device=thw.device, dtype=thw.dtype)
        return self.model.model.get_image_features(patchify(image, p, m, t), new_thw).pooler_output[0]

    def deepstack(self, tower) -> Sequence[torch.Tensor | None]:
        """Per image / video, its (levels, n, d) DeepStack features from the tower's output, or None (Qwen2-VL and
        Qwen2.5-VL have none)."""
        return [None] * len(tower.pooler_output)

    @staticmethod
    def _group(chunks: list[Scored], grid_thw) -> list[Scored]:
        """The tower's attention chunks (one per frame group) -> one per image / video: an image's (N, N) matrix; a
        video's (t, N/t, N/t) blocks (or its one (N, N) matrix if the tower attended across groups); the means and
        keys concatenated."""
        out, at = [], 0
        for t, h, w in grid_thw.tolist():
            n = t * h * w
            parts: list[Scored] = []
            while sum(p.n for p in parts) < n:
                parts.append(chunks[at])
                at += 1
            if len(parts) == 1:
                out.append(parts[0])
                continue
            def join(name: str, fn=torch.cat) -> torch.Tensor | None:
                values = [getattr(p, name) for p in parts]
                return None if values[0] is None else fn(values)

            out.append(Scored(join("attention", torch.stack), join("received"), join("given"), join("keys"), n))
        return out

    def tower_order(self, grid_thw) -> torch.Tensor | None:
        """The order the tower's blocks hold the patches in, as indices into the processor's (raster) order; None
        when it is that order (Qwen2-VL). Captured attention is mapped back to raster order with it."""
        return None

    @staticmethod
    def _attention(module, seen: dict, qkv: torch.Tensor, order: torch.Tensor | None = None,
                   means_only: bool = False) -> list[Scored]:
        """Head-mean attention per image / frame group from the layer's own qkv projection and its inputs, in the
        processor's patch order (``order``: the tower's order, undone before the per-image split); with
        ``means_only``, its column and row means only (no (N, N) matrix: a 1,008 px image is 5,184 patches, a
        100 MB matrix; the largest Qwen2.5-VL image, 16,384 tokens, would need 17 GB)."""
        from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

        x = seen["hidden_states"]
        cu = seen.get("cu_seqlens", seen.get("arg1"))
        assert cu is not None, "the vision block was called without cu_seqlens"
        n = x.shape[0]
        q, k, _ = qkv.reshape(n, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = seen["position_embeddings"]
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        if order is not None:  # back to raster order: every image's (frame group's) patches contiguous again
            back = torch.argsort(order.to(q.device))
            q, k = q[back], k[back]
        q, k = q.transpose(0, 1), k.transpose(0, 1)  # (H, N, d)
        bounds = cu.tolist()
        out = []
        for s, e in zip(bounds[:-1], bounds[1:]):
            if means_only:
                received, given, keys = head_mean_attention_means(q[:, s:e], k[:, s:e], module.scaling)
                out.append(Scored(None, received, given, keys, e - s))
            else:
                a, keys = head_mean_attention(q[:, s:e], k[:, s:e], module.scaling)
                out.append(Scored(a, a.mean(0), a.mean(1), keys, e - s))
        return out

    def positions(self, inputs) -> torch.Tensor:
        mask = inputs["attention_mask"]
        rope, _ = self.model.model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], inputs.get("image_grid_thw"),
            inputs.get("video_grid_thw"), attention_mask=mask, **self.rope_inputs(inputs),
        )
        return torch.cat([text_positions(mask)[None], rope], dim=0)

    def rope_inputs(self, inputs) -> dict:
        """Further processor outputs the family's ``get_rope_index`` reads (none for Qwen2-VL)."""
        return {}

    def model_position_ids(self, positions: torch.Tensor) -> torch.Tensor:
        return positions

    def set_decode_state(self, positions: torch.Tensor, valid: torch.Tensor) -> None:
        # Decoding continues at max(position)+1 on all three axes; HF stores that offset relative to the
        # (shortened) sequence length as ``rope_deltas``. vlmfast passes explicit positions, but keeps the
        # model's own state consistent so nothing inside transformers reads a stale delta.
        rows = positions[1:].masked_fill(~valid[None], -1)
        max_pos = rows.amax(dim=(0, 2))
        self.model.model.rope_deltas = (max_pos + 1 - valid.shape[1]).unsqueeze(1)

    @contextmanager
    def preserved_state(self):
        before = self.model.model.rope_deltas
        try:
            yield
        finally:
            self.model.model.rope_deltas = before


def patchify(image: torch.Tensor, patch: int, merge: int, temporal: int) -> torch.Tensor:
    """(C, H, W) -> the Qwen image processors' flat layout (H/p * W/p, C * temporal * p * p): patches in merge-window
    order (each merge x merge window's patches consecutive), each patch repeated over the ``temporal`` frames."""
    c, h, w = image.shape
    gh, gw = h // patch, w // patch
    x = image.reshape(c, gh // merge, merge, patch, gw // merge, merge, patch).permute(1, 4, 2, 5, 0, 3, 6)
    return x.unsqueeze(5).expand(-1, -1, -1, -1, -1, temporal, -1, -1).reshape(gh * gw, c * temporal * patch * patch)


def unpatchify(flat: torch.Tensor, gh: int, gw: int, patch: int, merge: int, temporal: int) -> torch.Tensor:
    """The inverse of :func:`patchify` for an image (its ``temporal`` copies are equal: the first is taken):
    (gh * gw, C * temporal * p * p) -> (C, gh * p, gw * p)."""
    c = flat.shape[-1] // (temporal * patch * patch)
    x = flat.reshape(gh // merge, gw // merge, merge, merge, c, temporal, patch, patch)[:, :, :, :, :, 0]
    return x.permute(4, 0, 2, 5, 1, 3, 6).reshape(c, gh * patch, gw * patch)
