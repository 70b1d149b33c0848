"""Scene images: decoded once, cropped to fill the output frame."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from storyreel.errors import InvalidInput


def cover_frame(data: bytes, width: int, height: int, *, max_pixels: int, label: str) -> np.ndarray:
    """Decode an image and scale-and-crop it to fill ``width`` x ``height``.

    Returns an RGB ``uint8`` array of shape (height, width, 3). The image is
    scaled so that it covers the whole frame and its centre is kept (no
    letterboxing, no distortion). Raises InvalidInput naming ``label`` when the
    data is not a readable image or has more than ``max_pixels`` pixels.
    """
    try:
        with warnings.catch_warnings():
            # Our own pixel limit applies below; PIL's bomb warning would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                # Checked from the header, before the pixels are decoded.
                if image.width * image.height > max_pixels:
                    raise InvalidInput(
                        f"{label} is {image.width}x{image.height}: more than {max_pixels} pixels"
                    )
                image.load()
                upright = ImageOps.exif_transpose(image)
                rgb = upright.convert("RGB")
    except InvalidInput:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidInput(f"{label} is not a readable image ({exc})") from None
    fitted = ImageOps.fit(rgb, (width, height), method=Image.Resampling.LANCZOS)
    return np.asarray(fitted, dtype=np.uint8)
