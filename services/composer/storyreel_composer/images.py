"""Scene images: decoded once, fitted to the frame by cover-crop or blurred background."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps, UnidentifiedImageError

from storyreel.errors import InvalidInput


def decode_image(data: bytes, *, max_pixels: int, label: str) -> Image.Image:
    """Decode an image upright (EXIF orientation applied) as RGB.

    Raises InvalidInput naming ``label`` when the data is not a readable image
    or has more than ``max_pixels`` pixels (checked from the header, before
    the pixels are decoded).
    """
    try:
        with warnings.catch_warnings():
            # Our own pixel limit applies below; PIL's bomb warning would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > max_pixels:
                    raise InvalidInput(
                        f"{label} is {image.width}x{image.height}: more than {max_pixels} pixels"
                    )
                image.load()
                upright = ImageOps.exif_transpose(image)
                return upright.convert("RGB")
    except InvalidInput:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidInput(f"{label} is not a readable image ({exc})") from None


def fit_image(
    image: Image.Image,
    width: int,
    height: int,
    *,
    fit: str = "cover",
    blur_radius: float = 0.04,
    blur_brightness: float = 0.6,
) -> Image.Image:
    """``image`` fitted to ``width`` x ``height`` without distortion.

    ``cover`` scales the image to cover the whole frame and keeps its centre;
    ``blur`` shows the whole image, centred, over a cover-fitted copy of it
    blurred by ``blur_radius`` (a fraction of the short side) and darkened to
    ``blur_brightness``.
    """
    covered = ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS)
    if fit == "cover":
        return covered
    if fit != "blur":
        raise ValueError(f"unknown fit {fit!r}")
    # Blur a small copy: as smooth, and far cheaper than blurring at full size.
    shrink = 8
    small = covered.resize(
        (max(1, width // shrink), max(1, height // shrink)), Image.Resampling.BILINEAR
    )
    radius = max(1.0, blur_radius * min(width, height) / shrink)
    background = small.filter(ImageFilter.GaussianBlur(radius)).resize(
        (width, height), Image.Resampling.BICUBIC
    )
    background = ImageEnhance.Brightness(background).enhance(blur_brightness)
    foreground = ImageOps.contain(image, (width, height), method=Image.Resampling.LANCZOS)
    background.paste(
        foreground, ((width - foreground.width) // 2, (height - foreground.height) // 2)
    )
    return background


def cover_frame(data: bytes, width: int, height: int, *, max_pixels: int, label: str) -> np.ndarray:
    """Decode an image and scale-and-crop it to fill ``width`` x ``height``.

    Returns an RGB ``uint8`` array of shape (height, width, 3). The image is
    scaled so that it covers the whole frame and its centre is kept (no
    letterboxing, no distortion). Raises InvalidInput naming ``label`` when the
    data is not a readable image or has more than ``max_pixels`` pixels.
    """
    image = decode_image(data, max_pixels=max_pixels, label=label)
    return np.asarray(fit_image(image, width, height, fit="cover"), dtype=np.uint8)
