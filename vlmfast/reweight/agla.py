"""AGLA — Assembly of Global and Local Attention (arXiv 2406.12718). Spec: shared/reference/hallucination_grounding.md
§1 (§1.10 for CLIP as the matcher); docs/methods/agla.md.

An image-prompt matcher scores how relevant each region of the image is to the prompt; an augmented copy of
the image keeps the relevant pixels and masks the rest; decoding assembles both views, each in its own branch
with its own KV cache (the reference code shares one cache between the branches, so only its first token saw
the augmented image — not repeated here):

    z = z_orig + alpha z_aug;   z[v] = -inf where z_orig[v] < log(beta) + max z_orig

Matching (IPM) here is CLIP-style and gradient-free (§1.10 option C; raw CLIP Grad-CAM tends to highlight the
background): the prompt is reduced to its content words (``"is there a red circle ?"`` -> ``"red circle"``),
the matcher gives the image-text cosine s and a dense patch-text cosine map; the map is min-max normalised,
upsampled (bicubic) to the image's own resolution (so both branches share the model's preprocessing), blurred
(Gaussian, sigma = ``blur`` x image side) and normalised again; the ``keep`` fraction of pixels with the
highest saliency stay, the rest are filled (black in the paper). ``keep=None`` uses the paper's rule
keep = min(1 - s/2, 1 - 1e-5). The default matcher is ``tiny-clip-shapes`` (trained offline on ShapesWorld);
``matcher`` takes a zoo name or a folder in that format.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Annotated, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from ..registry import register
from .base import BranchInputs, BranchMethod, method_dataclass

#: words that say *how* to answer rather than *what* to look at; removed from the prompt before matching
STOPWORDS = frozenset("""
a an the this that these those there here is are was were be been being do does did any some of in on at to for
with and or image picture photo photograph please answer question using single word phrase one what which who
whose where when how many much color colour shape object objects thing things describe detail details it its
can you see visible shown show tell me there's yes no short brief caption generate provide
""".split())


def prompt_query(prompt: str, template: str = "{}") -> str:
    """The prompt's content words (lowercased, punctuation and :data:`STOPWORDS` removed) in ``template``; the
    whole prompt when nothing is left (e.g. "describe the image")."""
    words = [w for w in re.findall(r"[a-z0-9']+", prompt.lower()) if w not in STOPWORDS]
    return template.format(" ".join(words) if words else prompt.strip())


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of an (H, W) map (reflect padding; radius 3 sigma); sigma <= 0: unchanged."""
    if sigma <= 0:
        return x
    r = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    y = x[None, None].float()
    r_h, r_w = min(r, x.shape[0] - 1), min(r, x.shape[1] - 1)
    kh, kw = k[r - r_h: r + r_h + 1], k[r - r_w: r + r_w + 1]
    kh, kw = kh / kh.sum(), kw / kw.sum()
    y = torch.nn.functional.pad(y, (0, 0, r_h, r_h), mode="reflect") if r_h > 0 else y
    y = torch.nn.functional.conv2d(y, kh.view(1, 1, -1, 1))
    y = torch.nn.functional.pad(y, (r_w, r_w, 0, 0), mode="reflect") if r_w > 0 else y
    y = torch.nn.functional.conv2d(y, kw.view(1, 1, 1, -1))
    return y[0, 0]


def _minmax(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)


#: the map is upsampled and blurred at most at this side, then resized (bilinear) to the image: a blurred map
#: has no detail finer than that, and blurring a 336x336 map directly costs ~20x more
WORK_SIDE = 128


def saliency(dense: torch.Tensor, height: int, width: int, blur: float = 0.02) -> torch.Tensor:
    """(g, g) patch-text similarities -> (height, width) saliency in [0, 1]: min-max, bicubic upsampling,
    Gaussian blur with sigma = ``blur`` x the image side (sqrt(height * width)), min-max again. Upsampling and
    blur run at a side of at most :data:`WORK_SIDE` (sigma scaled alike), then the map is resized to the image."""
    m = _minmax(dense.float())
    scale = min(1.0, WORK_SIDE / max(height, width))
    h, w = max(1, round(height * scale)), max(1, round(width * scale))
    if m.shape != (h, w):
        m = torch.nn.functional.interpolate(m[None, None], size=(h, w), mode="bicubic", align_corners=False)[0, 0]
    m = gaussian_blur(m, blur * math.sqrt(h * w))
    if (h, w) != (height, width):
        m = torch.nn.functional.interpolate(m[None, None], size=(height, width), mode="bilinear",
                                            align_corners=False)[0, 0]
    return _minmax(m)


def keep_fraction(similarity: float) -> float:
    """AGLA's rule: a better image-prompt match masks more, keep = min(1 - s/2, 1 - 1e-5)."""
    return min(1.0 - similarity / 2.0, 1.0 - 1e-5)


def keep_mask(sal: torch.Tensor, keep: float) -> torch.Tensor:
    """Pixels whose saliency is at least the value at index floor(N * keep) of the descending sort (ties stay)."""
    flat = sal.flatten()
    k = min(flat.numel() - 1, int(math.floor(flat.numel() * keep)))  # index into the descending order
    thr = flat.kthvalue(flat.numel() - k).values  # = the (k+1)-th largest, without a full sort
    return sal >= thr


def augment(image, mask: np.ndarray, fill: str = "black"):
    """A copy of a PIL image with the pixels outside ``mask`` (H, W bool) set to black or the image's mean colour."""
    from PIL import Image

    arr = np.asarray(image.convert("RGB")).copy()
    value = np.zeros(3, dtype=np.uint8) if fill == "black" else arr.reshape(-1, 3).mean(0).round().astype(np.uint8)
    arr[~mask] = value
    return Image.fromarray(arr)


@functools.lru_cache(maxsize=4)
def _matcher(name: str):
    from ..zoo.clip import load_clip

    return load_clip(name)


@register("agla")
@method_dataclass
class AGLA(BranchMethod):
    alpha: Annotated[float, Field(ge=0)] = 2.0
    """weight of the augmented branch: z_orig + alpha z_aug"""
    beta: Annotated[float, Field(ge=0, le=1)] = 0.5
    """plausibility cutoff, relative to the original branch's most likely token"""
    keep: Annotated[float, Field(gt=0, le=1)] | None = None
    """fraction of pixels kept; None = AGLA's adaptive rule 1 - s/2 from the matcher's similarity s"""
    blur: Annotated[float, Field(ge=0, le=0.5)] = 0.02
    """Gaussian blur of the saliency map, sigma as a fraction of the image side"""
    fill: Literal["black", "mean"] = "black"
    """what masked pixels become: black (the paper) or the image's mean colour"""
    matcher: str = "tiny-clip-shapes"
    """image-prompt matcher: a zoo name or a folder (vlmfast.zoo.clip format)"""
    template: str = "{}"
    """text given to the matcher around the prompt's content words, e.g. "a photo of {}" for a photo CLIP"""

    positive_branch: ClassVar[bool] = True

    def branch_weight(self) -> float:
        return self.alpha

    def augmented(self, images: list, prompts: list[str]) -> tuple[list, list[float], list[float]]:
        """Per (image, prompt) pair: the augmented image, the matcher's similarity and the kept fraction."""
        if not images:
            return [], [], []
        sims, maps = _matcher(self.matcher).match(images, [prompt_query(p, self.template) for p in prompts])
        out, keeps = [], []
        for im, s, m in zip(images, sims.tolist(), maps):
            k = self.keep if self.keep is not None else keep_fraction(s)
            mask = keep_mask(saliency(m, im.height, im.width, self.blur), k)
            out.append(augment(im, mask.numpy(), self.fill))
            keeps.append(float(mask.float().mean()))
        return out, sims.tolist(), keeps

    def build(self, request) -> BranchInputs:
        """The augmented branch's inputs: every image replaced by its prompt-conditioned augmented copy, through
        the same vision stage and pruner."""
        flat = [(im, p) for imgs, p in zip(request.batch_images, request.prompts) for im in imgs]
        aug, sims, keeps = self.augmented([im for im, _ in flat], [p for _, p in flat])
        it = iter(aug)
        seq, kept, inputs = request.encode([[next(it) for _ in imgs] for imgs in request.batch_images])
        info = (f"matcher {self.matcher}: similarity {np.mean(sims):.3f}, kept {100 * np.mean(keeps):.0f}% of pixels"
                if sims else "no images")
        return BranchInputs(seq, kept, inputs, info=info, similarity=sims, kept_fraction=keeps)
