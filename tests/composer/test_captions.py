"""Captions: wrapped with the real font inside the safe area, chunked by sentence,
timed, written as valid SubRip and WebVTT, and burned in legibly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import ImageFont
from storyreel_composer.captions import (
    Cue,
    burn,
    chunk,
    split_sentences,
    spread,
    to_srt,
    to_vtt,
    wrap,
)
from storyreel_composer.filtergraph import FilterPlan, encode
from storyreel_composer.settings import PACKAGED_FONT, ComposerSettings
from storyreel_composer.timeline import Timeline, shots
from support import ffmpeg_decode, wav_bytes

TEXT = (
    "A lighthouse keeper watches the grey sea every night, counting the waves that roll in "
    "from the north. One morning, a whale sings back! Is it real?"
)


def test_the_caption_font_ships_inside_the_package_with_its_license():
    settings = ComposerSettings()
    assert settings.caption_font_path == PACKAGED_FONT
    assert PACKAGED_FONT.is_file() and "storyreel_composer" in PACKAGED_FONT.parts
    assert "Bitstream" in (PACKAGED_FONT.parent / "LICENSE").read_text()
    assert ImageFont.truetype(str(PACKAGED_FONT), 20).getname() == ("DejaVu Sans", "Bold")


def test_sentences_split_after_their_end_marks():
    assert split_sentences("  One.  Two!Three? \n Four… “Five.” Six") == [
        "One.",
        "Two!Three?",
        "Four…",
        "“Five.”",
        "Six",
    ]


@pytest.mark.parametrize("size", [(1280, 720), (720, 1280), (480, 480), (128, 128)])
def test_wrapped_lines_fit_the_safe_width_measured_with_the_font(size, style_for):
    style = style_for(*size)
    font = ImageFont.truetype(str(PACKAGED_FONT), style.font_size)
    lines = wrap(TEXT, style)
    assert " ".join(lines).split() == TEXT.split()
    for line in lines:
        assert font.getlength(line) + 2 * style.outline <= size[0] * 0.9
        assert len(line) <= 42


@pytest.mark.parametrize("size", [(1280, 720), (720, 1280), (128, 128)])
def test_cues_hold_at_most_two_lines_never_cross_a_sentence_and_keep_every_word(size, style_for):
    style = style_for(*size)
    cues = chunk(TEXT, style)
    assert all(1 <= len(lines) <= 2 for lines in cues)
    assert " ".join(" ".join(lines) for lines in cues).split() == TEXT.split()
    sentences = split_sentences(TEXT)
    for lines in cues:
        text = " ".join(lines)
        assert any(text in sentence for sentence in sentences), text
    # A long sentence is split into cues of similar length: no cue left with one word.
    assert all(len(" ".join(lines).split()) > 1 for lines in cues[:-1])


def test_a_word_longer_than_a_line_is_broken_to_fit(style_for):
    style = style_for(128, 128)
    lines = wrap("Supercalifragilisticexpialidocious", style)
    assert "".join(lines) == "Supercalifragilisticexpialidocious" and len(lines) > 1


def test_cues_share_their_time_span_in_proportion_to_their_length():
    cues = spread([("aaaa",), ("bbbbbbbbbbbb",)], 2.0, 6.0)
    assert cues == [Cue(2.0, 3.0, ("aaaa",)), Cue(3.0, 6.0, ("bbbbbbbbbbbb",))]
    assert spread([], 0, 1) == [] and spread([("a",)], 1.0, 1.0) == []


def test_srt_and_vtt_are_written_in_their_formats_with_millisecond_times():
    cues = [
        Cue(0.0, 1.2345, ("Hello there,", "old friend.")),
        Cue(1.2345, 3661.5, ("The arrow --> points on.",)),
    ]
    assert to_srt(cues) == (
        "1\n00:00:00,000 --> 00:00:01,234\nHello there,\nold friend.\n\n"
        "2\n00:00:01,234 --> 01:01:01,500\nThe arrow --\u203a points on.\n"
    )
    assert to_vtt(cues) == (
        "WEBVTT\n\n00:00:00.000 --> 00:00:01.234\nHello there,\nold friend.\n\n"
        "00:00:01.234 --> 01:01:01.500\nThe arrow --&gt; points on.\n"
    )


def test_rounding_never_makes_cues_overlap_or_leaves_empty_ones():
    cues = [Cue(0.0, 1.0004, ("a",)), Cue(1.0004, 1.0006, ("b",)), Cue(1.0006, 2.0, ("c",))]
    srt = to_srt(cues)
    assert "00:00:01,000 --> 00:00:01,001\nb" in srt
    assert "00:00:01,001 --> 00:00:02,000\nc" in srt


def test_burned_captions_have_a_dark_outline_and_show_only_during_their_cue(
    tmp_path: Path, style_for
):
    # A near-white picture: white letters are legible only through their outline.
    width, height, fps = 320, 180, 10
    (tmp_path / "canvas.rgb").write_bytes(bytes([235]) * (width * height * 3))
    (tmp_path / "track.wav").write_bytes(wav_bytes(2.0, 22050))
    style = style_for(width, height)
    cue = Cue(0.5, 1.5, ("Legible on white",))
    timeline = Timeline(fps, (20,))
    plan = FilterPlan(
        width=width,
        height=height,
        fps=fps,
        canvases=("canvas.rgb",),
        canvas_size=(width, height),
        shots=tuple(shots(timeline, 0)),
        moves=(None,),
        total_frames=20,
        audio="track.wav",
        captions=(burn([cue], style, tmp_path),),
    )
    video = encode(plan, tmp_path, timeout_s=60)
    raw = ffmpeg_decode(video, "-f", "rawvideo", "-pix_fmt", "gray")
    frames = np.frombuffer(raw, np.uint8).reshape(-1, height, width)
    dark = frames < 60
    assert not dark[:5].any() and not dark[15:].any()  # no caption before 0.5 s or after 1.5 s
    rows, cols = np.nonzero(dark[10])
    assert len(rows) > 200  # the outline
    # Centred, inside the safe area, above the bottom margin.
    assert cols.min() >= width * 0.05 and cols.max() < width * 0.95
    assert abs((cols.min() + cols.max()) / 2 - width / 2) < 4
    assert rows.max() < height - style.bottom + 2
