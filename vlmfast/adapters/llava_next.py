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
        flat = []
        base = self.side * self.side
        for size in self._sizes(inputs):
            _, rows, cols, _ = self.layout(size)
            tokens = torch.zeros(base + rows * (cols + 1), dtype=torch.bool)
            tokens[base:].view(rows, cols + 1)[:, cols] = True
            flat.append(tokens)
        out = torch.zeros_like(image)
        if flat:
            marks = torch.cat(flat).to(image.device)
            if marks.numel() != int(image.sum()):
                raise RuntimeError(f"LLaVA-NeXT layout: {marks.numel()} placeholders expected, {int(image.sum())} "
                                   "in the prompt")
            out[image] = marks
        return out

    def image_tokens(self, inputs, attention_layer: int | None, grey: bool = False) -> list[ImageTokens]:
        pixel_values = inputs.get("pixel_values")
        if pixel_values is None:
            return []
        sizes = inputs["image_sizes"]
        call = dict(pixel_values=pixel_values, image_sizes=sizes)
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
        greys = None
        if grey:  # (crops, side * side, patch * patch)
            g = unnormalise_grey(self._crops(pixel_values, sizes), self.pixel_norm, channel_dim=1)
            greys = patch_greys(g, self.side, self.model.config.vision_config.patch_size)
        out, at = [], 0
        for f, size in zip(packed, self._sizes(inputs)):
            npw, rows, cols, index = self.layout(size)
            n_crops = self._n_crops(size)
            out += self._views(f, rows, cols, npw, index, None if att is None else att[at:at + n_crops],
                               None if greys is None else greys[at:at + n_crops], self.hires_region(size))
            at += n_crops
        return out

    def grid_region(self, processor, size):
        """The whole image: the base crop squashes it (its view's region is the whole box); the high-resolution view's
        region is what its unpadded tiles cover of it (:meth:`hires_region`)."""
        return Adapter.grid_region(self, processor, size)

    def _n_crops(self, size) -> int:
        mod = self._modeling()
        return int(mod.image_size_to_num_patches(size, self.model.config.image_grid_pinpoints,
                                                 self.model.config.vision_config.image_size))

    def _crops(self, pixel_values: torch.Tensor, sizes) -> torch.Tensor:
        """(all crops, 3, S, S) in the order the tower sees them."""
        if pixel_values.dim() == 4:
            return pixel_values
        return torch.cat([pv[: self._n_crops(s)] for pv, s in zip(pixel_values, sizes.tolist())])

    def _views(self, packed: torch.Tensor, rows: int, cols: int, npw: int, index: torch.Tensor, att, greys,
               region: tuple[float, float, float, float]) -> list[ImageTokens]:
        s = self.side
        base_n = s * s
        hires = packed[base_n:].view(rows, cols + 1, -1)
        tiles_r, tiles_c = index // (npw * s), index % (npw * s)  # padded-grid row / col of each token
        tile = (tiles_r // s) * npw + tiles_c // s
        patch = (tiles_r % s) * s + tiles_c % s
        base_att = base_cls = base_keys = hi_att = hi_cls = hi_keys = None
        if att is not None:
            o = int(self.tower_has_cls)
            (a0, k0), rest = att[0], att[1:]
            base_att, base_keys = a0[o:, o:], k0[o:]
            base_cls = a0[0, o:] if o else None
            a = torch.stack([a for a, _ in rest])  # (tiles, P+o, P+o)
            k = torch.stack([k for _, k in rest])
            dev = a.device
            t, p = tile.to(dev), patch.to(dev)
            hi_att = a[t[:, None], p[:, None] + o, p[None, :] + o] * (t[:, None] == t[None, :])
            hi_keys = k[t, p + o]
            hi_cls = a[t, 0, p + o] if o else None
        base_grey = hi_grey = None
        if greys is not None:
            base_grey = greys[0]
            hi_grey = greys[1:][tile, patch]
        return [
            ImageTokens(features=packed[:base_n], grid=(1, s, s), attention=base_att, cls_attention=base_cls,
                        keys=base_keys, grey=base_grey, view=0),
            ImageTokens(features=hires[:, :cols].reshape(rows * cols, -1), grid=(1, rows, cols), attention=hi_att,
                        cls_attention=hi_cls, keys=hi_keys, grey=hi_grey, view=1, region=region, fixed=hires[:, cols]),
        ]
