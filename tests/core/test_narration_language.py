"""The shared rule of narration languages (storyreel.narration_language), on its own."""

from __future__ import annotations

import pytest

from storyreel.errors import FailedPrecondition, InvalidInput
from storyreel.narration_language import choose_voice, detect_language, voice_language

GERMAN = "Es war einmal ein kleiner Fuchs, der fliegen wollte."
ENGLISH = "Once upon a time a little fox wanted to fly."


@pytest.mark.parametrize(
    ("code", "language"),
    [("de_DE", "de"), ("en-us", "en"), ("EN_GB", "en"), ("cmn", "zh"), ("zh_CN", "zh"),
     ("nb_NO", "no"), ("", "")],
)  # fmt: skip
def test_a_voice_speaks_the_primary_subtag_of_its_configs_code(code, language):
    assert voice_language(code) == language


def test_clear_sentences_are_told_and_short_or_mixed_text_is_not():
    assert detect_language(GERMAN) == "de"
    assert detect_language(ENGLISH) == "en"
    assert detect_language("从前有一只小狐狸，它很想飞。") == "zh"
    for unclear in ("Hallo Welt", "Ja!", "The fox looks up. 狐狸", "x" * 40, "12345 67890", ""):
        assert detect_language(unclear) is None, unclear


def test_voices_whose_languages_are_unknown_are_never_a_reason_to_refuse():
    assert choose_voice(GERMAN, {"joe": "", "amy": ""}, "joe") == "joe"
    assert choose_voice(GERMAN, {"joe": "", "amy": ""}, "joe", "amy") == "amy"
    # A named voice of unknown language, beside known ones, is taken as named.
    assert choose_voice(GERMAN, {"joe": "en_US", "bare": ""}, "joe", "bare") == "bare"


def test_a_named_voice_of_another_language_with_none_for_the_storys_is_failed_precondition():
    with pytest.raises(FailedPrecondition, match="voice 'joe' speaks English"):
        choose_voice(GERMAN, {"joe": "en_US"}, "joe", "joe")
    with pytest.raises(InvalidInput, match=r"choose a voice that speaks it \(de-a, de-b\)"):
        choose_voice(GERMAN, {"joe": "en_US", "de-b": "de_AT", "de-a": "de-de"}, "joe", "joe")
    # Nothing named: the first by name of the story's language.
    assert choose_voice(GERMAN, {"joe": "en_US", "de-b": "de_AT", "de-a": "de-de"}, "joe") == (
        "de-a"
    )
