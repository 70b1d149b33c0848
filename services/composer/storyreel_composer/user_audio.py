"""The user's audio: one check, used by Compose (``audio_uri``) and by ProbeAudio.

Whatever Compose would refuse as a user's audio track is refused by ProbeAudio
too, with the same message, because both call :func:`check_audio_file`. The
gateway probes every upload when it arrives, so a job is never started with
audio the composer would refuse an hour later.

The file is read only as one of the audio containers in :data:`AUDIO_DEMUXERS`
(every ffmpeg pass over it is held to them): a playlist (HLS, ffconcat) or any
other demuxer that opens further files is refused, never followed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from storyreel.errors import InvalidInput
from storyreel.limits import AUDIO_FORMATS_TEXT
from storyreel_composer.probe import (
    MediaError,
    MediaInfo,
    UnsupportedContainer,
    input_formats,
    probe,
)

#: ffmpeg demuxers a user's audio may be read with: wav, mp3, ogg (Vorbis, Opus),
#: flac, MP4 audio (m4a), raw AAC (ADTS) and WebM/Matroska, the formats of
#: :data:`storyreel.limits.AUDIO_FORMATS` (what the gateway accepts too).
AUDIO_DEMUXERS: tuple[str, ...] = (
    "wav",
    "mp3",
    "ogg",
    "flac",
    "mov",
    "mp4",
    "m4a",
    "3gp",
    "3g2",
    "mj2",
    "aac",
    "matroska",
    "webm",
)

#: Object-key prefix of uploads: the only objects ProbeAudio reads.
UPLOADS_PREFIX = "uploads/"


def audio_input_options() -> list[str]:
    """ffmpeg input options that hold a read of user audio to :data:`AUDIO_DEMUXERS`."""
    return input_formats(AUDIO_DEMUXERS)


@dataclass(frozen=True)
class AudioFacts:
    """What a usable audio file holds (what ProbeAudio answers)."""

    duration_s: float
    codec: str
    sample_rate: int
    channels: int
    #: The container, as ffmpeg names its demuxer ("mp3", "wav", "mov,mp4,m4a,3gp,3g2,mj2").
    format: str

    @classmethod
    def of(cls, info: MediaInfo) -> AudioFacts:
        return cls(
            duration_s=info.duration_s,
            codec=info.audio_codec or "",
            sample_rate=info.sample_rate or 0,
            channels=info.channels or 0,
            format=info.container or "",
        )


def check_audio_file(path: Path, uri: str, *, max_audio_s: float, timeout_s: float) -> MediaInfo:
    """The audio at ``path`` (stored as ``uri``), decoded; InvalidInput naming the problem.

    Refused: an empty file, anything that is not audio in one of
    :data:`AUDIO_DEMUXERS`, corrupt or truncated data, no audio stream, no
    samples, or more than ``max_audio_s`` seconds. Messages start with
    ``audio_uri <uri>``, the field of ComposeRequest.
    """
    if path.stat().st_size == 0:
        raise InvalidInput(f"audio_uri {uri} is not usable audio: the file is empty")
    try:
        # The header first, so an overlong file is refused without decoding it.
        header = probe(path, decode=False, timeout_s=timeout_s, formats=AUDIO_DEMUXERS)
        if header.has_audio and header.duration_s > max_audio_s + 1:
            raise InvalidInput(
                f"audio_uri {uri} lasts {header.duration_s:.1f} s; the limit is {max_audio_s:g} s"
            )
        info = probe(path, decode_video=False, timeout_s=timeout_s, formats=AUDIO_DEMUXERS)
    except UnsupportedContainer:
        raise InvalidInput(
            f"audio_uri {uri} is not usable audio: it is not in a supported format "
            f"({AUDIO_FORMATS_TEXT}; playlists are never read)"
        ) from None
    except MediaError as exc:
        raise InvalidInput(f"audio_uri {uri} is not usable audio: {exc}") from None
    if not info.has_audio:
        raise InvalidInput(f"audio_uri {uri} is not usable audio: it has no audio stream")
    if info.duration_s <= 0:
        raise InvalidInput(f"audio_uri {uri} is not usable audio: it holds no samples")
    if info.duration_s > max_audio_s:
        raise InvalidInput(
            f"audio_uri {uri} lasts {info.duration_s:.1f} s; the limit is {max_audio_s:g} s"
        )
    return info
