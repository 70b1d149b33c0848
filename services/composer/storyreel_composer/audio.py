"""The video's sound track, built as one WAV file exactly as long as the video.

Every ffmpeg read of an input here (the user's audio, and the WAV files made
from it) is held to the audio containers of :mod:`storyreel_composer.user_audio`.
"""

from __future__ import annotations

import json
import math
import subprocess
import wave
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from storyreel_composer.probe import ffmpeg_exe
from storyreel_composer.user_audio import audio_input_options


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


@dataclass(frozen=True)
class Loudness:
    """What ffmpeg's ``loudnorm`` measured of a file (EBU R128)."""

    integrated_lufs: float
    true_peak_db: float
    range_lu: float
    threshold_lufs: float
    offset_lu: float


@dataclass(frozen=True)
class LoudnessTarget:
    """Where every video's sound ends up: integrated loudness, true peak, range."""

    integrated_lufs: float = -16.0
    true_peak_db: float = -1.5
    range_lu: float = 11.0

    def loudnorm(self) -> str:
        return f"loudnorm=I={self.integrated_lufs}:TP={self.true_peak_db}:LRA={self.range_lu}"


# Quieter than this is silence as far as normalisation goes: it is left silent.
_SILENCE_LUFS = -70.0


def _ffmpeg(args: list[str], what: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-y", *args]
    result = subprocess.run(
        cmd, capture_output=True, text=True, errors="replace", timeout=timeout_s, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"ffmpeg could not {what}: {result.stderr.strip()[-500:]}")
    return result


def measure_loudness(
    path: Path, target: LoudnessTarget, *, timeout_s: float, prefilter: str = ""
) -> Loudness | None:
    """Measure the first audio stream of ``path`` (after ``prefilter``); None if silent."""
    chain = f"{prefilter}," if prefilter else ""
    result = _ffmpeg(
        [
            *audio_input_options(),
            *("-i", str(path), "-map", "0:a:0"),
            *("-af", f"{chain}{target.loudnorm()}:print_format=json", "-f", "null", "-"),
        ],
        f"measure the loudness of {path.name}",
        timeout_s,
    )
    report = result.stderr[result.stderr.rfind("{") : result.stderr.rfind("}") + 1]
    values = json.loads(report)
    try:
        loudness = Loudness(
            integrated_lufs=float(values["input_i"]),
            true_peak_db=float(values["input_tp"]),
            range_lu=float(values["input_lra"]),
            threshold_lufs=float(values["input_thresh"]),
            offset_lu=float(values["target_offset"]),
        )
    except ValueError:  # "-inf": nothing above the gate
        return None
    if not math.isfinite(loudness.integrated_lufs) or loudness.integrated_lufs < _SILENCE_LUFS:
        return None
    return loudness


def normalise_track(
    source: Path,
    out_path: Path,
    duration_s: float,
    *,
    target: LoudnessTarget,
    sample_rate: int,
    channels: int = 2,
    timeout_s: float,
) -> Loudness | None:
    """Write the first audio stream of ``source`` to a WAV at ``target`` loudness,
    exactly ``duration_s`` long: padded with silence or cut at the end, sample-exact.

    Two passes of ffmpeg's ``loudnorm`` over the fitted audio: the first
    measures, the second applies one constant gain (linear mode; loudnorm
    limits peaks only if the gain would push them over the target). A silent
    source stays silent. Returns the measurement.
    """
    samples = round(duration_s * sample_rate)
    fit = f"aresample={sample_rate},apad=whole_len={samples},atrim=end_sample={samples}"
    measured = measure_loudness(source, target, timeout_s=timeout_s, prefilter=fit)
    chain = [fit]
    if measured is not None:
        chain.append(
            f"{target.loudnorm()}:measured_I={measured.integrated_lufs}"
            f":measured_TP={measured.true_peak_db}:measured_LRA={measured.range_lu}"
            f":measured_thresh={measured.threshold_lufs}:offset={measured.offset_lu}"
            ":linear=true:print_format=none"
        )
        # loudnorm works at 192 kHz; back to the output rate, and exactly as long.
        chain.append(fit)
    _ffmpeg(
        [
            *audio_input_options(),
            *("-i", str(source), "-map", "0:a:0", "-af", ",".join(chain)),
            *("-ac", str(channels), "-c:a", "pcm_s16le", str(out_path)),
        ],
        f"normalise the loudness of {source.name}",
        timeout_s,
    )
    return measured


def speech_spans(spans: Sequence[tuple[float, float]], hold_s: float) -> list[tuple[float, float]]:
    """Sorted speech spans, with pauses shorter than ``hold_s`` merged away."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(span for span in spans if span[1] > span[0]):
        if merged and start - merged[-1][1] < hold_s:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def duck_expression(spans: Sequence[tuple[float, float]], duck_db: float, ramp_s: float) -> str:
    """A ``volume`` expression of ``t``: 1, falling to ``duck_db`` over each span.

    The music starts going down ``ramp_s`` before the narrator speaks and is
    back up ``ramp_s`` after; the spans must not be closer than twice the ramp
    (see :func:`speech_spans`).
    """
    if not spans:
        return "1"
    depth = 1 - 10 ** (duck_db / 20)
    ramps = [
        f"clip(min((t-{start - ramp_s:.4f})/{ramp_s:.4f},({end + ramp_s:.4f}-t)/{ramp_s:.4f}),0,1)"
        for start, end in spans
    ]
    return f"1-{depth:.6f}*({'+'.join(ramps)})"


def mix_music(
    narration: Path,
    music: Path,
    out_path: Path,
    duration_s: float,
    *,
    spans: Sequence[tuple[float, float]],
    target: LoudnessTarget,
    music_level_lu: float,
    duck_db: float,
    ramp_s: float,
    fade_out_s: float,
    sample_rate: int,
    timeout_s: float,
) -> Path:
    """Mix ``music`` under ``narration`` into a float WAV exactly ``duration_s`` long.

    The music is looped when shorter than the video, set ``music_level_lu``
    below the narration's loudness, ducked by ``duck_db`` over ``spans`` and
    faded out over the last ``fade_out_s``. The mix is not yet normalised.
    """
    narration_loudness = measure_loudness(narration, target, timeout_s=timeout_s)
    music_loudness = measure_loudness(music, target, timeout_s=timeout_s)
    reference = narration_loudness.integrated_lufs if narration_loudness else target.integrated_lufs
    gain_db = reference + music_level_lu - music_loudness.integrated_lufs if music_loudness else 0
    samples = round(duration_s * sample_rate)
    fade_s = min(fade_out_s, duration_s)
    stereo = f"aresample={sample_rate},aformat=sample_fmts=fltp:channel_layouts=stereo"
    graph = ";".join(
        [
            f"[0:a]{stereo}[voice]",
            f"[1:a]{stereo},atrim=end_sample={samples},volume={gain_db:.2f}dB,"
            # Small frames so the ducking gain moves smoothly, not in 23 ms steps.
            "asetnsamples=n=256,"
            f"volume='{duck_expression(spans, duck_db, ramp_s)}':eval=frame,"
            f"afade=t=out:st={duration_s - fade_s:.4f}:d={fade_s:.4f}[music]",
            "[voice][music]amix=inputs=2:duration=longest:normalize=0,"
            f"apad=whole_len={samples},atrim=end_sample={samples}[mix]",
        ]
    )
    _ffmpeg(
        [
            *(*audio_input_options(), "-i", str(narration)),
            *("-stream_loop", "-1", *audio_input_options(), "-i", str(music)),
            *("-filter_complex", graph, "-map", "[mix]", "-c:a", "pcm_f32le", str(out_path)),
        ],
        "mix the music under the narration",
        timeout_s,
    )
    return out_path
