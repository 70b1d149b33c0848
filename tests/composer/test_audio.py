"""The sound track: loudness normalisation and music ducked under the narration."""

from __future__ import annotations

import subprocess
import wave
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
from storyreel_composer.audio import (
    LoudnessTarget,
    measure_loudness,
    mix_music,
    normalise_track,
    speech_spans,
)
from support import tone_level

TARGET = LoudnessTarget(-16.0, -1.5, 11.0)


def read_wav(path: Path) -> np.ndarray:
    """Samples of a WAV the composer wrote, mixed to mono, as floats."""
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path)]
    raw = subprocess.run(
        [*cmd, "-ac", "1", "-f", "f32le", "-"], capture_output=True, check=True
    ).stdout
    return np.frombuffer(raw, np.float32).astype(np.float64)


def test_pauses_shorter_than_the_hold_keep_the_music_down():
    spans = [(7.0, 8.0), (1.0, 3.0), (3.4, 5.0), (9.5, 9.5)]
    assert speech_spans(spans, 1.0) == [(1.0, 5.0), (7.0, 8.0)]
    assert speech_spans(spans, 0.2) == [(1.0, 3.0), (3.4, 5.0), (7.0, 8.0)]


@pytest.mark.parametrize("volume", [0.01, 0.9])
def test_tracks_are_normalised_to_the_target_loudness_and_exact_length(
    volume, make_audio, tmp_path
):
    source = make_audio(
        "in.mp3", f"aevalsrc={volume}*sin(2*PI*440*t)*(0.7+0.3*sin(2*PI*3*t)):s=44100", 3.0
    )
    out = tmp_path / "out.wav"
    measured = normalise_track(source, out, 2.5, target=TARGET, sample_rate=44100, timeout_s=60)
    assert measured is not None
    assert measure_loudness(out, TARGET, timeout_s=60).integrated_lufs == pytest.approx(
        -16.0, abs=0.5
    )
    with wave.open(str(out)) as wav:
        assert (wav.getnframes(), wav.getframerate(), wav.getnchannels()) == (110250, 44100, 2)


def test_a_silent_track_stays_silent_and_is_padded_to_length(make_audio, tmp_path):
    source = make_audio("silence.wav", "anullsrc=r=22050:cl=mono", 1.0)
    out = tmp_path / "out.wav"
    assert normalise_track(source, out, 2.0, target=TARGET, sample_rate=44100, timeout_s=60) is None
    samples = read_wav(out)
    assert len(samples) == 88200 and not samples.any()


def test_music_is_looped_ducked_under_speech_and_faded_out(make_audio, tmp_path):
    # "Speech": a 300 Hz buzz from 1 s to 3 s; music: a 4 kHz tone, 1.5 s long.
    narration = make_audio(
        "voice.wav", "aevalsrc=0.5*sin(2*PI*300*t)*between(t\\,1\\,3):s=22050", 8.0
    )
    music = make_audio("music.ogg", "sine=frequency=4000:sample_rate=44100", 1.5)
    out = mix_music(
        narration,
        music,
        tmp_path / "mix.wav",
        8.0,
        spans=[(1.0, 3.0)],
        target=TARGET,
        music_level_lu=-8,
        duck_db=-12,
        ramp_s=0.25,
        fade_out_s=2.0,
        sample_rate=44100,
        timeout_s=60,
    )
    samples, rate = read_wav(out), 44100
    assert len(samples) == 8 * 44100
    level = lambda a, b: tone_level(samples, rate, 4000, a, b)  # noqa: E731
    full = level(4.0, 5.5)  # after the speech, before the fade: looped, not ducked
    assert full > 0.01
    assert level(1.3, 2.7) == pytest.approx(full * 10 ** (-12 / 20), rel=0.15)  # -12 dB
    assert level(0.0, 0.7) == pytest.approx(full, rel=0.15)  # up before the ramp
    assert level(7.8, 8.0) < full / 5  # faded out
    # The speech itself passes at its own level.
    assert tone_level(samples, rate, 300, 1.3, 2.7) > 0.2
