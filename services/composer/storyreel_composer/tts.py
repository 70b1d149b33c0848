"""Offline narration with a piper voice."""

from __future__ import annotations

import logging
import threading
import time
import wave
from pathlib import Path

from storyreel.errors import NotReady

log = logging.getLogger(__name__)


class NarrationSynthesizer:
    """Speaks text into 16-bit mono WAV files with one piper voice.

    The voice is loaded by :meth:`load` (at service start), not in the
    constructor, so a server can report NOT_SERVING while it loads.
    """

    def __init__(self, model_path: Path, config_path: Path | None = None) -> None:
        self.model_path = Path(model_path)
        self.config_path = Path(config_path) if config_path else None
        self._voice = None
        # piper phonemizes through espeak-ng, a C library with global state:
        # one synthesis at a time.
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._voice is not None

    @property
    def sample_rate(self) -> int:
        """Sample rate of the voice, in Hz."""
        return self._require_voice().config.sample_rate

    def load(self) -> None:
        """Load the voice model (blocking; about a second on CPU)."""
        from piper import PiperVoice

        started = time.perf_counter()
        voice = PiperVoice.load(self.model_path, config_path=self.config_path)
        self._voice = voice
        log.info(
            "voice loaded",
            extra={
                "model": str(self.model_path),
                "sample_rate": voice.config.sample_rate,
                "load_s": round(time.perf_counter() - started, 2),
            },
        )

    def close(self) -> None:
        """Drop the voice."""
        self._voice = None

    def synthesize(self, text: str, wav_path: Path) -> float:
        """Speak ``text`` into a WAV file at ``wav_path``; returns its duration in seconds.

        Text with nothing to pronounce (empty, only punctuation) gives a valid
        WAV file with no samples and a duration of 0.
        """
        voice = self._require_voice()
        with self._lock, wave.open(str(wav_path), "wb") as wav:
            # Set the format up front: piper only sets it on its first chunk,
            # and a WAV without a format cannot be closed.
            wav.setframerate(voice.config.sample_rate)
            wav.setsampwidth(2)
            wav.setnchannels(1)
            voice.synthesize_wav(text, wav, set_wav_format=False)
            frames = wav.getnframes()
        return frames / voice.config.sample_rate

    def _require_voice(self):
        if self._voice is None:
            raise NotReady("the narration voice is not loaded yet")
        return self._voice
