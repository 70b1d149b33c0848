"""Media probing with the bundled ffmpeg: stream facts, exact durations, damaged files."""

from __future__ import annotations

import pytest
from storyreel_composer.probe import MediaError, probe


def test_mp4_reports_codecs_size_fps_frames_and_exact_duration(make_audio):
    path = make_audio(
        "clip.mp4",
        "testsrc=size=96x64:rate=12",
        2.5,
        *["-f", "lavfi", "-t", "2.5", "-i", "sine=frequency=300"],
        *["-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest"],
    )
    info = probe(path)
    assert (info.video_codec, info.pix_fmt, info.width, info.height) == ("h264", "yuv420p", 96, 64)
    assert (info.fps, info.frames) == (12.0, 30)
    assert (info.audio_codec, info.sample_rate, info.channels) == ("aac", 44100, 1)
    assert info.has_audio and info.has_video
    assert info.duration_s == pytest.approx(2.5, abs=0.03)


def test_decoding_gives_the_duration_to_the_sample_where_the_header_rounds_it(make_audio):
    path = make_audio("tone.wav", "sine=sample_rate=8000", 1.2345)
    assert probe(path, decode=False).duration_s == pytest.approx(1.23, abs=0.006)
    assert probe(path).duration_s == pytest.approx(9876 / 8000, abs=1e-6)


def test_cover_art_in_an_mp3_is_not_counted_as_video(make_audio, tmp_path):
    path = make_audio(
        "song.mp3",
        "sine",
        1.0,
        *["-f", "lavfi", "-i", "color=c=red:s=64x64:d=0.04", "-map", "0:a", "-map", "1:v"],
        *["-c:a", "libmp3lame", "-c:v", "mjpeg", "-disposition:v", "attached_pic"],
    )
    info = probe(path)
    assert info.has_audio and not info.has_video
    assert info.duration_s == pytest.approx(1.0, abs=1e-3)


def test_text_file_is_not_media(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello, this is not audio\n")
    with pytest.raises(MediaError, match="not a media file"):
        probe(path)


def test_empty_file_is_reported_as_empty(tmp_path):
    path = tmp_path / "empty.wav"
    path.touch()
    with pytest.raises(MediaError, match="empty"):
        probe(path)


def test_mp3_cut_short_is_reported_as_damaged(make_audio, tmp_path):
    full = make_audio("full.mp3", "sine", 3.0, "-c:a", "libmp3lame")
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(MediaError, match=r"corrupt|truncated"):
        probe(cut)


def test_valid_header_followed_by_garbage_is_reported_as_corrupt(make_audio, tmp_path):
    full = make_audio("full.mp3", "sine", 3.0, "-c:a", "libmp3lame")
    damaged = tmp_path / "damaged.mp3"
    damaged.write_bytes(full.read_bytes()[:3000] + bytes(range(256)) * 80)
    with pytest.raises(MediaError, match="corrupt"):
        probe(damaged)
