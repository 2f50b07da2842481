"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``, "anyres"): each image is two views plus separators.

The processor cuts an image into a base crop (the whole image squashed to the tower's size) and the tiles of the
grid pinpoint that fits it best; the tower encodes every crop on its own. The model then lays out, per image,
the base view's ``side x side`` tokens, and the tiles stitched into one high-resolution grid, unpadded back to
the image's aspect ratio (``unpad_image``), with an ``image_newline`` token after each of its rows. vlmfast gives
a pruner the two views as two :class:`ImageTokens` (``view`` 0 and 1, each with its own grid, both covering the
whole image), and the newline tokens as never-pruned visual tokens (``ImageTokens.fixed`` on the high-resolution
view, at ``fixed_token_mask``). An image whose best pinpoint is a single tile is laid out by transformers the
same way (base, then the one-tile grid).

Scoring: the base view's attention is its crop's; the high-resolution view's is the attention within each tile
(the tower never attends across tiles), mapped to the stitched, unpadded grid: an (N, N) matrix that is zero
between tokens of different tiles; its [CLS] attention is each tile's own [CLS] row.
"""

from __future__ import annotations

import inspect
import math
import time

import torch

from ..errors import UnsupportedModelError
from .base import Adapter, ImageTokens, unnormalise_grey
from .llava import LlavaAdapter, patch_greys


class LlavaNextAdapter(LlavaAdapter):
    family = "llava_next"
    title = "LLaVA-NeXT"
    model_classes: tuple[str, ...] = ("LlavaNextForConditionalGeneration",)
    resample_unsupported = ("an anyres image is a base view and high-resolution tiles of the tower's fixed crop, "
                            "stitched and unpadded, so no single resize yields the budget's grid; downsample supports "
                            "LLaVA-1.5, Qwen2-VL and Qwen2.5-VL")
    resampled_features = Adapter.resampled_features  # refuses, naming the reason above
    multi_view = True

    def __init__(self, model) -> None:
        super().__init__(model)
        if self.keeps_cls:
            raise UnsupportedModelError(
                "LLaVA-NeXT with vision_feature_select_strategy='full' on a CLIP tower (a [CLS] per crop inside the "
                "stitched grid) is not supported; released LLaVA-NeXT checkpoints use 'default'")

    @property
    def side(self) -> int:
        """Tokens per side of one crop."""
        vc = self.model.config.vision_config
        return vc.image_size // vc.patch_size

    def _modeling(self):
        return inspect.getmodule(type(self.model))

    def layout(self, image_size) -> tuple[int, int, int, torch.Tensor]:
        """For one image (``image_sizes`` row: H, W): (tiles across, rows, cols of the high-resolution view, and
        for each of its tokens in raster order the flat index in the padded tile grid), as transformers packs it."""
        mod = self._modeling()
        nph, npw = mod.get_anyres_image_grid_shape(image_size, self.model.config.image_grid_pinpoints,
                                                   self.model.config.vision_config.image_size)
        s = self.side
        index = torch.arange(nph * s * npw * s).view(1, nph * s, npw * s)
        kept = mod.unpad_image(index, image_size)[0]  # the padded grid's flat indices that survive unpadding
        return npw, int(kept.shape[0]), int(kept.shape[1]), kept.reshape(-1)

    def hires_region(self, image_size) -> tuple[float, float, float, float]:
        """The part of the image (fractions (x0, y0, x1, y1) of its width and height) the unpadded high-resolution
        grid covers. The processor resizes the image into the pinpoint's canvas keeping its aspect ratio (the short
        side rounded up, ``get_patch_output_size``) and centres it; the model's ``unpad_image`` keeps whole token
        rows or columns by its own rounding, so the grid may start or end a fraction of a token inside or outside
        the image (60 x 40 px on 2 x 2 crops of 32 px: x from 0.047 to 0.977)."""
        h, w = image_size
        mod = self._modeling()
        crop = self.model.config.vision_config.image_size
        nph, npw = mod.get_anyres_image_grid_shape(image_size, self.model.config.image_grid_pinpoints, crop)
        ch, cw = nph * crop, npw * crop
        if cw / w < ch / h:
            nw, nh = cw, min(math.ceil(h * cw / w), ch)
        else:
            nw, nh = min(math.ceil(w * ch / h), cw), ch
        py, px = (ch - nh) // 2, (cw - nw) // 2  # where the resized image sits in the canvas
        _, rows, cols, index = self.layout(image_size)
        cell = crop / self.side  # canvas pixels per token
        r0, c0 = divmod(int(index[0]), npw * self.side)  # the first kept token's place in the padded grid
        y0, x0 = r0 * cell, c0 * cell
        return ((x0 - px) / nw, (y0 - py) / nh, (x0 + cols * cell - px) / nw, (y0 + rows * cell - py) / nh)

    def _sizes(self, inputs) -> list[list[int]]:
        return [[int(h), int(w)] for h, w in inputs["image_sizes"].tolist()]

    def fixed_token_mask(self, inputs) -> torch.Tensor | None:
        """The newline placeholders: after each row of every image's high-resolution view."""
        if inputs.get("image_sizes") is None:
            return None
        image = inputs["input_ids"] == self.image_token_id
        flat = [self.newline_marks(size, tiled) for size, tiled in zip(self._sizes(inputs), self.tiled(inputs))]
        out = torch.zeros_like(image)
        if flat:
            marks = torch.cat(flat).to(image.device)
            if marks.numel() != int(image.sum()):
                raise RuntimeError(f"{self.title} layout: {marks.numel()} placeholders expected, {int(image.sum())} "
                                   "in the prompt")
            out[image] = marks
        return out

    def newline_marks(self, size, tiled: bool = True) -> torch.Tensor:
        """One image's placeholders (bool, True at its newlines): the base view, then each row of the
        high-resolution view followed by its newline."""
        base = self.side * self.side
        rows, cols = self.hires_shape(size)
        tokens = torch.zeros(base + rows * (cols + 1), dtype=torch.bool)
        tokens[base:].view(rows, cols + 1)[:, cols] = True
        return tokens

    def hires_shape(self, size) -> tuple[int, int]:
        """(rows, cols) of an image's high-resolution view, as the LLM receives it."""
        _, rows, cols, _ = self.layout(size)
        return rows, cols

    def tiled(self, inputs) -> list[bool]:
        """Per image, whether the processor cut it into tiles (LLaVA-NeXT: always; an image that is not is one view,
        its base crop, followed by its newline)."""
        return [True] * len(inputs["image_sizes"])

    #: what ``get_image_features`` takes from the processor's outputs
    image_inputs: tuple[str, ...] = ("pixel_values", "image_sizes")

    def image_tokens(self, inputs, attention_layer: int | None, grey: bool = False,
                     means_only: bool = False) -> list[ImageTokens]:
        # means_only is a hint: the matrix of a CLIP / SigLIP crop (577 x 577 at 336 px) is small, so it is always built
        pixel_values = inputs.get("pixel_values")
        if pixel_values is None:
            return []
        call = {k: inputs[k] for k in self.image_inputs if k in inputs}
        att = None
        if attention_layer is None:
            with self.skip_unused_layers(None):
                packed = self.model.model.get_image_features(**call).pooler_output
        else:
            module = self.vision_layers[attention_layer].self_attn
            with self.capture_outputs(q=module.q_proj, k=module.k_proj) as seen, \
                    self.skip_unused_layers(attention_layer):
                packed = self.model.model.get_image_features(**call).pooler_output
            t0 = time.perf_counter()
            att = self._attention(module, seen["q"], seen["k"])  # per crop, all images' crops in order
            self.last_attention_s = time.perf_counter() - t0
        sizes, tiled = self._sizes(inputs), self.tiled(inputs)
        counts = [self._n_crops(s) if t else 1 for s, t in zip(sizes, tiled)]
        greys = None
        if grey:  # (crops, side * side, patch * patch)
            g = unnormalise_grey(self._crops(pixel_values, counts), self.pixel_norm, channel_dim=1)
            greys = patch_greys(g, self.side, self.model.config.vision_config.patch_size)
        out, at = [], 0
        for f, size, t, n in zip(packed, sizes, tiled, counts):
            out += self._views(f, size, t, None if att is None else att[at:at + n],
                               None if greys is None else greys[at:at + n])
            at += n
        return out

    def grid_region(self, processor, size):
        """The whole image: the base crop squashes it (its view's region is the whole box); the high-resolution view's
        region is what its unpadded tiles cover of it (:meth:`hires_region`)."""
        return Adapter.grid_region(self, processor, size)

    def _n_crops(self, size) -> int:
        mod = self._modeling()
        return int(mod.image_size_to_num_patches(size, self.model.config.image_grid_pinpoints,
                                                 self.model.config.vision_config.image_size))

    @staticmethod
    def _crops(pixel_values: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """(all crops, 3, S, S) in the order the tower sees them (``counts``: crops per image)."""
        if pixel_values.dim() == 4:
            return pixel_values
        return torch.cat([pv[:n] for pv, n in zip(pixel_values, counts)])

    def hires_sources(self, size) -> tuple[int, int, torch.Tensor, torch.Tensor]:
        """(rows, cols, sources, weights) of an image's high-resolution view: each of its rows * cols tokens (raster
        order) is the weighted sum of K cells of the padded tile grid, (rows * cols, K) flat indices and weights.
        LLaVA-NeXT: K = 1, the cell that survived unpadding, weight 1."""
        _, rows, cols, index = self.layout(size)
        return rows, cols, index[:, None], torch.ones(index.numel(), 1)

    def _views(self, packed: torch.Tensor, size, tiled: bool, att, greys) -> list[ImageTokens]:
        s = self.side
        base_n = s * s
        o = int(self.tower_has_cls)
        base: dict = {}
        if att is not None:
            a0, k0 = att[0]
            base = dict(attention=a0[o:, o:], keys=k0[o:], cls_attention=a0[0, o:] if o else None)
        if greys is not None:
            base["grey"] = greys[0]
        if not tiled:  # the base crop alone, then its newline
            return [ImageTokens(features=packed[:base_n], grid=(1, s, s), fixed=packed[base_n:], **base)]
        npw = self.layout(size)[0]
        rows, cols, sources, weights = self.hires_sources(size)
        r, c = sources // (npw * s), sources % (npw * s)  # padded-grid row / col of each source cell
        tile, patch = (r // s) * npw + c // s, (r % s) * s + c % s
        hi: dict = {}
        if att is not None:
            rest = att[1:]
            hi = mixed_scores(torch.stack([a for a, _ in rest]), torch.stack([k for _, k in rest]), o, tile, patch,
                              weights)
        if greys is not None:
            hi["grey"] = mix(greys[1:], tile, patch, weights)
        hires = packed[base_n:].view(rows, cols + 1, -1)
        return [
            ImageTokens(features=packed[:base_n], grid=(1, s, s), view=0, **base),
            ImageTokens(features=hires[:, :cols].reshape(rows * cols, -1), grid=(1, rows, cols), view=1,
                        region=self.hires_region(size), fixed=hires[:, cols], **hi),
        ]


def mix(values: torch.Tensor, tile: torch.Tensor, patch: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(n, ...) rows, each the ``weights``-weighted sum of ``values[tile, patch]`` over its K sources ((n, K) each);
    ``values``: (crops, patches, ...)."""
    w = weights.to(values.device, values.dtype)
    t, p = tile.to(values.device), patch.to(values.device)
    out = values[t[:, 0], p[:, 0]] * w[:, 0].view(-1, *[1] * (values.dim() - 2))
    for k in range(1, t.shape[1]):
        out = out + values[t[:, k], p[:, k]] * w[:, k].view(-1, *[1] * (values.dim() - 2))
    return out


def mixed_scores(att: torch.Tensor, keys: torch.Tensor, o: int, tile: torch.Tensor, patch: torch.Tensor,
                 weights: torch.Tensor) -> dict:
    """The scoring fields of tokens that are each a weighted sum of K tower patches (``tile``, ``patch``,
    ``weights``: (n, K); K = 1 for LLaVA-NeXT's stitched grid, 4 bilinear taps for LLaVA-OneVision's downscaled grid
    and pooled frames), from the crops' head-mean attention ``att`` (crops, P + o, P + o) and keys (crops, P + o, d)
    (``o`` = 1: a [CLS] first). Attention between two tokens is the weighted sum over their sources' pairs, zero
    between patches of different crops (the tower never attends across crops): W A W^T for the block-diagonal A."""
    dev = att.device
    t, p, w = tile.to(dev), patch.to(dev), weights.to(dev, att.dtype)
    out = None
    for i in range(t.shape[1]):
        for j in range(t.shape[1]):
            ti, tj = t[:, i, None], t[None, :, j]
            part = att[ti, p[:, i, None] + o, p[None, :, j] + o] * (ti == tj)
            if t.shape[1] > 1:
                part = part * (w[:, i, None] * w[None, :, j])
            out = part if out is None else out + part
    return dict(attention=out, keys=mix(keys, t, p + o, w),
                cls_attention=mix(att[:, 0], t, p + o, w) if o else None)
