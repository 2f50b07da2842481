"""InternVL (``InternVLForConditionalGeneration``, the InternVL3 "-hf" checkpoints): tiles plus a thumbnail.

The processor (GotOcr2's image processor, ``crop_to_patches``) squashes an image onto the canvas of ``cols x rows``
tiles whose aspect ratio is closest to the image's (``min_patches`` .. ``max_patches`` tiles), cuts it into the
tiles in raster order and, when there is more than one, appends a thumbnail (the whole image at one tile's size).
The tower (InternViT: a [CLS] token, then the patches) encodes every crop on its own; the model drops [CLS],
pixel-shuffles each crop's ``s x s`` patch grid into ``s/2 x s/2`` tokens (``downsample_ratio`` 0.5: a token is the
channel-concatenation of a 2 x 2 block of patches) and writes ``<img>``, the crops' tokens one after another, and
``</img>`` (the markers are text). vlmfast gives a pruner each crop as one view (:class:`ImageTokens` ``view`` 0,
1, ...; the tiles' ``region`` their part of the image, the thumbnail's the whole image), with the image's budget
split over them; there are no separator tokens.

Scoring: a view's attention is its crop's own (the tower never attends across crops) at the chosen layer, its
patches reordered so that the 2 x 2 patches of each token are consecutive (``patches_per_token`` = 4, the order
read off transformers' own ``pixel_shuffle``); ``cls_attention`` is the crop's own [CLS] row, summed per token.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch

from ..errors import InputError, UnsupportedModelError
from .base import Adapter, ImageTokens, unnormalise_grey
from .llava import LlavaAdapter, patch_greys


class InternVLAdapter(LlavaAdapter):
    family = "internvl"
    title = "InternVL"
    model_classes: tuple[str, ...] = ("InternVLForConditionalGeneration",)
    resample_unsupported = ("an image is tiles of the tower's fixed crop plus a thumbnail; resizing it changes how "
                            "many tiles the processor cuts, not the tokens per tile")
    multi_view = True
    video_unsupported = ("vlmfast does not take InternVL's videos yet (transformers' InternVL reads each frame as "
                         "one tile between text frame labels)")

    def __init__(self, model) -> None:
        super().__init__(model)
        cfg = model.config
        if cfg.vision_feature_select_strategy != "default" or isinstance(cfg.vision_feature_layer, (list, tuple)):
            raise UnsupportedModelError(
                f"InternVL with vision_feature_select_strategy={cfg.vision_feature_select_strategy!r} and "
                f"vision_feature_layer={cfg.vision_feature_layer!r} is not supported: transformers' InternVL drops "
                "the [CLS] feature ('default') and reads one layer; released checkpoints use 'default' and -1")
        self.image_processor: Any = None
        """the processor's image processor, whose tiling (tile size, ``min_patches``, ``max_patches``) lays each image
        out; set by prepare()"""

    # -- structure -------------------------------------------------------------------------------------------
    @property
    def vision_layers(self):
        return self.model.model.vision_tower.encoder.layer

    @property
    def tower_has_cls(self) -> bool:
        """InternViT prepends a [CLS] token to every crop (its features are dropped before the LLM)."""
        return hasattr(self.model.model.vision_tower.embeddings, "cls_token")

    @property
    def side(self) -> int:
        """Patches per side of one crop."""
        vc = self.model.config.vision_config
        return int(vc.image_size[0]) // int(vc.patch_size[0])

    @property
    def merge(self) -> int:
        """Patches per side of one LLM token (2 for ``downsample_ratio`` 0.5)."""
        return int(round(1 / self.model.config.downsample_ratio))

    def token_patches(self) -> torch.Tensor:
        """(side/merge)**2 * merge**2 patch indices (raster order of a crop's patch grid): the patches of each LLM
        token, tokens in raster order, read off the model's own ``pixel_shuffle`` of an index grid."""
        s = self.side
        grid = torch.arange(s * s, dtype=torch.float64).view(1, s, s, 1)
        return self.model.model.pixel_shuffle(grid, scale_factor=self.model.config.downsample_ratio).reshape(-1).long()

    # -- inputs ----------------------------------------------------------------------------------------------
    def fallback_prompt(self, prompt: str, n_images: int, n_videos: int = 0) -> str:
        return "<|im_start|>user\n" + "<IMG_CONTEXT>\n" * n_images + prompt + "<|im_end|>\n<|im_start|>assistant\n"

    def prepare(self, processor, images, prompts, videos=None):
        """The processor's inputs, plus ``image_sizes`` ((H, W) per image, as LLaVA-NeXT's processor returns them;
        InternVL's forward takes and ignores it): the tile layout of each image follows from its size and the
        image processor's tiling (the processor returns only the crops)."""
        self.image_processor = processor.image_processor
        inputs = super().prepare(processor, images, prompts, videos)
        flat = [im for imgs in images for im in imgs]
        if flat:
            inputs["image_sizes"] = torch.tensor([[im.size[1], im.size[0]] for im in flat], device=self.model.device)
        return inputs

    def layout(self, size) -> tuple[int, int]:
        """(cols, rows) of the tiles the processor cuts an image of ``size`` (H, W) into (1 x 1: no thumbnail)."""
        ip = self.image_processor
        if ip is None:
            raise RuntimeError("InternVL's tile layout is read from the processor: build the inputs with prepare()")
        canvas = sys.modules[type(ip).__module__].get_optimal_tiled_canvas  # transformers' own choice of tiles
        cols, rows = canvas((int(size[0]), int(size[1])), (ip.size["height"], ip.size["width"]), ip.min_patches,
                            ip.max_patches)
        return int(cols), int(rows)

    def grid_region(self, processor, size):
        """The tiles cover the whole image (squashed onto the canvas), and so does the thumbnail."""
        return Adapter.grid_region(self, processor, size)

    # -- vision ----------------------------------------------------------------------------------------------
    def image_tokens(self, inputs, attention_layer: int | None, grey: bool = False,
                     means_only: bool = False) -> list[ImageTokens]:
        # means_only is a hint: a crop's matrix (1,025 x 1,025 at 448 px) is small, so it is always built
        pixel_values = inputs.get("pixel_values")
        if pixel_values is None:
            return []
        layouts = [self.layout(s) for s in inputs["image_sizes"].tolist()]
        crops = [c * r + (c * r > 1) for c, r in layouts]
        if sum(crops) != pixel_values.shape[0]:
            raise InputError(f"the processor produced {pixel_values.shape[0]} InternVL crops but the images' sizes "
                             f"give {sum(crops)} ({crops}); check the processor matches the model")
        order, m = self.token_patches().to(pixel_values.device), self.merge**2
        att = None
        if attention_layer is None:
            with self.skip_unused_layers(None):
                feats = self.model.model.get_image_features(pixel_values=pixel_values).pooler_output
        else:
            module = self.vision_layers[attention_layer].attention
            with self.capture_outputs(q=module.q_norm, k=module.k_norm) as seen, \
                    self.skip_unused_layers(attention_layer):
                feats = self.model.model.get_image_features(pixel_values=pixel_values).pooler_output
            t0 = time.perf_counter()
            att = [(a[1 + order][:, 1 + order], a[0, 1 + order].view(-1, m).sum(1),  # [CLS] first: skip it
                    k[1 + order].view(-1, m, k.shape[-1]).mean(1))
                   for a, k in self._attention(module, seen["q"], seen["k"])]
            self.last_attention_s = time.perf_counter() - t0
        greys = None
        if grey:  # (crops, n, m * patch * patch): the pixels under each token's patches
            g = patch_greys(unnormalise_grey(pixel_values, self.pixel_norm, channel_dim=1), self.side,
                            int(self.model.config.vision_config.patch_size[0]))
            greys = g[:, order].reshape(g.shape[0], feats.shape[1], -1)
        side = self.side // self.merge
        out, at = [], 0
        for (cols, rows), k in zip(layouts, crops):
            boxes = [(c / cols, r / rows, (c + 1) / cols, (r + 1) / rows) for r in range(rows) for c in range(cols)]
            boxes += [(0.0, 0.0, 1.0, 1.0)] * (k - len(boxes))  # the thumbnail
            for v, box in enumerate(boxes):
                a, cls_row, keys = (None, None, None) if att is None else att[at + v]
                out.append(ImageTokens(features=feats[at + v], grid=(1, side, side), attention=a, patches_per_token=m,
                                       cls_attention=cls_row, keys=keys, view=v, region=box,
                                       grey=None if greys is None else greys[at + v]))
            at += k
        return out
