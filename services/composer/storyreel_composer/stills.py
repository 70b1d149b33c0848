"""The poster and the contact sheet, drawn from the plan rather than decoded from the video.

Each is the picture the renderer shows in the middle of a scene, without
captions: the scene's fitted picture through its move at that frame, drawn by
:func:`shot_frame` (the window the filtergraph's ``zoompan`` takes; the moviepy
reference of :mod:`.reference` draws every frame with it). Drawing a few frames
in Python costs milliseconds; extracting them from the video would mean decoding
it, and extra outputs of the render's filtergraph make ffmpeg queue frames for
the whole video.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from storyreel_composer.motion import Move
from storyreel_composer.timeline import Shot

#: Black border around the contact sheet and between its thumbnails, in pixels.
SHEET_GAP = 4


def shot_frame(canvas: Image.Image, move: Move | None, progress: float, size: tuple[int, int]):
    """One frame of a shot: the move's window at ``progress`` scaled to ``size``, as RGB."""
    if move is None:
        return np.asarray(canvas.resize(size, Image.Resampling.LANCZOS))
    left, top, zoom = move.window(progress, canvas.width, canvas.height)
    box = (left, top, left + canvas.width / zoom, top + canvas.height / zoom)
    frame = canvas.transform(size, Image.Transform.EXTENT, box, Image.Resampling.BICUBIC)
    return np.asarray(frame)


def middle_frames(starts: Sequence[int], lengths: Sequence[int]) -> list[int]:
    """The middle frame of every scene: its own picture shows fully there."""
    return [start + length // 2 for start, length in zip(starts, lengths, strict=True)]


def scene_still(
    canvas: Image.Image, shot: Shot, move: Move | None, frame: int, size: tuple[int, int]
) -> Image.Image:
    """The picture of ``shot`` on output ``frame`` (which must lie in the shot)."""
    progress = (frame - shot.first_frame) / max(shot.frames - 1, 1)
    return Image.fromarray(shot_frame(canvas, move, progress, size))


def read_canvas(path: Path, size: tuple[int, int]) -> Image.Image:
    """A raw RGB24 picture the renderer reads, back as an image."""
    pixels = np.fromfile(path, np.uint8).reshape(size[1], size[0], 3)
    return Image.fromarray(pixels)


def thumbnail(still: Image.Image, width: int) -> Image.Image:
    """``still`` scaled to ``width`` (both sides even)."""
    thumb_w = 2 * max(1, round(width / 2))
    thumb_h = 2 * max(1, round(thumb_w * still.height / still.width / 2))
    return still.resize((thumb_w, thumb_h), Image.Resampling.LANCZOS)


def contact_sheet(thumbs: Sequence[Image.Image], columns: int) -> Image.Image:
    """``thumbs`` (all one size), ``columns`` per row, in order, on black."""
    count = len(thumbs)
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    thumb_w, thumb_h = thumbs[0].size
    sheet = Image.new(
        "RGB",
        (SHEET_GAP + columns * (thumb_w + SHEET_GAP), SHEET_GAP + rows * (thumb_h + SHEET_GAP)),
    )
    for index, thumb in enumerate(thumbs):
        row, column = divmod(index, columns)
        sheet.paste(
            thumb,
            (SHEET_GAP + column * (thumb_w + SHEET_GAP), SHEET_GAP + row * (thumb_h + SHEET_GAP)),
        )
    return sheet
