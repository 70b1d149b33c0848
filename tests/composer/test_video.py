"""encode_slideshow with real moviepy and ffmpeg: whole frames, exact cuts, player-safe format."""

from __future__ import annotations

import bisect
import subprocess
import wave
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
from storyreel_composer.timeline import Timeline
from storyreel_composer.video import encode_slideshow
from support import probe_media

COLOURS = [(230, 20, 20), (20, 230, 20), (20, 20, 230)]


def silent_wav(path: Path, seconds: float, rate: int = 22050) -> Path:
    with wave.open(str(path), "wb") as wav:
        wav.setframerate(rate)
        wav.setsampwidth(2)
        wav.setnchannels(1)
        wav.writeframes(b"\0\0" * round(seconds * rate))
    return path


# (30, (5, 4, 41)): durations whose plain float sum falls short of 50 frames.
@pytest.mark.parametrize(("fps", "frames"), [(30, (5, 4, 41)), (7, (1, 1, 3))])
def test_every_scene_is_shown_on_exactly_its_frames(tmp_path, fps, frames):
    timeline = Timeline(fps, frames)
    pictures = [np.full((64, 96, 3), colour, np.uint8) for colour in COLOURS]
    out = encode_slideshow(
        pictures,
        timeline,
        silent_wav(tmp_path / "track.wav", timeline.duration_s),
        tmp_path / "out.mp4",
        preset="veryfast",
        crf=23,
        audio_bitrate="64k",
        sample_rate=44100,
    )
    media = probe_media(out)
    assert (media.video_codec, media.pix_fmt, media.audio_codec) == ("h264", "yuv420p", "aac")
    assert (media.width, media.height, media.frames) == (96, 64, sum(frames))

    decode = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(out), "-vf", "scale=4:4"]
    raw = subprocess.run(
        [*decode, "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
        capture_output=True,
        check=True,
    ).stdout
    shown = np.frombuffer(raw, np.uint8).reshape(-1, 16, 3).mean(axis=1).argmax(axis=1)
    starts = timeline.start_frames
    assert shown.tolist() == [bisect.bisect_right(starts, k) - 1 for k in range(sum(frames))]
