"""Content-addressed cache of synthesized narration in the artifact store.

A scene's speech is stored once under ``<prefix>/<key>.wav``, where the key is
:meth:`~storyreel_composer.tts.NarrationSynthesizer.narration_key` (everything that
decides the speech: voice files, rate, pause, sentences, format). Composing a job
again after one scene's narration changed synthesizes only that scene: every other
scene's speech comes back byte for byte as it was first synthesized, with its
sentence times, so the timeline, captions and mix are what they were.

An entry is one object (a single put, so a reader sees a whole entry or none): a
16-bit mono PCM WAV file that any player opens, with one more RIFF chunk,
``stry``, holding JSON: the cache format, the key, the speech's duration and
sentence times (floats as JSON writes them, exact) and the SHA-256 of the samples.
A missing, unreadable or corrupt entry (wrong key, format, truncated samples, wrong
checksum) is a miss: the scene is synthesized again and the entry overwritten.
Failing to read or write the cache never fails a composition.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import struct
import wave
from pathlib import Path

from storyreel.errors import NotFound
from storyreel.storage import ArtifactStore
from storyreel_composer.tts import NARRATION_CACHE_FORMAT, Speech

log = logging.getLogger(__name__)

_META_CHUNK = b"stry"


def cache_key(prefix: str, key: str) -> str:
    """Object key of a cached narration: ``<prefix>/<key>.wav``."""
    return f"{prefix}/{key}.wav"


class CorruptEntry(ValueError):
    """A cache entry that is not what :func:`encode_entry` writes for its key."""


def encode_entry(key: str, wav_path: Path, speech: Speech) -> bytes:
    """The cache entry of the speech :meth:`NarrationSynthesizer.speak` wrote to ``wav_path``."""
    with wave.open(str(wav_path), "rb") as wav:
        params = wav.getparams()
        frames = wav.readframes(params.nframes)
    meta = {
        "format": NARRATION_CACHE_FORMAT,
        "key": key,
        "duration_s": speech.duration_s,
        "sentences": [list(sentence) for sentence in speech.sentences],
        "sha256": hashlib.sha256(frames).hexdigest(),
    }
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(params.nchannels)
        wav.setsampwidth(params.sampwidth)
        wav.setframerate(params.framerate)
        wav.writeframes(frames)
    body = json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    chunk = _META_CHUNK + struct.pack("<I", len(body)) + body + (b"\0" if len(body) % 2 else b"")
    data = bytearray(buffer.getvalue() + chunk)
    data[4:8] = struct.pack("<I", len(data) - 8)
    return bytes(data)


def decode_entry(key: str, data: bytes, wav_path: Path, sample_rate: int) -> Speech:
    """Write the entry's speech to ``wav_path`` exactly as it was synthesized; its
    :class:`Speech`. CorruptEntry unless the entry is whole and made for ``key``."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise CorruptEntry("not a WAV file")
    chunks: dict[bytes, bytes] = {}
    offset = 12
    while offset + 8 <= len(data):
        name = data[offset : offset + 4]
        (size,) = struct.unpack("<I", data[offset + 4 : offset + 8])
        body = data[offset + 8 : offset + 8 + size]
        if len(body) != size:
            raise CorruptEntry(f"chunk {name!r} is truncated")
        chunks.setdefault(name, body)
        offset += 8 + size + size % 2
    fmt, frames, body = chunks.get(b"fmt "), chunks.get(b"data"), chunks.get(_META_CHUNK)
    if fmt is None or frames is None or body is None or len(fmt) < 16:
        raise CorruptEntry("a chunk is missing")
    tag, channels, rate, _byte_rate, _align, bits = struct.unpack("<HHIIHH", fmt[:16])
    if (tag, channels, rate, bits) != (1, 1, sample_rate, 16):
        raise CorruptEntry(f"format {(tag, channels, rate, bits)} is not 16-bit mono PCM")
    try:
        meta = json.loads(body.decode())
        duration_s = meta["duration_s"]
        sentences = tuple((str(t), float(a), float(b)) for t, a, b in meta["sentences"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptEntry(f"unreadable metadata: {exc}") from None
    if meta.get("format") != NARRATION_CACHE_FORMAT or meta.get("key") != key:
        raise CorruptEntry("made for another key or format")
    if meta.get("sha256") != hashlib.sha256(frames).hexdigest():
        raise CorruptEntry("the samples do not match their checksum")
    if duration_s != (len(frames) // 2) / sample_rate or len(frames) % 2:
        raise CorruptEntry("the duration does not match the samples")
    if any(not 0 <= start < end <= duration_s for _, start, end in sentences):
        raise CorruptEntry("a sentence lies outside the speech")
    with wave.open(str(wav_path), "wb") as wav:
        wav.setframerate(sample_rate)
        wav.setsampwidth(2)
        wav.setnchannels(1)
        wav.writeframes(frames)
    return Speech(duration_s, sentences)


class NarrationCache:
    """Cached speech in ``store`` under ``prefix``; lookups and writes never raise."""

    def __init__(self, store: ArtifactStore, prefix: str) -> None:
        self.store = store
        self.prefix = prefix

    def load(self, key: str, wav_path: Path, sample_rate: int) -> Speech | None:
        """The cached speech of ``key`` written to ``wav_path``, or None (missing or bad)."""
        object_key = cache_key(self.prefix, key)
        try:
            data = self.store.get_bytes(self.store.uri_for(object_key))
        except NotFound:
            return None
        except Exception as exc:  # a cache that cannot be read is a miss, not a failure
            log.warning("narration cache unreadable", extra={"key": object_key, "error": str(exc)})
            return None
        try:
            return decode_entry(key, data, wav_path, sample_rate)
        except CorruptEntry as exc:
            log.warning(
                "narration cache entry corrupt", extra={"key": object_key, "error": str(exc)}
            )
            wav_path.unlink(missing_ok=True)
            return None

    def save(self, key: str, wav_path: Path, speech: Speech) -> None:
        """Store the speech at ``wav_path`` under ``key`` (replacing any entry there)."""
        object_key = cache_key(self.prefix, key)
        try:
            self.store.put_bytes(object_key, encode_entry(key, wav_path, speech), "audio/wav")
        except Exception as exc:  # the composition goes on without a cache entry
            log.warning("narration cache not written", extra={"key": object_key, "error": str(exc)})
