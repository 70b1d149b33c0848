"""Scene timing: whole frames, narration plus padding, shares of a user's audio."""

from __future__ import annotations

import pytest
from storyreel_composer.timeline import (
    Shot,
    Timeline,
    narrated_timeline,
    narration_weights,
    shared_timeline,
    shots,
)

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


def test_without_crossfades_every_shot_is_exactly_its_scene():
    timeline = Timeline(24, (10, 3, 20))
    assert shots(timeline, 0) == [Shot(0, 10, 0), Shot(10, 3, 0), Shot(13, 20, 0)]


def test_crossfades_are_centred_on_each_boundary_and_the_video_keeps_its_length():
    timeline = Timeline(24, (30, 30, 30))
    result = shots(timeline, 12)
    # Each fade runs 6 frames before and 6 after the boundary.
    assert result == [Shot(0, 36, 0), Shot(24, 42, 12), Shot(54, 36, 12)]
    # Overlapping shots, minus the overlaps, add up to the timeline exactly.
    assert sum(s.frames for s in result) - sum(s.fade_in for s in result) == 90
    for shot in result:
        assert shot.first_frame + shot.frames <= timeline.total_frames


@pytest.mark.parametrize("frames", [(10, 3, 20, 1, 5), (2, 2, 2), (1, 40), (25, 66, 50, 67, 47)])
def test_crossfades_shorten_around_short_scenes_and_never_overlap(frames):
    timeline = Timeline(24, frames)
    result = shots(timeline, 12)
    starts = timeline.start_frames
    for i in range(1, len(result)):
        fade_start, fade = result[i].first_frame, result[i].fade_in
        # The fade lies within the two scenes it joins and ends as the previous shot ends.
        assert starts[i - 1] <= fade_start <= starts[i] <= fade_start + fade
        assert fade_start + fade == result[i - 1].first_frame + result[i - 1].frames
        assert fade == 0 or fade >= 2  # a one-frame fade would be a late cut
        if i + 1 < len(result):
            assert fade_start + fade <= result[i + 1].first_frame
    assert result[-1].first_frame + result[-1].frames == timeline.total_frames
