"""Scene timing: whole frames, narration plus padding, shares of a user's audio."""

from __future__ import annotations

import bisect

import numpy as np
import pytest
from storyreel_composer.timeline import (
    Timeline,
    narrated_timeline,
    narration_weights,
    shared_timeline,
)
from storyreel_composer.video import clip_durations

from storyreel.errors import InvalidInput


def test_narrated_scene_lasts_its_narration_plus_padding_rounded_up_to_a_frame():
    timeline = narrated_timeline([2.0, 1.01], 24, padding_s=0.5, silent_scene_s=3.0)
    # 2.5 s is exactly 60 frames; 1.51 s is 36.24 frames, rounded up so speech is never cut.
    assert timeline.scene_frames == (60, 37)
    assert timeline.scene_starts_s == [0.0, 2.5]
    assert timeline.duration_s == pytest.approx(97 / 24)


def test_scene_without_narration_lasts_the_silent_scene_length():
    timeline = narrated_timeline([0.0, 1.5, 0.0], 10, padding_s=0.4, silent_scene_s=3.0)
    assert timeline.scene_frames == (30, 19, 30)
    assert timeline.scene_starts_s == [0.0, 3.0, 4.9]


def test_shared_audio_is_split_by_narration_length_and_sums_to_the_audio():
    timeline = shared_timeline(10.0, narration_weights(["a" * 10, "b" * 30]), 24)
    assert timeline.total_frames == 240
    # One frame each, then 238 split 1:3 (59.5 -> 60 by rounding the cumulative edge).
    assert timeline.scene_frames == (61, 179)


def test_shared_audio_gives_unnarrated_scenes_the_mean_share_and_all_equal_without_narration():
    assert narration_weights(["", "  ", ""]) == [1.0, 1.0, 1.0]
    assert narration_weights(["aaaa", "", "aa"]) == [4.0, 3.0, 2.0]
    even = shared_timeline(3.0, narration_weights(["", "", ""]), 10)
    assert even.scene_frames == (10, 10, 10)


def test_shared_audio_length_is_rounded_to_the_nearest_frame():
    assert shared_timeline(2.37, [1.0], 24).total_frames == 57  # 56.88 frames
    assert shared_timeline(2.36, [1.0], 24).total_frames == 57  # 56.64 frames
    assert shared_timeline(2.35, [1.0], 24).total_frames == 56  # 56.40 frames


def test_audio_too_short_for_one_frame_per_scene_is_invalid_input():
    with pytest.raises(InvalidInput, match="too short to show 3 scenes"):
        shared_timeline(0.05, [1.0, 1.0, 1.0], 24)


@pytest.mark.parametrize(
    ("fps", "frames"),
    [
        (1, (1, 7, 13, 2, 29, 1)),
        (25, (1, 7, 13, 2, 29, 1)),
        (60, (1, 7, 13, 2, 29, 1)),
        # Frame counts whose plain sum of durations falls just short of a whole frame.
        (30, (5, 4, 41)),
        (24, (25, 66, 50, 67, 47)),
    ],
)
def test_clip_durations_make_moviepy_show_each_scene_on_exactly_its_frames(fps, frames):
    timeline = Timeline(fps, frames)
    # What moviepy does: cumulative clip starts, int(duration * fps) frames written,
    # frame k taken from the last clip starting at or before k / fps.
    edges = np.cumsum([0.0, *clip_durations(timeline)])
    assert int(edges[-1] * fps) == timeline.total_frames
    starts = timeline.start_frames
    for k in range(timeline.total_frames):
        shown = max(i for i, edge in enumerate(edges) if edge <= k / fps)
        assert shown == bisect.bisect_right(starts, k) - 1, f"frame {k}"
