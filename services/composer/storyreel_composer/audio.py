"""The video's sound track, built as one WAV file exactly as long as the video."""

from __future__ import annotations

import subprocess
import wave
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from storyreel_composer.probe import ffmpeg_exe


def write_narration_track(
    narrations: Sequence[Path | None],
    starts_s: Sequence[float],
    duration_s: float,
    out_path: Path,
    sample_rate: int,
) -> Path:
    """Lay each scene's narration WAV at its scene's start, silence elsewhere.

    Every narration must be 16-bit mono at ``sample_rate`` (what the piper
    voice writes); ``None`` means the scene is silent. The track is exactly
    ``duration_s`` long; a narration running past the end is cut.
    """
    total = round(duration_s * sample_rate)
    track = np.zeros(total, dtype=np.int16)
    for wav_path, start_s in zip(narrations, starts_s, strict=True):
        if wav_path is None:
            continue
        with wave.open(str(wav_path), "rb") as wav:
            if (wav.getframerate(), wav.getsampwidth(), wav.getnchannels()) != (
                sample_rate,
                2,
                1,
            ):
                raise ValueError(f"{wav_path} is not 16-bit mono at {sample_rate} Hz")
            samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype=np.int16)
        start = min(round(start_s * sample_rate), total)
        end = min(start + len(samples), total)
        track[start:end] = samples[: end - start]
    with wave.open(str(out_path), "wb") as out:
        out.setframerate(sample_rate)
        out.setsampwidth(2)
        out.setnchannels(1)
        out.writeframes(track.tobytes())
    return out_path


def fit_audio_track(
    source: Path,
    duration_s: float,
    out_path: Path,
    sample_rate: int,
    *,
    channels: int,
    timeout_s: float,
) -> Path:
    """Convert the first audio stream of ``source`` to a WAV of exactly ``duration_s``.

    Pads with silence or cuts at the end, sample-exact, so the sound track
    ends with the last frame. ``channels`` (1 or 2) is the output's channel
    count; more are mixed down.
    """
    samples = round(duration_s * sample_rate)
    cmd = [
        ffmpeg_exe(),
        "-hide_banner",
        "-nostdin",
        "-v",
        "error",
        "-y",
        "-i",
        str(source),
        "-map",
        "0:a:0",
        "-af",
        f"aresample={sample_rate},apad=whole_len={samples},atrim=end_sample={samples}",
        "-ac",
        str(channels),
        "-c:a",
        "pcm_s16le",
        str(out_path),
    ]
    result = subprocess.run(
        cmd, capture_output=True, text=True, errors="replace", timeout=timeout_s, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"ffmpeg could not convert {source}: {result.stderr.strip()[-500:]}")
    return out_path
