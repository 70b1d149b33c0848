"""Scene images are decoded once and cover-cropped to the output frame."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from storyreel_composer.images import (
    BACKGROUND,
    cover_frame,
    decode_image,
    fit_image,
    upscale_warning,
)

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


# -- pictures as drawn: transparency is blended, never dropped (issue 17, item 1) ----------


def _rgba_halves() -> Image.Image:
    """64x64: the left half transparent over green (the colour stored under it), the right
    quarter red at half opacity, the rest opaque blue."""
    image = Image.new("RGBA", (64, 64), (0, 0, 255, 255))
    image.paste((0, 255, 0, 0), (0, 0, 32, 64))
    image.paste((255, 0, 0, 128), (48, 0, 64, 64))
    return image


def test_transparent_pixels_show_the_background_and_translucent_ones_are_mixed():
    frame = cover_frame(png(_rgba_halves()), 64, 64, max_pixels=10**6, label="scene 1 image")
    assert frame.shape == (64, 64, 3)
    # Never the green stored under the transparent half: the background (black).
    assert (frame[:, 2:30] == BACKGROUND).all()
    # Half-opaque red over black: half red.
    assert np.abs(frame[:, 50:62].astype(int) - (128, 0, 0)).max() <= 2
    assert (frame[:, 34:46] == (0, 0, 255)).all()


def test_a_palette_image_with_a_transparent_index_shows_the_background():
    image = Image.new("P", (32, 32), 0)
    image.putpalette([0, 255, 0] + [255, 0, 0] + [0] * (256 - 2) * 3)
    image.paste(1, (16, 0, 32, 32))  # right half: index 1, red; left: index 0, green
    buffer = io.BytesIO()
    image.save(buffer, "PNG", transparency=0)  # index 0 is transparent
    frame = cover_frame(buffer.getvalue(), 64, 64, max_pixels=10**6, label="scene 1 image")
    # Away from the edge, where the 2x enlargement's filter mixes the halves:
    assert (frame[:, 2:24] == BACKGROUND).all()
    assert (frame[:, 40:62] == (255, 0, 0)).all()


def test_grey_with_alpha_is_blended_too():
    image = Image.new("LA", (16, 16), (200, 0))  # light grey, fully transparent
    image.paste((200, 255), (8, 0, 16, 16))
    frame = cover_frame(png(image), 16, 16, max_pixels=10**6, label="scene 1 image")
    assert (frame[:, :6] == BACKGROUND).all() and (frame[:, 10:] == 200).all()


def test_blur_fit_shows_the_blurred_copy_through_the_transparent_parts():
    decoded = decode_image(png(_rgba_halves()), max_pixels=10**6, label="scene 1 image")
    assert decoded.mode == "RGBA"
    fitted = np.asarray(fit_image(decoded, 256, 128, fit="blur"), np.int32)
    # The image (128x128) is centred: its transparent half is columns 64-127, which show the
    # darkened blur of the image over the background. No green anywhere: none was drawn.
    assert (fitted[:, :, 1] <= fitted[:, :, 0] + fitted[:, :, 2] + 2).all()
    through = fitted[:, 70:120]
    assert np.abs(through - fitted[:, 0:50]).max() < 40  # what lies on either side of it
    assert (fitted[:, 134:154] == (0, 0, 255)).all()  # the opaque part, as drawn


def test_an_opaque_alpha_channel_is_dropped():
    opaque = png(Image.new("RGBA", (8, 8), (10, 20, 30, 255)))
    assert decode_image(opaque, max_pixels=10**6, label="scene 1 image").mode == "RGB"


@pytest.mark.parametrize(
    ("size", "frame", "fit", "warned"),
    [
        ((16, 12), (160, 96), "cover", True),  # 10 times
        ((40, 24), (160, 96), "cover", False),  # 4 times: the limit, not past it
        ((40, 23), (160, 96), "cover", True),  # 4.17 times down
        ((200, 30), (160, 96), "cover", False),  # 3.2 times to cover
        ((20, 30), (160, 96), "blur", False),  # blur: 3.2 times to fit inside
        ((20, 30), (160, 96), "cover", True),  # cover: 8 times
    ],
)
def test_an_image_enlarged_more_than_four_times_is_warned_of(size, frame, fit, warned):
    warning = upscale_warning(size, *frame, fit=fit, label="scene 2 image")
    assert bool(warning) is warned
    if warned:
        w, h = size
        assert warning.startswith(f"scene 2 image is only {w}x{h} pixels: enlarged ")
