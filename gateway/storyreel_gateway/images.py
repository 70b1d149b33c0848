"""Recognises image uploads by their content and checks them without trusting them.

An upload is a PNG, JPEG or WebP (by its first bytes, never its name). Its size
in pixels is read from the header alone (Pillow's ``Image.open`` is lazy) and
checked against a bound before any pixel is decoded, so a small file that
would decode to gigabytes (a "decompression bomb") is refused having cost a
few hundred bytes of parsing. Then it is decoded once, whole, to prove it is
a real image (a truncated or corrupt file is refused).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from storyreel.errors import InvalidInput

#: Bytes needed to recognise every supported format.
SNIFF_BYTES = 12
#: Pillow's format names of the accepted formats, and the file extension each is stored with.
FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}
_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


@dataclass(frozen=True)
class ImageFacts:
    """What an accepted image upload holds."""

    format: str  # "png", "jpeg" or "webp"
    width: int
    height: int

    @property
    def extension(self) -> str:
        return _EXTENSIONS[self.format]


def sniff_image(head: bytes) -> str | None:
    """The format ``head`` starts with ("png", "jpeg", "webp"), or None."""
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def inspect_image(path: Path, max_pixels: int) -> ImageFacts:
    """Check the image file at ``path``; InvalidInput says why it is refused.

    The pixel bound is checked from the header, before anything is decoded.
    """
    with open(path, "rb") as fh:
        sniffed = sniff_image(fh.read(SNIFF_BYTES))
    if sniffed is None:
        raise InvalidInput("upload is not an image in a supported format (png, jpeg, webp)")
    try:
        # Pillow's own bound (a warning above 89 Mpx, an error above twice that) lies
        # above any sensible max_pixels; ours, checked below, is the one that decides.
        with Image.open(path, formats=list(FORMATS)) as image:
            found = FORMATS.get(image.format or "")
            if found != sniffed:
                raise InvalidInput("upload is not an image in a supported format (png, jpeg, webp)")
            width, height = image.size
            if width < 1 or height < 1:
                raise InvalidInput("the image has no pixels")
            if width * height > max_pixels:
                raise InvalidInput(
                    f"the image is {width}x{height} pixels ({width * height}); "
                    f"the limit is {max_pixels} pixels"
                )
            image.load()
        if sniffed == "png":
            # A PNG decodes without its last chunks: its structure is read to IEND, every
            # chunk's CRC checked, so that a cut-off file is refused, not half-accepted.
            with Image.open(path, formats=["PNG"]) as image:
                image.verify()
    except InvalidInput:
        raise
    except Image.DecompressionBombError as exc:
        raise InvalidInput(f"the image is too large to decode: {_told(exc, path)}") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
        raise InvalidInput(
            f"the image is truncated or damaged and cannot be decoded ({_told(exc, path)})"
        ) from None
    return ImageFacts(sniffed, width, height)


def _told(error: BaseException, path: Path) -> str:
    """Pillow's reason, without the gateway's own spool path, in at most 160 characters."""
    return str(error).replace(str(path), "the upload")[:160]
