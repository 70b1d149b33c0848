"""Offline narration with piper voices, timed sentence by sentence."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import threading
import time
import wave
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from storyreel.errors import InvalidInput, NotReady
from storyreel.narration_language import choose_voice, load_detector, narration_text
from storyreel_composer.captions import split_sentences

log = logging.getLogger(__name__)

#: Version of what a narration cache key covers and of the cached entry's layout
#: (:mod:`storyreel_composer.narration_cache`): change it when either changes.
NARRATION_CACHE_FORMAT = "storyreel-narration-1"


@dataclass(frozen=True)
class VoiceInfo:
    """One narration voice: its exact name, language and sample rate (from its config)."""

    name: str
    language: str = ""
    sample_rate: int = 0


@dataclass(frozen=True)
class VoiceCatalog:
    """Every voice a request may name (sorted by name) and the one an empty name selects."""

    voices: tuple[VoiceInfo, ...]
    default_voice: str

    @property
    def names(self) -> list[str]:
        return [voice.name for voice in self.voices]


@dataclass(frozen=True)
class Speech:
    """A narration written to a WAV file: its length and when each sentence is heard.

    ``sentences`` holds (text, start_s, end_s) in the file's time; the pauses
    between sentences belong to no sentence.
    """

    duration_s: float
    sentences: tuple[tuple[str, float, float], ...] = ()


class NarrationSynthesizer:
    """Speaks text into 16-bit mono WAV files with piper voices.

    The default voice is ``model_path`` under the name ``name``; ``more_voices``
    adds others by name (each config is the model path plus ``.json``).
    Voices are loaded by :meth:`load` (at service start), not in the
    constructor, so a server can report NOT_SERVING while they load.
    """

    def __init__(
        self,
        model_path: Path,
        config_path: Path | None = None,
        *,
        name: str = "joe",
        more_voices: Mapping[str, Path] | None = None,
        sentence_pause_s: float = 0.0,
    ) -> None:
        self.default_voice = name
        self._files: dict[str, tuple[Path, Path | None]] = {
            name: (Path(model_path), Path(config_path) if config_path else None)
        }
        for other, path in (more_voices or {}).items():
            if other != name:
                self._files[other] = (Path(path), None)
        self.sentence_pause_s = sentence_pause_s
        self._voices: dict[str, object] = {}
        #: Per loaded voice: what identifies its files (sizes and SHA-256 of model and config).
        self._fingerprints: dict[str, str] = {}
        self._catalog: VoiceCatalog | None = None
        # piper phonemizes through espeak-ng, a C library with global state:
        # one synthesis at a time.
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings) -> NarrationSynthesizer:
        """The voices a :class:`~storyreel_composer.settings.ComposerSettings` names."""
        synthesizer = cls(
            settings.voice_model_path,
            settings.voice_config_path,
            name="joe",
            more_voices={**settings.folder_voices, **settings.voices},
            sentence_pause_s=settings.sentence_pause_s,
        )
        synthesizer.default_voice = settings.default_voice
        return synthesizer

    @property
    def voice_names(self) -> list[str]:
        return sorted(self._files)

    @property
    def loaded(self) -> bool:
        return bool(self._voices)

    @property
    def sample_rate(self) -> int:
        """Sample rate of the default voice, in Hz."""
        return self.sample_rate_of(None)

    def sample_rate_of(self, voice: str | None) -> int:
        """Sample rate of ``voice`` (None: the default), in Hz."""
        return self._require_voice(voice).config.sample_rate

    def catalog(self) -> VoiceCatalog:
        """Every voice with its language and sample rate, loaded or not.

        Names are exact: :meth:`check_voice` compares them case-sensitively.
        The language and rate come from each voice's config file (the model
        path plus ``.json`` unless given), read once; unknown values are empty/0.
        """
        if self._catalog is None:
            self._catalog = VoiceCatalog(
                tuple(self._describe(name) for name in self.voice_names), self.default_voice
            )
        return self._catalog

    def _describe(self, name: str) -> VoiceInfo:
        model, config = self._files[name]
        path = config or model.with_name(model.name + ".json")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            language = data.get("language", {}).get("code") or data.get("espeak", {}).get(
                "voice", ""
            )
            rate = int(data.get("audio", {}).get("sample_rate", 0))
        except (OSError, ValueError, AttributeError, TypeError):
            log.warning("voice config unreadable", extra={"voice": name, "config": str(path)})
            return VoiceInfo(name)
        return VoiceInfo(name, str(language), rate)

    def check_voice(self, voice: str | None) -> str:
        """The name of ``voice`` (None or empty: the default); InvalidInput if unknown.

        Names are exact (case-sensitive): "JOE" is not "joe".
        """
        name = voice or self.default_voice
        if name not in self._files:
            raise InvalidInput(f"voice {name!r} is not one of {', '.join(self.voice_names)}")
        return name

    def voice_for(self, voice: str | None, narrations: Sequence[str]) -> str:
        """The voice that speaks ``narrations``: ``voice`` (None or empty: one is chosen).

        The shared rule, :func:`storyreel.narration_language.choose_voice`, over this
        composer's voices and their config languages: with no voice named, the default
        when it speaks the narration's language, else one that does; FailedPrecondition
        when the narration is clearly in a language no voice speaks; InvalidInput for an
        unknown name, or a named voice that clearly speaks another language than the
        narration's. Narration too short or mixed to tell keeps the named or default voice.
        """
        self.check_voice(voice)  # an unknown name first, whatever the language
        languages = {info.name: info.language for info in self.catalog().voices}
        return choose_voice(
            narration_text(narrations), languages, self.default_voice, requested=voice or ""
        )

    def load(self) -> None:
        """Load every voice model (blocking; about a second each on CPU), and the model
        that tells the narration's language (:meth:`voice_for`)."""
        from piper import PiperVoice

        load_detector()

        for name, (model, config) in self._files.items():
            started = time.perf_counter()
            voice = PiperVoice.load(model, config_path=config)
            self._fingerprints[name] = _fingerprint(
                model, config or model.with_name(model.name + ".json")
            )
            self._voices[name] = voice
            log.info(
                "voice loaded",
                extra={
                    "voice": name,
                    "model": str(model),
                    "sample_rate": voice.config.sample_rate,
                    "load_s": round(time.perf_counter() - started, 2),
                },
            )

    def close(self) -> None:
        """Drop the voices."""
        self._voices = {}
        self._fingerprints = {}

    def narration_key(self, text: str, *, voice: str | None = None, rate: float = 1.0) -> str:
        """The content key of what :meth:`speak` makes of ``text``: the SHA-256 of a canonical
        JSON of everything that decides the speech.

        That is the cache format, the voice's name and files (sizes and SHA-256 of its model
        and config, taken at :meth:`load`), the piper version, the speaking rate, the pause
        between sentences, the sentences exactly as they are spoken (``text`` after
        :func:`split_sentences`) and the WAV format (sample rate, 16-bit mono).
        NotReady before :meth:`load`; InvalidInput for an unknown voice.
        """
        piper_voice = self._require_voice(voice)
        name = self.check_voice(voice)
        payload = {
            "format": NARRATION_CACHE_FORMAT,
            "voice": name,
            "voice_files": self._fingerprints.get(name, ""),
            "piper": _piper_version(),
            "rate": float(rate),
            "sentence_pause_s": float(self.sentence_pause_s),
            "sentences": split_sentences(text),
            "sample_rate": int(piper_voice.config.sample_rate),
            "sample_width": 2,
            "channels": 1,
        }
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def speak(
        self, text: str, wav_path: Path, *, voice: str | None = None, rate: float = 1.0
    ) -> Speech:
        """Speak ``text`` into a WAV file at ``wav_path``, one sentence at a time.

        ``rate`` scales the pace (1 is the voice's own, 2 twice as fast).
        Sentences are separated by ``sentence_pause_s`` of silence. Text with
        nothing to pronounce (empty, only punctuation) gives a valid WAV file
        with no samples and a duration of 0.
        """
        from piper import SynthesisConfig

        piper_voice = self._require_voice(voice)
        sample_rate = piper_voice.config.sample_rate
        config = SynthesisConfig(length_scale=piper_voice.config.length_scale / rate)
        pause = np.zeros(round(self.sentence_pause_s * sample_rate), dtype=np.int16)
        sentences: list[tuple[str, float, float]] = []
        written = 0
        with self._lock, wave.open(str(wav_path), "wb") as wav:
            # Set the format up front: a WAV without a format cannot be closed.
            wav.setframerate(sample_rate)
            wav.setsampwidth(2)
            wav.setnchannels(1)
            for sentence in split_sentences(text):
                chunks = piper_voice.synthesize(sentence, config)
                audio = [chunk.audio_int16_array for chunk in chunks]
                samples = np.concatenate(audio) if audio else np.zeros(0, np.int16)
                if not len(samples):
                    continue  # nothing to pronounce
                if sentences and len(pause):
                    wav.writeframes(pause.tobytes())
                    written += len(pause)
                wav.writeframes(samples.tobytes())
                sentences.append(
                    (sentence, written / sample_rate, (written + len(samples)) / sample_rate)
                )
                written += len(samples)
        return Speech(written / sample_rate, tuple(sentences))

    def synthesize(
        self, text: str, wav_path: Path, *, voice: str | None = None, rate: float = 1.0
    ) -> float:
        """Speak ``text`` into a WAV file at ``wav_path``; returns its duration in seconds."""
        return self.speak(text, wav_path, voice=voice, rate=rate).duration_s

    def _require_voice(self, voice: str | None):
        if not self._voices:
            raise NotReady("the narration voice is not loaded yet")
        return self._voices[self.check_voice(voice)]


def _fingerprint(*paths: Path) -> str:
    """Sizes and SHA-256 of the files, in order: what names a voice's model and config."""
    parts = []
    for path in paths:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
        parts.append(f"{path.stat().st_size}:{digest.hexdigest()}")
    return ",".join(parts)


@functools.cache
def _piper_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("piper-tts")
    except PackageNotFoundError:
        return ""
