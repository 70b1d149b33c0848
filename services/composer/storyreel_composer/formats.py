"""Frame sizes: aspect ratio and resolution to pixels."""

from __future__ import annotations

#: Width:height of each aspect ratio.
ASPECTS: dict[str, tuple[int, int]] = {"16:9": (16, 9), "9:16": (9, 16), "1:1": (1, 1)}
#: Short side of each resolution, in pixels.
RESOLUTIONS: dict[str, int] = {"480p": 480, "720p": 720, "1080p": 1080}


def even(value: float) -> int:
    """The even integer nearest ``value`` (libx264's yuv420p needs even sizes)."""
    return max(2, 2 * round(value / 2))


def frame_size(aspect: str, resolution: str) -> tuple[int, int]:
    """Width and height of a frame: ``resolution`` names the short side.

    16:9 at 720p is 1280x720, 9:16 at 1080p is 1080x1920, 16:9 at 480p is
    854x480 (both sides even).
    """
    ratio_w, ratio_h = ASPECTS[aspect]
    short = RESOLUTIONS[resolution]
    if ratio_w >= ratio_h:
        return even(short * ratio_w / ratio_h), short
    return short, even(short * ratio_h / ratio_w)
