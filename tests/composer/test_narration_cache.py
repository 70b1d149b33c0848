"""The narration cache: a scene's speech is synthesized once and reused, byte for byte.

Most tests use a stand-in voice that speaks random noise (a different sound on every
call, as piper's pacing differs a little on every call), so identical sound proves that
the speech came from the cache; one test uses the real piper voice (marked `model`).
"""

from __future__ import annotations

import wave
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from storyreel_composer.captions import split_sentences
from storyreel_composer.composer import ComposeResult, Scene, VideoComposer
from storyreel_composer.narration_cache import (
    CorruptEntry,
    NarrationCache,
    decode_entry,
    encode_entry,
)
from storyreel_composer.settings import ComposerSettings
from storyreel_composer.tts import NarrationSynthesizer, Speech
from support import ffmpeg_decode

from storyreel.compose_options import ComposeOptions
from storyreel.errors import StoryreelError

PREFIX = "cache/narration/"
RATE = 16000
TEXTS = ["A keeper watches the sea. Night falls.", "", "A whale sings back!"]


class NoiseVoice(NarrationSynthesizer):
    """A synthesizer whose voices speak random noise, 400 samples per character."""

    def __init__(self, pause_s: float = 0.2) -> None:
        super().__init__(
            Path("/voices/joe.onnx"),
            name="joe",
            more_voices={"amy": Path("/voices/amy.onnx")},
            sentence_pause_s=pause_s,
        )
        self.calls: list[tuple[str, str | None, float]] = []
        self._rng = np.random.default_rng()

    def load(self) -> None:
        config = SimpleNamespace(sample_rate=RATE, length_scale=1.0)
        self._voices = {name: SimpleNamespace(config=config) for name in self.voice_names}
        self._fingerprints = {name: f"1:{name}" for name in self.voice_names}

    def speak(self, text, wav_path, *, voice=None, rate=1.0) -> Speech:
        self.calls.append((text, voice, rate))
        pause = np.zeros(round(self.sentence_pause_s * RATE), np.int16)
        parts, sentences, written = [], [], 0
        for sentence in split_sentences(text):
            if not any(c.isalnum() for c in sentence):
                continue  # nothing to pronounce, as with piper
            samples = self._rng.integers(-8000, 8000, int(len(sentence) * 400 / rate), np.int16)
            if sentences:
                parts.append(pause)
                written += len(pause)
            parts.append(samples)
            sentences.append((sentence, written / RATE, (written + len(samples)) / RATE))
            written += len(samples)
        with wave.open(str(wav_path), "wb") as wav:
            wav.setframerate(RATE)
            wav.setsampwidth(2)
            wav.setnchannels(1)
            wav.writeframes(b"".join(part.tobytes() for part in parts))
        return Speech(written / RATE, tuple(sentences))


@pytest.fixture
def noise_voice() -> NoiseVoice:
    voice = NoiseVoice()
    voice.load()
    return voice


@pytest.fixture
def composer(file_store, composer_settings, noise_voice) -> VideoComposer:
    return VideoComposer(file_store, noise_voice, composer_settings)


def scenes_of(images: list[str], texts: list[str]) -> list[Scene]:
    return [Scene(uri, text) for uri, text in zip(images, texts, strict=True)]


def counts(result: ComposeResult) -> tuple[int, int]:
    return result.narration_synthesized, result.narration_cached


def entries(store) -> list[str]:
    return sorted(uri for uri in store.list() if store.key_of(uri).startswith(PREFIX))


def sound(store, result: ComposeResult) -> bytes:
    """The video's sound track, decoded."""
    path = store.path_of(result.video_uri)
    return ffmpeg_decode(path, "-map", "0:a:0", "-f", "s16le")


def assert_same_composition(store, first: ComposeResult, second: ComposeResult) -> None:
    """Timeline, captions and sound are those of the first composition."""
    assert second.scene_starts_s == first.scene_starts_s
    assert second.duration_s == first.duration_s
    assert store.get_bytes(second.captions_srt_uri) == store.get_bytes(first.captions_srt_uri)
    assert sound(store, second) == sound(store, first)


# --- compositions with the stand-in voice -----------------------------------------------------


async def test_composing_the_same_job_again_synthesizes_nothing_and_sounds_the_same(
    composer, noise_voice, images, file_store
):
    scenes = scenes_of(images, TEXTS)
    first = await composer.compose("job-again", scenes)
    assert counts(first) == (2, 0)
    assert len(entries(file_store)) == 2
    second = await composer.compose("job-again", scenes, revision=1)
    assert counts(second) == (0, 2)
    assert len(noise_voice.calls) == 2
    assert_same_composition(file_store, first, second)


async def test_changing_one_scenes_narration_synthesizes_only_that_scene(
    composer, noise_voice, images, file_store
):
    first = await composer.compose("job-edit", scenes_of(images, TEXTS))
    edited = [TEXTS[0], "", "A whale sings back, twice!"]
    second = await composer.compose("job-edit", scenes_of(images, edited), revision=1)
    assert counts(second) == (1, 1)
    assert [text for text, _, _ in noise_voice.calls] == [TEXTS[0], TEXTS[2], edited[2]]
    # The unchanged scene keeps its speech, so its captions and start are as before.
    assert second.scene_starts_s[:2] == first.scene_starts_s[:2]
    assert len(entries(file_store)) == 3


async def test_only_whitespace_changes_reuse_the_speech(composer, images):
    await composer.compose("job-space", scenes_of(images, TEXTS))
    spaced = ["  A keeper watches   the sea.\nNight falls. ", "", "A whale sings back!"]
    again = await composer.compose("job-space", scenes_of(images, spaced), revision=1)
    assert counts(again) == (0, 2)


@pytest.mark.parametrize(
    "options",
    [ComposeOptions(voice="amy"), ComposeOptions(speaking_rate=1.5)],
    ids=["another voice", "another rate"],
)
async def test_another_voice_or_speaking_rate_misses(composer, images, options):
    scenes = scenes_of(images, TEXTS)
    assert counts(await composer.compose("job-voice", scenes)) == (2, 0)
    other = await composer.compose("job-voice", scenes, options=options, revision=1)
    assert counts(other) == (2, 0)
    again = await composer.compose("job-voice", scenes, options=options, revision=2)
    assert counts(again) == (0, 2)


async def test_another_sentence_pause_misses(file_store, composer_settings, images):
    scenes = scenes_of(images, TEXTS)
    voice = NoiseVoice()
    voice.load()
    await VideoComposer(file_store, voice, composer_settings).compose("job-pause", scenes)
    paused = NoiseVoice(pause_s=0.5)
    paused.load()
    composer = VideoComposer(file_store, paused, composer_settings)
    assert counts(await composer.compose("job-pause", scenes, revision=1)) == (2, 0)


@pytest.mark.parametrize(
    "spoil",
    [
        lambda data: data[: len(data) // 2],  # truncated
        lambda data: data[:60] + bytes([data[60] ^ 0xFF]) + data[61:],  # a sample changed
        lambda data: b"not a wav file at all",
        lambda data: b"",
    ],
    ids=["truncated", "changed sample", "garbage", "empty"],
)
async def test_a_corrupt_entry_is_synthesized_again_and_overwritten(
    composer, noise_voice, images, file_store, spoil
):
    scenes = scenes_of(images, TEXTS)
    await composer.compose("job-corrupt", scenes)
    victim = entries(file_store)[0]
    file_store.put_bytes(file_store.key_of(victim), spoil(file_store.get_bytes(victim)))
    second = await composer.compose("job-corrupt", scenes, revision=1)
    assert counts(second) == (1, 1)
    # The entry was rewritten whole: the next composition takes both scenes from the cache.
    third = await composer.compose("job-corrupt", scenes, revision=2)
    assert counts(third) == (0, 2)
    assert_same_composition(file_store, second, third)


async def test_with_the_cache_off_every_composition_synthesizes_and_nothing_is_cached(
    file_store, composer_settings, noise_voice, images
):
    settings = composer_settings.model_copy(update={"narration_cache_enabled": False})
    composer = VideoComposer(file_store, noise_voice, settings)
    scenes = scenes_of(images, TEXTS)
    assert counts(await composer.compose("job-off", scenes)) == (2, 0)
    assert counts(await composer.compose("job-off", scenes, revision=1)) == (2, 0)
    assert len(noise_voice.calls) == 4
    assert entries(file_store) == []


async def test_the_cache_prefix_is_a_setting(file_store, composer_settings, noise_voice, images):
    settings = composer_settings.model_copy(update={"narration_cache_prefix": "speech"})
    composer = VideoComposer(file_store, noise_voice, settings)
    await composer.compose("job-prefix", scenes_of(images, TEXTS))
    keys = [file_store.key_of(uri) for uri in file_store.list()]
    assert len([key for key in keys if key.startswith("speech/")]) == 2
    assert entries(file_store) == []


async def test_a_store_that_fails_the_cache_does_not_fail_the_composition(
    file_store, composer_settings, noise_voice, images, monkeypatch
):
    composer = VideoComposer(file_store, noise_voice, composer_settings)
    put_bytes, get_bytes = file_store.put_bytes, file_store.get_bytes

    def failing_put(key, data, content_type=None):
        if key.startswith(PREFIX):
            raise StoryreelError("store down")
        return put_bytes(key, data, content_type)

    def failing_get(uri):
        if file_store.key_of(uri).startswith(PREFIX):
            raise OSError("store down")
        return get_bytes(uri)

    monkeypatch.setattr(file_store, "put_bytes", failing_put)
    monkeypatch.setattr(file_store, "get_bytes", failing_get)
    result = await composer.compose("job-down", scenes_of(images, TEXTS))
    assert counts(result) == (2, 0)
    assert entries(file_store) == []


async def test_a_soundtrack_alone_synthesizes_nothing(composer, images, file_store, make_audio):
    audio_uri = file_store.put_file("uploads/a.wav", make_audio("a.wav", "sine", 2.0))
    result = await composer.compose("job-music", scenes_of(images, TEXTS), audio_uri)
    assert counts(result) == (0, 0)


# --- keys and entries -------------------------------------------------------------------------


def test_the_key_covers_voice_files_rate_pause_and_the_spoken_sentences(noise_voice):
    key = noise_voice.narration_key
    base = key("Hello there. Bye.", voice="joe", rate=1.0)
    assert key("Hello there.  \n Bye. ", voice="joe", rate=1.0) == base
    assert key("Hello there. Bye.", voice=None, rate=1.0) == base  # the default voice
    assert key("Hello there! Bye.", voice="joe", rate=1.0) != base
    assert key("Hello there. Bye.", voice="amy", rate=1.0) != base
    assert key("Hello there. Bye.", voice="joe", rate=1.25) != base
    noise_voice._fingerprints["joe"] = "2:other-model"
    assert key("Hello there. Bye.", voice="joe", rate=1.0) != base
    noise_voice._fingerprints["joe"] = "1:joe"
    noise_voice.sentence_pause_s = 0.3
    assert key("Hello there. Bye.", voice="joe", rate=1.0) != base


def _spoken(voice: NoiseVoice, tmp_path: Path, text: str = "One. Two!") -> tuple[Path, Speech]:
    path = tmp_path / "spoken.wav"
    return path, voice.speak(text, path)


def test_an_entry_gives_back_the_wav_file_and_sentence_times_exactly(noise_voice, tmp_path):
    path, speech = _spoken(noise_voice, tmp_path)
    entry = encode_entry("k1", path, speech)
    back = tmp_path / "back.wav"
    assert decode_entry("k1", entry, back, RATE) == speech
    assert back.read_bytes() == path.read_bytes()
    # The entry itself is a WAV file that a player opens.
    entry_path = tmp_path / "entry.wav"
    entry_path.write_bytes(entry)
    with wave.open(str(entry_path), "rb") as wav, wave.open(str(path), "rb") as original:
        assert wav.readframes(wav.getnframes()) == original.readframes(original.getnframes())


def test_an_empty_speech_round_trips(noise_voice, tmp_path):
    path, speech = _spoken(noise_voice, tmp_path, "...")
    assert speech == Speech(0.0)
    back = tmp_path / "back.wav"
    assert decode_entry("k", encode_entry("k", path, speech), back, RATE) == speech
    assert back.read_bytes() == path.read_bytes()


def test_an_entry_for_another_key_or_rate_is_corrupt(noise_voice, tmp_path):
    path, speech = _spoken(noise_voice, tmp_path)
    entry = encode_entry("k1", path, speech)
    with pytest.raises(CorruptEntry, match="another key"):
        decode_entry("k2", entry, tmp_path / "x.wav", RATE)
    with pytest.raises(CorruptEntry, match="16-bit mono"):
        decode_entry("k1", entry, tmp_path / "x.wav", 22050)


def test_the_cache_treats_missing_and_corrupt_entries_as_misses(file_store, noise_voice, tmp_path):
    cache = NarrationCache(file_store, "cache/narration")
    back = tmp_path / "back.wav"
    assert cache.load("k1", back, RATE) is None
    path, speech = _spoken(noise_voice, tmp_path)
    cache.save("k1", path, speech)
    assert cache.load("k1", back, RATE) == speech
    file_store.put_bytes("cache/narration/k1.wav", b"RIFF\x00\x00")
    back.unlink()
    assert cache.load("k1", back, RATE) is None
    assert not back.exists()


# --- the real voice ---------------------------------------------------------------------------


@pytest.mark.model
async def test_with_the_real_voice_a_second_composition_reuses_the_speech(
    file_store, composer_settings, voice, images
):
    composer = VideoComposer(file_store, voice, composer_settings)
    scenes = scenes_of(images[:2], ["The sea is grey.", "A whale sings."])
    first = await composer.compose("job-real", scenes)
    assert counts(first) == (2, 0)
    second = await composer.compose("job-real", scenes, revision=1)
    assert counts(second) == (0, 2)
    assert_same_composition(file_store, first, second)
    edited = scenes_of(images[:2], ["The sea is grey.", "A whale sings twice."])
    third = await composer.compose("job-real", edited, revision=2)
    assert counts(third) == (1, 1)
    assert third.scene_starts_s[1] == first.scene_starts_s[1]


def test_settings_default_to_a_cache_under_cache_narration():
    settings = ComposerSettings(voice_model_path="/m.onnx", voice_config_path="/m.onnx.json")
    assert settings.narration_cache_enabled is True
    assert settings.narration_cache_prefix == "cache/narration"
    with pytest.raises(ValueError):
        ComposerSettings(narration_cache_prefix="../escape")
