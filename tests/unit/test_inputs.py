"""Images are converted by their value range, or refused with what was found (issue 23: a 16-bit PNG became
all white, a float array in [0, 1] black, uint16 arrays wrapped modulo 256)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vlmfast import InputError
from vlmfast.inputs import load_image, load_video

GREY16 = 30000  # -> round(30000 / 257) = 117


def _pixels(x) -> np.ndarray:
    return np.asarray(load_image(x, "images[0]"))


def test_a_16_bit_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "g16.png"
    Image.fromarray(np.full((8, 8), GREY16, dtype=np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"
    assert np.asarray(Image.open(path).convert("RGB")).max() == 255  # what PIL's own convert gives
    for x in (path, Image.open(path)):
        px = _pixels(x)
        assert px.shape == (8, 8, 3) and px.dtype == np.uint8 and (px == 117).all()


@pytest.mark.parametrize("array, value", [
    (np.full((4, 4, 3), 0.5, dtype=np.float32), 128),          # floats in [0, 1] x 255 (was black)
    (np.full((4, 4, 3), GREY16, dtype=np.uint16), 117),       # uint16 / 257 (wrapped modulo 256)
    (np.full((4, 4, 3), 200, dtype=np.int64), 200),           # integers already in [0, 255]
    (np.full((4, 4), 60, dtype=np.uint8), 60),                # grey HxW
    (np.full((4, 4, 1), 1.0, dtype=np.float64), 255),         # HxWx1
    (np.ones((4, 4), dtype=bool), 255),
    (np.full((4, 4, 4), 90, dtype=np.uint8), 90),             # RGBA: alpha dropped
])
def test_arrays_are_scaled_by_their_dtype(array, value):
    px = _pixels(array)
    assert px.shape == (4, 4, 3) and (px == value).all()


@pytest.mark.parametrize("array, message", [
    (np.full((4, 4, 3), 2.0, dtype=np.float32), r"values in \[2, 2\]; float images must be in \[0, 1\]"),
    (np.full((4, 4, 3), np.nan, dtype=np.float32), "float images must be in"),
    (np.full((4, 4, 3), 300, dtype=np.int32), r"values in \[300, 300\]"),
    (np.full((4, 4, 3), -1, dtype=np.int16), r"values in \[-1, -1\]"),
    (np.zeros((4, 4, 5), dtype=np.uint8), r"got shape \(4, 4, 5\)"),
    (np.zeros((4, 4, 3), dtype=np.complex64), "dtype complex64"),
])
def test_arrays_with_no_clear_range_are_refused(array, message):
    with pytest.raises(InputError, match=r"images\[0\]: .*" + message):
        _pixels(array)


def test_a_float_pil_image_is_refused():
    with pytest.raises(InputError, match="mode F"):
        _pixels(Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)))


def test_video_frames_go_through_the_same_conversion():
    frames = [np.full((8, 8, 3), GREY16, dtype=np.uint16), np.full((8, 8, 3), 0.5, dtype=np.float32)]
    video = load_video(frames, "videos[0]")
    assert video.shape == (2, 8, 8, 3) and video.dtype == np.uint8
    assert (video[0] == 117).all() and (video[1] == 128).all()
