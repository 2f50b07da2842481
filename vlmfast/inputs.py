"""What ``generate`` accepts as images, videos and prompts, normalised to per-sample lists, with a clear error for
anything else (named by where it was: ``images[1][0]: ...``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .errors import InputError


def to_rgb(image, where: str = "image"):
    """A PIL image in RGB, 8 bits per channel, with its values scaled by the source's range: 16-bit images
    (``I;16`` PNGs, ``I``) are divided by 257 (``convert("RGB")`` would clip them to white), palette / grey / CMYK
    images convert as PIL does, an alpha channel is dropped. Float (``F``) images have no range to read: refused."""
    import numpy as np
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(image).astype(np.int64)
        if arr.min() < 0 or arr.max() > 65535:
            raise InputError(f"{where}: a {image.mode} image with values in [{arr.min()}, {arr.max()}]; expected "
                             "16-bit values in [0, 65535]")
        return Image.fromarray(_to_uint8(arr, 65535)).convert("RGB")
    if image.mode == "F":
        raise InputError(f"{where}: a floating-point (mode F) image has no known value range; convert it to 8 "
                         "or 16 bits first, e.g. Image.fromarray((x * 255).round().astype('uint8')) for values in "
                         "[0, 1]")
    return image.convert("RGB")


def _to_uint8(arr, top: int):
    """Integers in [0, top] -> uint8 in [0, 255], rounded."""
    import numpy as np

    return np.rint(arr.astype(np.float64) * (255.0 / top)).astype(np.uint8)


def array_to_rgb(x, where: str):
    """An HxW, HxWx1, HxWx3 or HxWx4 array -> an RGB PIL image, scaled by its dtype's range: uint8 as is, uint16
    / 257, floats in [0, 1] x 255, bool as 0 / 255; other integer arrays must hold values in [0, 255]. Anything
    else is refused with what was found (a wrong scale would silently change the answer)."""
    import numpy as np
    from PIL import Image

    if x.ndim == 3 and x.shape[2] == 1:
        x = x[:, :, 0]
    if not (x.ndim == 2 or (x.ndim == 3 and x.shape[2] in (3, 4))):
        raise InputError(f"{where}: expected an HxW, HxWx3 or HxWx4 image array, got shape {tuple(x.shape)}")
    if x.dtype == np.uint8:
        out = x
    elif x.dtype == np.bool_:
        out = x.astype(np.uint8) * 255
    elif x.dtype == np.uint16:
        out = _to_uint8(x, 65535)
    elif np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():
            raise InputError(f"{where}: a {x.dtype} array with NaN or infinite values; float images must be in [0, 1]")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 1:
            raise InputError(f"{where}: a {x.dtype} array with values in [{lo:g}, {hi:g}]; float images must be in "
                             "[0, 1] (scale it, or pass uint8 values 0-255)")
        out = np.rint(x.astype(np.float64) * 255).astype(np.uint8)
    elif np.issubdtype(x.dtype, np.integer):
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise InputError(f"{where}: a {x.dtype} array with values in [{lo}, {hi}]; expected uint8 (0-255), "
                             "uint16 (0-65535) or floats in [0, 1]")
        out = x.astype(np.uint8)
    else:
        raise InputError(f"{where}: an image array of dtype {x.dtype}; expected uint8, uint16, bool or floats in "
                         "[0, 1]")
    return Image.fromarray(np.ascontiguousarray(out)).convert("RGB")


def load_image(x: Any, where: str):
    """A request's image as an RGB PIL image: a PIL image, an image file, or an array (:func:`array_to_rgb`)."""
    import numpy as np
    from PIL import Image

    if isinstance(x, Image.Image):
        return to_rgb(x, where)
    if isinstance(x, (str, Path)):
        try:
            with Image.open(x) as im:
                im.load()
                return to_rgb(im, where)
        except InputError:  # to_rgb's own refusal (a mode F image)
            raise
        except (OSError, ValueError) as e:
            raise InputError(f"{where}: cannot open image file {str(x)!r}: {e}") from None
    if isinstance(x, np.ndarray):
        return array_to_rgb(x, where)
    raise InputError(
        f"{where}: expected a PIL image, an HxWx3 array (uint8, uint16 or floats in [0, 1]) or an image file path, "
        f"got {type(x).__name__}"
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
    for i, p in enumerate(prompts):
        if not p.strip():
            raise InputError(f"prompt{'' if single else f'[{i}]'} is empty; ask something (the demo and the command "
                             "line refuse it too)")
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
