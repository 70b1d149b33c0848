"""Scene images are decoded once and cover-cropped to the output frame."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from storyreel_composer.images import cover_frame

from storyreel.errors import InvalidInput


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_wide_image_is_scaled_to_cover_the_frame_and_keeps_its_centre():
    # 400x100: red left quarter, green middle half, blue right quarter.
    image = Image.new("RGB", (400, 100), (255, 0, 0))
    image.paste((0, 255, 0), (100, 0, 300, 100))
    image.paste((0, 0, 255), (300, 0, 400, 100))
    frame = cover_frame(png(image), 64, 64, max_pixels=10**6, label="scene 1 image")
    assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8
    # Scaled to 256x64 and cropped to the middle 64 columns: all green, no bars.
    assert (frame[:, :, 1] > 200).all() and (frame[:, :, 0] < 50).all()


def test_tall_image_fills_a_wide_frame_without_black_bars():
    image = Image.new("RGB", (90, 300), (200, 200, 200))
    frame = cover_frame(png(image), 160, 90, max_pixels=10**6, label="scene 1 image")
    assert frame.shape == (90, 160, 3)
    assert frame.min() > 150


def test_bytes_that_are_not_an_image_are_invalid_input_naming_the_scene():
    with pytest.raises(InvalidInput, match="scene 3 image is not a readable image"):
        cover_frame(b"not an image", 64, 64, max_pixels=10**6, label="scene 3 image")


def test_image_over_the_pixel_limit_is_refused_from_its_header():
    data = png(Image.new("RGB", (200, 100)))
    with pytest.raises(InvalidInput, match="200x100: more than 19999 pixels"):
        cover_frame(data, 64, 64, max_pixels=19_999, label="scene 1 image")
