"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): LLaVA-NeXT's views, "anyres_max", several images,
and videos, on a SigLIP tower (no [CLS]) and a Qwen2 language model with 1-D positions.

Images, as transformers packs them (``LlavaOnevisionModel.pack_image_features``):

* the image of a sample with one image is LLaVA-NeXT's two views: the base crop, then the tiles stitched into one
  grid, unpadded to the image's aspect ratio, a newline after each row; when that grid holds more than N crops'
  worth of tokens (``vision_aspect_ratio="anyres_max_N"``: ratio = sqrt(rows * cols / (N * side^2)) > 1.1) it is
  bilinearly downscaled to (rows // ratio, cols // ratio) before the newlines are added;
* each image of a sample with several images is not tiled (the processor's ``batch_num_images``): one view, the
  image padded to a square and resized to one crop, followed by one newline.

A video: every frame goes through the tower as a crop, its side x side tokens bilinearly pooled to ceil(side / 2)
per side, the frames in a row, then one newline for the whole video. It is one :class:`ImageTokens` of kind
"video", grid (frames, ph, pw) (each frame its own group: the tower attends within a frame), the newline fixed.

Scoring: a downscaled or pooled token is a bilinear mix of (up to) 4 tower patches, with the weights torch's
``interpolate`` uses (:func:`bilinear_taps`): its attention is W A W^T of the crops' attention, its keys and grey
values are mixed with the same weights (:func:`~vlmfast.adapters.llava_next.mixed_scores`).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UnsupportedModelError
from .base import ImageTokens, unnormalise_grey
from .llava import patch_greys
from .llava_next import LlavaNextAdapter, mix, mixed_scores


class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"
    title = "LLaVA-OneVision"
    model_classes: tuple[str, ...] = ("LlavaOnevisionForConditionalGeneration",)
    supports_video = True
    image_inputs = ("pixel_values", "image_sizes", "batch_num_images")

    def __init__(self, model) -> None:
        super().__init__(model)
        aspect = model.config.vision_aspect_ratio
        if not re.fullmatch(r"anyres_max_\d+", str(aspect)):
            raise UnsupportedModelError(f"LLaVA-OneVision with vision_aspect_ratio={aspect!r} is not supported: "
                                        "vlmfast lays out images as 'anyres_max_<N>' (llava-onevision-qwen2-*-ov-hf: "
                                        "'anyres_max_9')")
        self.max_crops = int(str(aspect).removeprefix("anyres_max_"))

    def fallback_prompt(self, prompt: str, n_images: int, n_videos: int = 0) -> str:
        return ("<|im_start|>user " + "<image>" * n_images + "<video>" * n_videos + "\n" + prompt
                + "<|im_end|>\n<|im_start|>assistant\n")

    def processor_images(self, images: list[list[Any]]) -> list | None:
        """Per sample, its images (nested): the processor tiles only the image of a one-image sample."""
        return [list(imgs) for imgs in images if imgs] or None

    @property
    def video_token_id(self) -> int:
        return int(self.model.config.video_token_id)

    def image_token_mask(self, inputs) -> torch.Tensor:
        ids = inputs["input_ids"]
        visual = (ids == self.image_token_id) | (ids == self.video_token_id)
        fixed = self.fixed_token_mask(inputs)
        return visual if fixed is None else visual & ~fixed

    def tiled(self, inputs) -> list[bool]:
        counts = inputs.get("batch_num_images")
        if counts is None:  # transformers' default: every image on its own
            return super().tiled(inputs)
        return [int(n) == 1 for n in counts.tolist() for _ in range(int(n))]

    # -- images ----------------------------------------------------------------------------------------------
    def downscaled(self, rows: int, cols: int) -> tuple[int, int]:
        """The stitched grid's shape after anyres_max's downscale (unchanged at most ~N crops' worth of tokens)."""
        ratio = math.sqrt(rows * cols / (self.max_crops * self.side ** 2))
        return (int(rows // ratio), int(cols // ratio)) if ratio > 1.1 else (rows, cols)

    def hires_shape(self, size) -> tuple[int, int]:
        return self.downscaled(*super().hires_shape(size))

    def hires_sources(self, size) -> tuple[int, int, torch.Tensor, torch.Tensor]:
        """LLaVA-NeXT's unpadded cells, through the downscale's bilinear taps when the grid is downscaled."""
        rows, cols, sources, weights = super().hires_sources(size)
        out = self.downscaled(rows, cols)
        if out == (rows, cols):
            return rows, cols, sources, weights
        taps, w = bilinear_taps((rows, cols), out)
        return out[0], out[1], sources[:, 0][taps], w

    def newline_marks(self, size, tiled: bool = True) -> torch.Tensor:
        if tiled:
            return super().newline_marks(size)
        marks = torch.zeros(self.side * self.side + 1, dtype=torch.bool)  # the base crop, then one newline
        marks[-1] = True
        return marks

    def fixed_token_mask(self, inputs) -> torch.Tensor | None:
        """The images' newlines (LLaVA-NeXT's, or one after an untiled image) and each video's final newline."""
        out = super().fixed_token_mask(inputs)
        videos = inputs.get("pixel_values_videos")
        if videos is None:
            return out
        video = inputs["input_ids"] == self.video_token_id
        marks = torch.zeros(videos.shape[1] * self.pooled_side() ** 2 + 1, dtype=torch.bool)
        marks[-1] = True
        marks = marks.repeat(videos.shape[0]).to(video.device)
        if marks.numel() != int(video.sum()):
            raise RuntimeError(f"{self.title} layout: {marks.numel()} video placeholders expected, {int(video.sum())} "
                               "in the prompt")
        out = torch.zeros_like(video) if out is None else out
        out[video] = marks
        return out

    def _views(self, packed: torch.Tensor, size, tiled: bool, att, greys) -> list[ImageTokens]:
        views = super()._views(packed, size, tiled, att, greys)
        if not tiled:  # the padded square is the grid region (grid_region)
            return views
        h, w = (int(v) for v in size)
        side = max(h, w)
        x0, y0 = (side - w) // 2, (side - h) // 2  # the image inside the square grid region
        region = (x0 / side, y0 / side, (x0 + w) / side, (y0 + h) / side)
        return [replace(v, region=region) for v in views]

    def grid_region(self, processor, size):
        """The image padded to a centred square (what an untiled image's one crop shows; a tiled image's views cover
        the image inside it, their ``region``)."""
        w, h = int(size[0]), int(size[1])
        side = max(w, h)
        x0, y0 = -((side - w) // 2), -((side - h) // 2)
        return float(x0), float(y0), float(x0 + side), float(y0 + side)

    # -- videos ----------------------------------------------------------------------------------------------
    def pooled_side(self) -> int:
        """Tokens per side of a video frame after transformers' 2 x 2 bilinear pooling (``apply_pooling``)."""
        return math.ceil(self.side / 2)

    def video_tokens(self, inputs, attention_layer: int | None, grey: bool = False,
                     means_only: bool = False) -> list[ImageTokens]:
        videos = inputs.get("pixel_values_videos")
        if videos is None:
            return []
        b, frames = videos.shape[:2]
        att = None
        if attention_layer is None:
            with self.skip_unused_layers(None):
                feats = self.model.model.get_video_features(pixel_values_videos=videos).pooler_output
        else:
            module = self.vision_layers[attention_layer].self_attn
            with self.capture_outputs(q=module.q_proj, k=module.k_proj) as seen, \
                    self.skip_unused_layers(attention_layer):
                feats = self.model.model.get_video_features(pixel_values_videos=videos).pooler_output
            t0 = time.perf_counter()
            att = self._attention(module, seen["q"], seen["k"])  # per frame, all videos' frames in order
            self.last_attention_s = time.perf_counter() - t0
        s, ps = self.side, self.pooled_side()
        taps, weights = bilinear_taps((s, s), (ps, ps))
        frame = torch.zeros_like(taps)  # every tap in the frame's own crop
        greys = None
        if grey:  # (frames, side * side, patch * patch)
            g = unnormalise_grey(videos.flatten(0, 1), self.video_norm, channel_dim=1)
            greys = patch_greys(g, s, self.model.config.vision_config.patch_size)
        o = int(self.tower_has_cls)
        out = []
        for i in range(b):
            fields: dict = {}
            own = range(i * frames, (i + 1) * frames)
            if att is not None:
                per = [mixed_scores(att[j][0][None], att[j][1][None], o, frame, taps, weights) for j in own]
                fields = dict(attention=torch.stack([d["attention"] for d in per]),
                              keys=torch.cat([d["keys"] for d in per]),
                              cls_attention=torch.cat([d["cls_attention"] for d in per]) if o else None)
            if greys is not None:
                fields["grey"] = torch.cat([mix(greys[j][None], frame, taps, weights) for j in own])
            out.append(ImageTokens(features=feats[i, :-1], grid=(frames, ps, ps), kind="video", fixed=feats[i, -1:],
                                   **fields))
        return out


def bilinear_taps(size_in: tuple[int, int], size_out: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's bilinear resize (``F.interpolate(mode="bilinear")``, align_corners=False, no antialias) of an
    ``size_in`` (h, w) grid to ``size_out``, as (n_out, K) flat raster indices into the input grid and their weights
    (K <= 4), per output cell in raster order. The per-axis weights are read off ``interpolate`` applied to the
    axis' identity (the resize is separable), so they are torch's own."""
    axes = []
    for n_in, n_out in zip(size_in, size_out):
        m = F.interpolate(torch.eye(n_in)[None, None], size=(n_out, n_in), mode="bilinear")[0, 0]  # (n_out, n_in)
        axes.append(m.topk(min(2, n_in), dim=1))
    (wr, ir), (wc, ic) = axes
    taps = ir[:, None, :, None] * size_in[1] + ic[None, :, None, :]  # (h_out, w_out, kr, kc)
    weights = wr[:, None, :, None] * wc[None, :, None, :]
    n = size_out[0] * size_out[1]
    return taps.reshape(n, -1), weights.reshape(n, -1)
