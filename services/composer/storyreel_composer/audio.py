"""The video's sound track, built as one WAV file exactly as long as the video.

Every ffmpeg read of an input here (the user's audio, and the WAV files made
from it) is held to the audio containers of :mod:`storyreel_composer.user_audio`.
"""

from __future__ import annotations

import json
import math
import re
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
    """Where every video's sound ends up: integrated loudness, true peak, range.

    ``encoder_headroom_db`` is how far below ``true_peak_db`` the limiter
    starts: the AAC encoder's output peaks higher than its input (about
    1.5 dB on real music), and the ceiling holds for the encoded track.
    """

    integrated_lufs: float = -16.0
    true_peak_db: float = -1.5
    range_lu: float = 11.0
    encoder_headroom_db: float = 1.5

    def loudnorm(self) -> str:
        return f"loudnorm=I={self.integrated_lufs}:TP={self.true_peak_db}:LRA={self.range_lu}"


@dataclass(frozen=True)
class TrackLoudness:
    """What ffmpeg's ``ebur128`` filter measured of a file's first audio stream."""

    integrated_lufs: float
    true_peak_db: float


@dataclass(frozen=True)
class AacEncoding:
    """How the renderer encodes the sound track (the same encoder, rate and bitrate)."""

    bitrate: str = "128k"
    sample_rate: int = 44100


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


# The limiter runs at this rate: the peaks between samples at 44.1 or 48 kHz
# show as samples at four times that, so its sample-peak limit is a true-peak one.
_OVERSAMPLE_RATE = 192000
# How close to the target the encoded track's integrated loudness is brought (LU;
# the promise is 1), and how many passes may be spent getting there.
_AIM_LU = 0.3
_PASSES = 4
# Below this the limiter cannot go (alimiter's own bound, -24 dBFS).
_LOWEST_CEILING_DB = -24.0


def normalise_track(
    source: Path,
    out_path: Path,
    duration_s: float,
    *,
    target: LoudnessTarget,
    sample_rate: int,
    channels: int = 2,
    timeout_s: float,
    encoding: AacEncoding | None = None,
) -> Loudness | None:
    """Write the first audio stream of ``source`` to a WAV at ``target`` loudness,
    exactly ``duration_s`` long: padded with silence or cut at the end, sample-exact.

    The loudness is measured first (ffmpeg's ``loudnorm``, print_format=json, over
    the fitted audio), then one constant gain brings it to the target (loudnorm's
    linear mode, applied as a plain gain: loudnorm itself would cap the gain where
    the peaks reach its ceiling, leaving loud-peaked audio quiet), and a lookahead
    limiter at four times the sample rate holds the true peak
    ``target.encoder_headroom_db`` below the ceiling. The result is encoded to AAC
    as the renderer will (``encoding``) and measured with ``ebur128``; while the
    encoded loudness is off the target or its true peak over the ceiling, the gain
    and the limit are corrected and the track written again (a few passes over the
    audio alone). A silent source stays silent. Returns the first measurement.
    """
    samples = round(duration_s * sample_rate)
    fit = f"aresample={sample_rate},apad=whole_len={samples},atrim=end_sample={samples}"
    measured = measure_loudness(source, target, timeout_s=timeout_s, prefilter=fit)
    if measured is None:
        _write_track(source, out_path, [fit], channels, timeout_s)
        return None
    gain_db = target.integrated_lufs - measured.integrated_lufs
    ceiling_db = target.true_peak_db - target.encoder_headroom_db
    for _ in range(_PASSES):
        limit = 10 ** (max(ceiling_db, _LOWEST_CEILING_DB) / 20)
        chain = [
            fit,
            f"volume={gain_db:.3f}dB",
            f"aresample={_OVERSAMPLE_RATE}",
            f"alimiter=limit={limit:.6f}:level=false:attack=2:release=60:latency=true",
            # Back to the output rate, and exactly as long.
            fit,
        ]
        _write_track(source, out_path, chain, channels, timeout_s)
        encoded = measure_encoded(out_path, encoding or AacEncoding(), timeout_s=timeout_s)
        if encoded is None:
            break  # too short to have an integrated loudness: nothing to correct
        off_lu = target.integrated_lufs - encoded.integrated_lufs
        over_db = encoded.true_peak_db - target.true_peak_db
        if abs(off_lu) <= _AIM_LU and over_db <= 0:
            break
        gain_db += off_lu
        if over_db > -0.1:
            ceiling_db -= over_db + 0.2
    return measured


def _write_track(
    source: Path, out_path: Path, chain: list[str], channels: int, timeout_s: float
) -> None:
    _ffmpeg(
        [
            *audio_input_options(),
            *("-i", str(source), "-map", "0:a:0", "-af", ",".join(chain)),
            *("-ac", str(channels), "-c:a", "pcm_s16le", str(out_path)),
        ],
        f"normalise the loudness of {source.name}",
        timeout_s,
    )


_SUMMARY_I = re.compile(r"I:\s+(-?(?:[\d.]+|inf)) LUFS")
_SUMMARY_PEAK = re.compile(r"Peak:\s+(-?(?:[\d.]+|inf)) dBFS")


def measure_ebur128(path: Path, *, timeout_s: float) -> TrackLoudness | None:
    """Integrated loudness and true peak of the first audio stream of ``path``,
    measured by ffmpeg's ``ebur128`` filter (``peak=true``); None if nothing is
    loud enough to be measured. Only the audio is decoded."""
    result = _ffmpeg(
        [
            *("-i", str(path), "-map", "0:a:0", "-vn", "-sn", "-dn"),
            *("-af", "ebur128=peak=true", "-f", "null", "-"),
        ],
        f"measure the loudness of {path.name}",
        timeout_s,
    )
    summary = result.stderr[result.stderr.rfind("Summary:") :]
    integrated, peak = _SUMMARY_I.search(summary), _SUMMARY_PEAK.search(summary)
    if integrated is None or peak is None:
        raise RuntimeError(f"ffmpeg's ebur128 gave no summary for {path.name}")
    lufs, peak_db = float(integrated.group(1)), float(peak.group(1))
    if not math.isfinite(lufs) or lufs <= _SILENCE_LUFS:
        return None
    return TrackLoudness(lufs, peak_db)


def measure_encoded(
    track: Path, encoding: AacEncoding, *, timeout_s: float
) -> TrackLoudness | None:
    """Loudness and true peak of ``track`` once AAC-encoded as the renderer encodes it
    (the encoder is deterministic, so the video's audio is this very stream)."""
    encoded = track.with_name(track.stem + "-encoded.m4a")
    try:
        _ffmpeg(
            [
                *("-i", str(track), "-map", "0:a:0", "-c:a", "aac"),
                *("-b:a", encoding.bitrate, "-ar", str(encoding.sample_rate), str(encoded)),
            ],
            f"encode {track.name} to measure it",
            timeout_s,
        )
        return measure_ebur128(encoded, timeout_s=timeout_s)
    finally:
        encoded.unlink(missing_ok=True)


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
