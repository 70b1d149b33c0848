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
