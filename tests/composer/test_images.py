"""Scene images are decoded once and cover-cropped to the output frame."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from storyreel_composer.images import cover_frame, fit_image

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


def test_blur_fit_shows_the_whole_image_over_a_darker_blurred_copy():
    # 400x100: red left quarter, green middle half, blue right quarter, in a square frame.
    image = Image.new("RGB", (400, 100), (255, 0, 0))
    image.paste((0, 255, 0), (100, 0, 300, 100))
    image.paste((0, 0, 255), (300, 0, 400, 100))
    fitted = np.asarray(fit_image(image, 128, 128, fit="blur", blur_brightness=0.5), np.int32)
    assert fitted.shape == (128, 128, 3)
    # The whole image is there, scaled to the width (128x32, centred): all three colours.
    middle = fitted[64]
    assert middle[5, 0] > 200 and middle[64, 1] > 200 and middle[122, 2] > 200
    # Above and below it, the blurred copy: darker, and smooth (no hard edges).
    band = fitted[:40]
    assert band.max() < 150
    assert np.abs(np.diff(band, axis=1)).max() < 20


def test_cover_and_blur_fit_keep_the_frame_size_for_every_shape():
    image = Image.new("RGB", (90, 300), (200, 100, 50))
    for size in [(1280, 720), (720, 1280), (480, 480)]:
        for fit in ("cover", "blur"):
            assert fit_image(image, *size, fit=fit).size == size
