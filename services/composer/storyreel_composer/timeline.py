"""When each scene starts and how long it lasts, in whole frames.

Every scene boundary falls on a frame, so the start times reported to callers
are the times the picture really changes and the video's length is exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from storyreel.errors import InvalidInput

# Absorbs float noise when a duration is an exact multiple of the frame time
# (2.5 s * 24 fps must be 60 frames, not 61).
_EPSILON = 1e-6


@dataclass(frozen=True)
class Timeline:
    """Scene lengths in frames at a frame rate."""

    fps: int
    scene_frames: tuple[int, ...]

    @property
    def total_frames(self) -> int:
        return sum(self.scene_frames)

    @property
    def duration_s(self) -> float:
        """Length of the whole video in seconds."""
        return self.total_frames / self.fps

    @property
    def start_frames(self) -> list[int]:
        """First frame of every scene."""
        starts, frame = [], 0
        for frames in self.scene_frames:
            starts.append(frame)
            frame += frames
        return starts

    @property
    def scene_starts_s(self) -> list[float]:
        """Start time of every scene in seconds."""
        return [frame / self.fps for frame in self.start_frames]

    @property
    def scene_durations_s(self) -> list[float]:
        return [frames / self.fps for frames in self.scene_frames]


def narrated_timeline(
    narration_s: Sequence[float], fps: int, *, padding_s: float, silent_scene_s: float
) -> Timeline:
    """Scenes that last as long as their narration plus ``padding_s``.

    A scene without narration (0 s) lasts ``silent_scene_s``. Lengths round up
    to whole frames so that no narration is cut short.
    """
    frames = []
    for seconds in narration_s:
        length = seconds + padding_s if seconds > 0 else silent_scene_s
        frames.append(max(1, math.ceil(length * fps - _EPSILON)))
    return Timeline(fps, tuple(frames))


def narration_weights(narrations: Sequence[str]) -> list[float]:
    """How much of a shared audio track each scene gets: its narration's length.

    Scenes without narration get the mean weight of the narrated ones, so they
    still show; with no narration at all, every scene gets the same share.
    """
    lengths = [len(text.strip()) for text in narrations]
    narrated = [length for length in lengths if length > 0]
    if not narrated:
        return [1.0] * len(lengths)
    mean = sum(narrated) / len(narrated)
    return [float(length) if length > 0 else mean for length in lengths]


def shared_timeline(total_s: float, weights: Sequence[float], fps: int) -> Timeline:
    """Scenes that share ``total_s`` seconds in proportion to ``weights``.

    The video has ``round(total_s * fps)`` frames (within half a frame of
    ``total_s``); every scene gets at least one.
    """
    if not weights or any(weight <= 0 for weight in weights):
        raise ValueError("weights must be positive")
    total_frames = round(total_s * fps)
    if total_frames < len(weights):
        raise InvalidInput(
            f"the audio lasts {total_s:.3f} s: too short to show {len(weights)} scenes "
            f"at {fps} fps (at least one frame each)"
        )
    # One frame each, then the rest split by cumulative rounding, which keeps
    # the sum exact and every share within a frame of its ideal.
    spare = total_frames - len(weights)
    total_weight = sum(weights)
    frames, cumulative, previous_edge = [], 0.0, 0
    for weight in weights:
        cumulative += weight
        edge = round(spare * cumulative / total_weight)
        frames.append(1 + edge - previous_edge)
        previous_edge = edge
    return Timeline(fps, tuple(frames))


@dataclass(frozen=True)
class Shot:
    """The frames on which one scene's picture is drawn, transitions included.

    ``first_frame`` and ``frames`` count output frames. A crossfade centred
    on a scene boundary makes neighbouring shots overlap: ``fade_in`` frames
    at the start of a shot blend in over the previous one.
    """

    first_frame: int
    frames: int
    fade_in: int


def shots(timeline: Timeline, crossfade_frames: int) -> list[Shot]:
    """The shot of every scene when each boundary is crossfaded over ``crossfade_frames``.

    Each crossfade is centred on its boundary (half before, half after), and
    shortened where a neighbouring scene is shorter than it, so that no two
    crossfades overlap; a crossfade shorter than two frames becomes a cut.
    With 0 frames every boundary is a cut and each shot is exactly its scene.
    """
    starts = timeline.start_frames
    lengths = timeline.scene_frames
    fades = [min(crossfade_frames, lengths[i], lengths[i + 1]) for i in range(len(lengths) - 1)]
    # A one-frame crossfade would show only the outgoing picture: cut instead.
    fades = [fade if fade >= 2 else 0 for fade in fades]
    result = []
    for i, (start, length) in enumerate(zip(starts, lengths, strict=True)):
        before = fades[i - 1] // 2 if i > 0 else 0  # the fade into this scene starts early
        after = fades[i] - fades[i] // 2 if i < len(fades) else 0  # and the next one ends late
        fade_in = fades[i - 1] if i > 0 else 0
        result.append(Shot(start - before, length + before + after, fade_in))
    return result
