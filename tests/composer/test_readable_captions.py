"""Readable captions: every cue stays on screen at least caption_min_duration_s, and
narration too long to be read in its audio's time is said so in the result."""

from __future__ import annotations

import itertools
import re

from storyreel_composer.captions import Cue, chunk, readable, spread
from storyreel_composer.composer import Scene, VideoComposer

LONG = (
    "The old lighthouse keeper climbed the winding stairs every evening at dusk, "
    "counting each of the two hundred steps aloud. Far below, the waves broke against "
    "the rocks and the gulls circled the tower, calling to the fishing boats. "
    "Nobody in the village remembered a night when the lamp had not been lit. "
    "Yet that winter a storm came that no one had ever seen the like of."
)

_TIMES = re.compile(r"(\d\d):(\d\d):(\d\d)[,.](\d\d\d) --> (\d\d):(\d\d):(\d\d)[,.](\d\d\d)")


def durations(text: str) -> list[float]:
    """How long each cue of an SRT or VTT file is shown, in seconds."""
    result = []
    for match in _TIMES.finditer(text):
        h1, m1, s1, ms1, h2, m2, s2, ms2 = map(int, match.groups())
        start = h1 * 3600 + m1 * 60 + s1 + ms1 / 1000
        end = h2 * 3600 + m2 * 60 + s2 + ms2 / 1000
        result.append(round(end - start, 3))
    return result


def test_short_cues_are_merged_or_run_on_to_the_minimum(style_for):
    style = style_for(1280, 720)
    cues = [
        Cue(0.0, 2.0, ("A long first caption that stays a while.",)),
        Cue(2.0, 2.3, ("Yes.",)),
        Cue(2.3, 2.5, ("No.",)),
        Cue(4.0, 4.2, ("Gone.",)),
    ]
    shown, warning = readable(cues, style, min_s=0.8, end_s=5.0)
    assert warning == ""
    assert all(cue.end_s - cue.start_s >= 0.8 for cue in shown)
    assert all(a.end_s <= b.start_s for a, b in itertools.pairwise(shown))
    assert shown[-1].end_s <= 5.0
    # Every word is still there, in order.
    words = lambda cs: " ".join(" ".join(c.lines) for c in cs).split()  # noqa: E731
    assert words(shown) == words(cues)


def test_cues_long_enough_are_left_as_they_are(style_for):
    style = style_for(1280, 720)
    cues = spread(chunk(LONG, style), 0.0, 30.0)
    assert min(c.end_s - c.start_s for c in cues) > 0.8
    assert readable(cues, style, min_s=0.8, end_s=30.0) == (cues, "")


def test_text_that_cannot_be_read_in_its_time_is_shown_in_part_with_a_warning(style_for):
    style = style_for(1280, 720)
    cues = spread(chunk(LONG, style), 0.0, 3.0)
    assert min(c.end_s - c.start_s for c in cues) < 0.5  # as composed before
    shown, warning = readable(cues, style, min_s=0.8, end_s=3.0)
    assert len(shown) == 3
    assert all(cue.end_s - cue.start_s >= 0.8 for cue in shown)
    assert shown[0].start_s >= 0.0 and shown[-1].end_s <= 3.0
    assert "captions" in warning and "left out" in warning


async def test_long_narration_over_short_audio_gives_readable_cues_and_a_warning(
    unvoiced_composer: VideoComposer, images, file_store, make_audio
):
    minimum = unvoiced_composer.settings.caption_min_duration_s
    audio = make_audio("short.wav", "sine=frequency=440:sample_rate=22050", 3.0)
    audio_uri = file_store.put_file("uploads/tenant/x/short.wav", audio)
    scenes = [Scene(images[0], LONG), Scene(images[1], LONG)]
    result = await unvoiced_composer.compose("job-fast", scenes, audio_uri)
    for uri in (result.captions_srt_uri, result.captions_vtt_uri):
        shown = durations(file_store.get_bytes(uri).decode())
        assert shown and min(shown) >= minimum, shown
    assert len(result.warnings) == 1 and "captions" in result.warnings[0]


async def test_narration_that_fits_its_audio_keeps_its_cues_and_gives_no_warning(
    unvoiced_composer: VideoComposer, images, file_store, make_audio
):
    audio = make_audio("long.wav", "sine=frequency=440:sample_rate=22050", 6.0)
    audio_uri = file_store.put_file("uploads/tenant/x/long.wav", audio)
    scenes = [Scene(images[0], "A red fox. It runs over the hill and far away.")]
    result = await unvoiced_composer.compose("job-calm", scenes, audio_uri)
    srt = file_store.get_bytes(result.captions_srt_uri).decode()
    # As spread over the audio by length (10 and 35 characters), both long enough.
    assert durations(srt) == [round(6 * 10 / 45, 3), round(6 * 35 / 45, 3)]
    assert result.warnings == ()
