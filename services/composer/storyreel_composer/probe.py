"""Media probing with the ffmpeg binary bundled by imageio-ffmpeg.

There is no ffprobe here, so :func:`probe` reads what ``ffmpeg -i FILE`` prints
about the container and its first audio and video streams, and, for an exact
duration and to find corrupt data, decodes the streams into ffmpeg's null
muxer and reads the end time its ``-progress`` report gives.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path


class MediaError(ValueError):
    """The file is not media ffmpeg can read, or its data is corrupt or truncated."""


class UnsupportedContainer(MediaError):
    """ffmpeg recognised the file, but as a container outside the allowed ``formats``."""


@dataclass(frozen=True)
class MediaInfo:
    """What a media file holds (first audio stream, first video stream)."""

    #: Seconds. Exact (from decoding) when probed with ``decode=True``,
    #: else the container's header value (10 ms resolution; 0.0 if unknown).
    duration_s: float
    has_audio: bool
    has_video: bool
    video_codec: str | None = None
    pix_fmt: str | None = None
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    #: Decoded video frames; only known with ``decode=True``.
    frames: int | None = None
    audio_codec: str | None = None
    sample_rate: int | None = None
    channels: int | None = None
    #: The demuxer ffmpeg read the file with (e.g. "mp3", "wav", "mov,mp4,m4a,3gp,3g2,mj2").
    container: str | None = None


@cache
def ffmpeg_exe() -> str:
    """Path of the bundled ffmpeg binary."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


_INPUT_RE = re.compile(r"^Input #0, (.+?), from '", re.MULTILINE)
_DURATION_RE = re.compile(r"^\s*Duration: (\d+):(\d+):(\d+(?:\.\d+)?)", re.MULTILINE)
_STREAM_RE = re.compile(r"^\s*Stream #\d+:\d+\S*: (Video|Audio): (.*)$", re.MULTILINE)
_SIZE_RE = re.compile(r"^(\d+)x(\d+)\b")
_FPS_RE = re.compile(r"^(\d+(?:\.\d+)?)(k?) fps$")
_RATE_RE = re.compile(r"^(\d+) Hz$")
_CHANNELS = {"mono": 1, "stereo": 2}
_CHANNELS_RE = re.compile(r"^(\d+) channels")
# Messages ffmpeg logs while demuxing or decoding damaged data. Benign
# warnings (e.g. "Guessed Channel Layout") do not match.
_CORRUPT_RE = re.compile(
    r"corrupt|invalid data|error (?:while decoding|submitting packet|decoding)"
    r"|header missing|truncat|partial file|filesize and duration do not match",
    re.IGNORECASE,
)
# ffmpeg recognised the container only by a guess (a low probe score): what follows the
# few bytes it matched is not the format's (a truncated or damaged file, or not media).
_MISDETECTED_RE = re.compile(r"detected only with low score of \d+, misdetection possible")
# A decoded duration this much shorter than the header's means missing data.
_TRUNCATION_TOLERANCE_S = 0.5
_TRUNCATION_TOLERANCE_FRACTION = 0.02


def probe(
    path: Path,
    *,
    decode: bool = True,
    decode_video: bool = True,
    timeout_s: float | None = None,
    formats: Sequence[str] = (),
) -> MediaInfo:
    """Describe the media file at ``path``; MediaError if it is not readable media.

    ``decode=True`` decodes the first audio stream and (with ``decode_video``)
    the first video stream, which makes ``duration_s`` exact and finds corrupt
    or truncated data. Without ``decode_video`` the duration is the audio's.
    ``formats`` (ffmpeg demuxer names), when given, are the only containers
    ffmpeg may read the file as, in every pass: a playlist (HLS, ffconcat) or
    any other demuxer that opens further files is never opened.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise MediaError(f"{path} does not exist") from None
    if size == 0:
        raise MediaError("the file is empty (0 bytes)")

    only = input_formats(formats)
    header = _run([ffmpeg_exe(), "-hide_banner", "-nostdin", *only, "-i", str(path)], timeout_s)
    if formats and "not on whitelist" in header.stderr:
        raise UnsupportedContainer("it is in a container that may not be read here")
    info = _parse_header(header.stderr)
    if _MISDETECTED_RE.search(header.stderr):
        raise MediaError(
            f"it is truncated or damaged: ffmpeg recognises it as {info.container or 'media'} "
            "only by a guess (too little of it is that format's data)"
        )
    if not decode or not (info.has_audio or info.has_video):
        return info

    decode_streams = ["-map", "0:a:0"] if info.has_audio else []
    if info.has_video and decode_video:
        # Capital V: video streams that are not attached pictures (cover art).
        decode_streams += ["-map", "0:V:0"]
    if not decode_streams:
        return info
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "warning", *only, "-i", str(path)]
    cmd += [*decode_streams, "-f", "null", "-", "-nostats", "-progress", "pipe:1"]
    result = _run(cmd, timeout_s)
    if result.returncode != 0:
        raise MediaError(f"ffmpeg could not decode it: {_last_line(result.stderr)}")
    damage = [line for line in result.stderr.splitlines() if _CORRUPT_RE.search(line)]
    if damage:
        raise MediaError(f"its data is corrupt: {_strip_prefix(damage[0])}")

    progress = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    out_time_us = progress.get("out_time_us", "N/A")
    duration_s = int(out_time_us) / 1e6 if out_time_us.lstrip("-").isdigit() else 0.0
    duration_s = max(duration_s, 0.0)
    frames = int(progress["frame"]) if progress.get("frame", "").isdigit() else None

    decoded_everything = decode_video or not info.has_video
    tolerance = max(_TRUNCATION_TOLERANCE_S, _TRUNCATION_TOLERANCE_FRACTION * info.duration_s)
    if decoded_everything and info.duration_s - duration_s > tolerance:
        raise MediaError(
            f"it is truncated: its header says {info.duration_s:.2f} s "
            f"but only {duration_s:.2f} s decode"
        )
    return replace(info, duration_s=duration_s, frames=frames if info.has_video else None)


def input_formats(formats: Sequence[str]) -> list[str]:
    """ffmpeg input options that allow only the demuxers ``formats`` (none: any)."""
    return ["-format_whitelist", ",".join(formats)] if formats else []


def _run(cmd: list[str], timeout_s: float | None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            cmd, capture_output=True, text=True, errors="replace", timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        raise MediaError(f"ffmpeg took longer than {timeout_s} s to read it") from None


def _parse_header(stderr: str) -> MediaInfo:
    # `ffmpeg -i FILE` without an output exits 1 after printing the input
    # description; a file it cannot open prints no "Input #0".
    if "Input #0" not in stderr:
        raise MediaError(f"it is not a media file ffmpeg can read ({_last_line(stderr)})")
    duration_s = 0.0
    if match := _DURATION_RE.search(stderr):
        hours, minutes, seconds = match.groups()
        duration_s = int(hours) * 3600 + int(minutes) * 60 + float(seconds)

    fields: dict[str, object] = {"duration_s": duration_s, "has_audio": False, "has_video": False}
    if match := _INPUT_RE.search(stderr):
        fields["container"] = match.group(1)
    for kind, description in _STREAM_RE.findall(stderr):
        parts = _split_top_level(description)
        codec = parts[0].split()[0] if parts and parts[0].split() else None
        if kind == "Video" and not fields["has_video"]:
            if "(attached pic)" in description:
                continue  # cover art in an audio file is not video
            fields.update(has_video=True, video_codec=codec)
            if len(parts) > 1:
                fields["pix_fmt"] = re.split(r"[(\s]", parts[1], maxsplit=1)[0] or None
            for part in parts[1:]:
                if (size := _SIZE_RE.match(part)) and "width" not in fields:
                    fields.update(width=int(size.group(1)), height=int(size.group(2)))
                if (fps := _FPS_RE.match(part)) and "fps" not in fields:
                    fields["fps"] = float(fps.group(1)) * (1000 if fps.group(2) else 1)
        elif kind == "Audio" and not fields["has_audio"]:
            fields.update(has_audio=True, audio_codec=codec)
            for part in parts[1:]:
                if rate := _RATE_RE.match(part):
                    fields["sample_rate"] = int(rate.group(1))
                elif part in _CHANNELS:
                    fields["channels"] = _CHANNELS[part]
                elif channels := _CHANNELS_RE.match(part):
                    fields["channels"] = int(channels.group(1))
    return MediaInfo(**fields)  # type: ignore[arg-type]


def _split_top_level(text: str) -> list[str]:
    """Split a stream description at commas outside parentheses and brackets."""
    parts, depth, current = [], 0, []
    for char in text:
        if char in "([":
            depth += 1
        elif char in ")]":
            depth = max(depth - 1, 0)
        if char == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    parts.append("".join(current).strip())
    return parts


def _last_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return _strip_prefix(lines[-1]) if lines else "no output"


def _strip_prefix(line: str) -> str:
    # Drop ffmpeg's "[component @ 0x55...]" prefixes: addresses say nothing to a caller.
    return re.sub(r"^(\[[^\]]*\]\s*)+", "", line.strip())
