"""What ``generate`` accepts as images, videos and prompts, normalised to per-sample lists, with a clear error for
anything else (named by where it was: ``images[1][0]: ...``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .errors import InputError


def load_image(x: Any, where: str):
    from PIL import Image

    if isinstance(x, Image.Image):
        return x.convert("RGB") if x.mode != "RGB" else x
    if isinstance(x, (str, Path)):
        try:
            with Image.open(x) as im:
                return im.convert("RGB")
        except (OSError, ValueError) as e:
            raise InputError(f"{where}: cannot open image file {str(x)!r}: {e}") from None
    try:
        import numpy as np

        if isinstance(x, np.ndarray) and x.ndim == 3 and x.shape[2] in (3, 4):
            return Image.fromarray(x.astype("uint8")).convert("RGB")
    except ImportError:  # pragma: no cover
        pass
    raise InputError(
        f"{where}: expected a PIL image, an HxWx3 uint8 array or an image file path, got {type(x).__name__}"
    )


def load_video(x: Any, where: str):
    """One video -> a (T, H, W, 3) uint8 array. Accepted: a list of frames (PIL images, HxWx3 uint8 arrays or
    image files, all of one size), a (T, H, W, 3) uint8 numpy array or tensor, a (T, 3, H, W) uint8 tensor or
    array (torchvision's TCHW)."""
    import numpy as np

    expected = ("expected a video: a list of frames (PIL images, HxWx3 uint8 arrays or image files), a (T, H, W, 3) "
                "uint8 array or a (T, 3, H, W) uint8 tensor")
    if isinstance(x, (list, tuple)):
        if not x:
            raise InputError(f"{where}: the video has no frames; {expected}")
        frames = [np.asarray(load_image(f, f"{where}[{i}]")) for i, f in enumerate(x)]
        sizes = sorted({f.shape[:2] for f in frames})
        if len(sizes) > 1:
            raise InputError(f"{where}: all frames of a video must have one size, got (H, W) {sizes}")
        return np.stack(frames)
    if not isinstance(x, (np.ndarray, torch.Tensor)):
        raise InputError(f"{where}: {expected}, got {type(x).__name__}{_hint(x)}")
    if x.ndim != 4 or not (x.shape[-1] == 3 or x.shape[1] == 3):
        hint = " (one frame? a video is T frames: stack them, or pass a list of frames)" if x.ndim == 3 else ""
        raise InputError(f"{where}: {expected}, got an array of shape {tuple(x.shape)}{hint}")
    if x.dtype not in (np.uint8, torch.uint8):
        raise InputError(f"{where}: expected uint8 pixel values (0-255), got {x.dtype}; convert e.g. with "
                         "(x * 255).round().astype('uint8') for values in [0, 1]")
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if x.shape[0] == 0:
        raise InputError(f"{where}: the video has no frames; {expected}")
    if x.shape[-1] != 3:  # (T, 3, H, W)
        x = x.transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x)


def _hint(x: Any) -> str:
    from PIL import Image

    if isinstance(x, Image.Image):
        return " (one frame: wrap the frame list in a list, videos=[frames])"
    if isinstance(x, (str, Path)):
        return (" (a path: vlmfast decodes no video files; pass the frames, e.g. a list of frame image paths, "
                "videos=[paths])")
    return ""


def _per_sample(items, n: int, single: bool, what: str) -> list:
    """One request's list (or a single item) -> [list]; a batch's list of per-prompt lists, checked."""
    if single:
        return [items]
    if items is None:
        return [None] * n
    if isinstance(items, (list, tuple)) and len(items) == n:
        return list(items)
    got = len(items) if isinstance(items, (list, tuple)) else 1
    raise InputError(f"a batch of {n} prompts needs a list of {n} {what} lists, got {got}")


def normalise_request(images, prompt, videos=None) -> tuple[list[list], list[str], bool, list[list]]:
    """Accept one request (prompt str) or a batch (list of prompts); return per-sample image and video lists
    (videos as (T, H, W, 3) uint8 arrays)."""
    import numpy as np

    single = isinstance(prompt, str)
    prompts = [prompt] if single else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise InputError(f"prompt must be a string or a non-empty list of strings, got {type(prompt).__name__}")
    out = []
    for i, imgs in enumerate(_per_sample(images, len(prompts), single, "image")):
        if imgs is None:
            imgs = []
        elif not isinstance(imgs, (list, tuple)):
            imgs = [imgs]
        out.append([load_image(im, f"images[{i}][{j}]" if not single else f"images[{j}]") for j, im in enumerate(imgs)])
    vids = []
    for i, vs in enumerate(_per_sample(videos, len(prompts), single, "video")):
        if vs is None or (not single and isinstance(vs, (list, tuple)) and not vs):
            vs = []
        elif isinstance(vs, (np.ndarray, torch.Tensor)) and vs.ndim == 4:
            vs = [vs]  # one video
        elif not isinstance(vs, (list, tuple)) or not vs:
            what = "an empty list (no video: leave videos=None)" if isinstance(vs, (list, tuple)) else type(vs).__name__
            raise InputError(f"videos{'' if single else f'[{i}]'}: expected a list of videos (videos=[frames]), got "
                             f"{what}")
        vids.append([load_video(v, f"videos[{j}]" if single else f"videos[{i}][{j}]") for j, v in enumerate(vs)])
    return out, list(prompts), single, vids
