"""Recognises audio uploads by their content, not their name."""

from __future__ import annotations

#: Bytes needed to recognise every supported format.
SNIFF_BYTES = 16


def sniff_audio(head: bytes) -> str | None:
    """File extension of the audio format ``head`` starts with, or None.

    Supported: :data:`storyreel.limits.AUDIO_FORMATS`, the formats the composer reads:
    wav, mp3, ogg (Vorbis/Opus), flac, m4a (MP4 audio), raw AAC (ADTS) and webm
    (WebM or Matroska, by its EBML header).
    """
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"\x1a\x45\xdf\xa3":  # EBML: WebM, or Matroska (read the same)
        return "webm"
    if head[4:8] == b"ftyp":
        return "m4a"
    if head[:3] == b"ID3":
        return "mp3"
    if len(head) >= 2 and head[0] == 0xFF:
        if head[1] & 0xF6 == 0xF0:  # ADTS sync word, layer 0: AAC
            return "aac"
        if head[1] & 0xE0 == 0xE0 and head[1] & 0x06 != 0:  # MPEG audio frame sync, layer I-III
            return "mp3"
    return None
