"""Scene images: decoded once, fitted to the frame by cover-crop or blurred background.

Images are shown as drawn: transparency is kept when an image is decoded (RGBA,
whatever its mode: RGBA, LA, a palette or grey image with a transparent entry)
and blended when it is fitted, over :data:`BACKGROUND` or, with the blur fit,
over the blurred copy, never dropped (the colour a file stores under its
transparent pixels is never shown).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps, UnidentifiedImageError

from storyreel.errors import InvalidInput

#: What a transparent part of an image shows (RGB) where nothing of the image lies
#: behind it: black, as the frame around a picture that does not fill it.
BACKGROUND = (0, 0, 0)
#: An image enlarged more than this many times (in each side: the fits keep its
#: shape) to fill the frame is said to look blurry (:func:`upscale_warning`).
MAX_UPSCALE = 4.0


def decode_image(data: bytes, *, max_pixels: int, label: str) -> Image.Image:
    """Decode an image upright (EXIF orientation applied) as RGB, or as RGBA when
    any of it is transparent or translucent (:func:`fit_image` blends it).

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
                return _rgb_or_rgba(upright, alpha=_has_alpha(image) or _has_alpha(upright))
    except InvalidInput:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidInput(f"{label} is not a readable image ({exc})") from None


def _has_alpha(image: Image.Image) -> bool:
    """Whether the mode or the file's transparency entry (tRNS: a palette, grey or RGB
    colour) makes some pixels transparent."""
    return image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info


def _rgb_or_rgba(image: Image.Image, *, alpha: bool) -> Image.Image:
    """RGBA when some pixel is not opaque, else RGB (an opaque alpha channel is dropped)."""
    if alpha:
        rgba = image.convert("RGBA")
        low, _high = rgba.getchannel("A").getextrema()
        if low < 255:
            return rgba
        return rgba.convert("RGB")
    return image.convert("RGB")


def flatten(image: Image.Image, background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """``image`` as RGB: transparent parts show ``background``, translucent ones are mixed."""
    if image.mode == "RGB":
        return image
    if image.mode != "RGBA":
        return image.convert("RGB")
    flat = Image.new("RGB", image.size, background)
    flat.paste(image, mask=image.getchannel("A"))
    return flat


def upscale(image_size: tuple[int, int], width: int, height: int, *, fit: str) -> float:
    """How many times the fit enlarges the image in each side (the same in both) to fill
    ``width`` x ``height``: to cover it (``cover``), or to fit inside it (``blur``, whose
    sharp picture is the whole image; the blurred fill around it hides no detail)."""
    w, h = image_size
    across, down = width / max(w, 1), height / max(h, 1)
    return max(across, down) if fit == "cover" else min(across, down)


def upscale_warning(
    image_size: tuple[int, int], width: int, height: int, *, fit: str, label: str
) -> str:
    """A warning when the image is enlarged more than :data:`MAX_UPSCALE` times to fill a
    ``width`` x ``height`` frame (it will look blurry); "" when it is not."""
    factor = upscale(image_size, width, height, fit=fit)
    if factor <= MAX_UPSCALE:
        return ""
    w, h = image_size
    return (
        f"{label} is only {w}x{h} pixels: enlarged {factor:.1f} times to fill the "
        f"{width}x{height} frame, it looks blurry (more than {MAX_UPSCALE:g} times is "
        "warned of; give a larger image)"
    )


def fit_image(
    image: Image.Image,
    width: int,
    height: int,
    *,
    fit: str = "cover",
    blur_radius: float = 0.04,
    blur_brightness: float = 0.6,
    background: tuple[int, int, int] = BACKGROUND,
) -> Image.Image:
    """``image`` fitted to ``width`` x ``height`` without distortion, as RGB.

    ``cover`` scales the image to cover the whole frame and keeps its centre;
    ``blur`` shows the whole image, centred, over a cover-fitted copy of it
    blurred by ``blur_radius`` (a fraction of the short side) and darkened to
    ``blur_brightness``. An RGBA image is blended: with ``cover`` over
    ``background``; with ``blur`` over the blurred copy (itself made of the
    image over ``background``).
    """
    covered = ImageOps.fit(flatten(image, background), (width, height), Image.Resampling.LANCZOS)
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
    fill = small.filter(ImageFilter.GaussianBlur(radius)).resize(
        (width, height), Image.Resampling.BICUBIC
    )
    fill = ImageEnhance.Brightness(fill).enhance(blur_brightness)
    # RGBA is resized premultiplied (Pillow), so hidden colours do not bleed into the edges.
    foreground = ImageOps.contain(image, (width, height), method=Image.Resampling.LANCZOS)
    mask = foreground.getchannel("A") if foreground.mode == "RGBA" else None
    fill.paste(
        foreground.convert("RGB"),
        ((width - foreground.width) // 2, (height - foreground.height) // 2),
        mask,
    )
    return fill


def cover_frame(data: bytes, width: int, height: int, *, max_pixels: int, label: str) -> np.ndarray:
    """Decode an image and scale-and-crop it to fill ``width`` x ``height``.

    Returns an RGB ``uint8`` array of shape (height, width, 3). The image is
    scaled so that it covers the whole frame and its centre is kept (no
    letterboxing, no distortion). Raises InvalidInput naming ``label`` when the
    data is not a readable image or has more than ``max_pixels`` pixels.
    """
    image = decode_image(data, max_pixels=max_pixels, label=label)
    return np.asarray(fit_image(image, width, height, fit="cover"), dtype=np.uint8)
