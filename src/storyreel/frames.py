"""Frame shapes and sizes: what an aspect and a resolution mean in pixels.

One module for the video (the composer) and the images (the diffusion service),
and for the gateway that passes the video's shape on to the images. The shapes
themselves come from ``types.v1.Aspect`` and ``types.v1.Resolution`` (see
:mod:`storyreel.options`): "4:5" is four pixels across for five down, "720p"
a short side of 720 pixels.
"""

from __future__ import annotations

import math

from storyreel.options import ASPECTS, RESOLUTIONS

#: Width and height units of each aspect: "16:9" -> (16, 9).
SHAPES: dict[str, tuple[int, int]] = {
    name: (int(name.split(":")[0]), int(name.split(":")[1])) for name in ASPECTS
}
#: Short side of each resolution in pixels: "720p" -> 720.
SHORT_SIDES: dict[str, int] = {name: int(name.removesuffix("p")) for name in RESOLUTIONS}


def even(value: float) -> int:
    """The even integer nearest ``value`` (libx264's yuv420p needs even sizes)."""
    return max(2, 2 * round(value / 2))


def video_size(aspect: str, resolution: str) -> tuple[int, int]:
    """Width and height of a video frame: ``resolution`` names the short side.

    16:9 at 720p is 1280x720, 9:16 at 1080p is 1080x1920, 16:9 at 480p is
    854x480 (both sides even).
    """
    across, down = SHAPES[aspect]
    short = SHORT_SIDES[resolution]
    if across >= down:
        return even(short * across / down), short
    return short, even(short * down / across)


def image_size(
    aspect: str, width: int, height: int, multiple: int, low: int, high: int
) -> tuple[int, int]:
    """An image of ``aspect`` with about the area of ``width`` x ``height``, on ``multiple``.

    Both sides stay within ``low..high``; when one would not, the frame is scaled
    as a whole, so the shape is kept.
    """
    across, down = SHAPES[aspect]
    ideal_h = math.sqrt(width * height * down / across)
    ideal_w = ideal_h * across / down
    scale = max(1.0, low / min(ideal_w, ideal_h))
    scale = min(scale, high / max(ideal_w, ideal_h))

    def snap(value: float) -> int:
        return max(low, min(high, multiple * max(1, round(value / multiple))))

    return snap(ideal_w * scale), snap(ideal_h * scale)


def nearest_aspect(width: int, height: int) -> str:
    """The known shape nearest to ``width`` x ``height`` (16:9 when either is 0)."""
    if not width or not height:
        return "16:9"
    ratio = width / height
    return min(SHAPES, key=lambda name: abs(SHAPES[name][0] / SHAPES[name][1] - ratio))
