"""The story's language and the voice that speaks it: one rule for the gateway and the composer.

The gateway asks it at admission (of the prompt, or of a caller's own storyboard) and again
once a generated storyboard is written, before any image is drawn; the composer asks it to
choose the voice a request that names none is spoken with. Both see the same voices (the
composer's, ComposerService.ListVoices) and so come to the same answer.

The language is told by `py3langid <https://pypi.org/project/py3langid/>`_ (a naive Bayes
model over byte n-grams, 97 languages, its model inside the wheel: offline, about 1 s to
load once and about a millisecond per text). Short texts are unreliable, so a language
counts as *known* only when the text has at least :data:`MIN_LETTERS` letters and the
model gives it a probability of at least :data:`MIN_CONFIDENCE`; otherwise (a few words,
names, mixed languages) nothing is refused on a guess: the requested voice, or the
default, speaks.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterable, Mapping

from storyreel.errors import FailedPrecondition, InvalidInput

#: Fewest letters a text needs before its language is trusted ("Hallo Welt" has 9).
MIN_LETTERS = 6
#: Lowest probability (py3langid's, normalised over its languages) of a trusted language.
#: Clear sentences score above 0.7; a few words or mixed text score below 0.5.
MIN_CONFIDENCE = 0.5

#: Codes that name the same language for narration: varieties and macrolanguage members
#: (as py3langid or a piper/espeak config may give them) to the code voices are matched on.
_SAME_LANGUAGE = {
    "cmn": "zh",
    "yue": "zh",
    "wuu": "zh",
    "ary": "ar",
    "arz": "ar",
    "hbo": "he",
    "iw": "he",
    "nb": "no",
    "nn": "no",
    "uzs": "uz",
}

#: English names of common languages, for messages; other codes are shown as they are.
_NAMES = {
    "ar": "Arabic",
    "bg": "Bulgarian",
    "ca": "Catalan",
    "cs": "Czech",
    "cy": "Welsh",
    "da": "Danish",
    "de": "German",
    "el": "Greek",
    "en": "English",
    "es": "Spanish",
    "fa": "Persian",
    "fi": "Finnish",
    "fr": "French",
    "he": "Hebrew",
    "hi": "Hindi",
    "hu": "Hungarian",
    "id": "Indonesian",
    "is": "Icelandic",
    "it": "Italian",
    "ja": "Japanese",
    "ka": "Georgian",
    "kk": "Kazakh",
    "ko": "Korean",
    "nl": "Dutch",
    "no": "Norwegian",
    "pl": "Polish",
    "pt": "Portuguese",
    "ro": "Romanian",
    "ru": "Russian",
    "sk": "Slovak",
    "sl": "Slovenian",
    "sr": "Serbian",
    "sv": "Swedish",
    "sw": "Swahili",
    "th": "Thai",
    "tr": "Turkish",
    "uk": "Ukrainian",
    "vi": "Vietnamese",
    "zh": "Chinese",
}

_lock = threading.Lock()


def language_name(code: str) -> str:
    """``"German (de)"`` for ``"de"``; a code without a known name is shown as it is."""
    name = _NAMES.get(code)
    return f"{name} ({code})" if name else code


def voice_language(code: str) -> str:
    """The language a voice speaks, as narration is matched on it: the primary subtag of
    its config's code, lower-cased (``"de_DE"``, ``"de-de"`` and ``"de"`` are ``"de"``;
    espeak's ``"cmn"`` is ``"zh"``); ``""`` when the config names none."""
    primary = code.strip().replace("-", "_").split("_", 1)[0].lower()
    return _SAME_LANGUAGE.get(primary, primary)


@functools.cache
def _identifier():
    # Imported and loaded on first use (about a second): settings and tests that never
    # detect a language do not pay for it.
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def load_detector() -> None:
    """Load the language model now (a service calls it at start, off its event loop)."""
    with _lock:
        _identifier()


def detect_language(text: str) -> str | None:
    """The language ``text`` is clearly written in (``"de"``), or None when that is unclear.

    Unclear is: fewer than :data:`MIN_LETTERS` letters, no linguistic content, or no
    language with a probability of at least :data:`MIN_CONFIDENCE` (short phrases, names,
    text that mixes languages). Callers then fall back to the voice asked for, or the
    default: a refusal is never based on a guess.
    """
    if sum(ch.isalpha() for ch in text) < MIN_LETTERS:
        return None
    load_detector()
    code, probability = _identifier().classify(text)
    if code == "zxx" or probability < MIN_CONFIDENCE:
        return None
    return _SAME_LANGUAGE.get(code, code)


def narration_text(narrations: Iterable[str]) -> str:
    """The text whose language is the story's: every scene's narration, one per line."""
    return "\n".join(line.strip() for line in narrations if line.strip())


def choose_voice(
    text: str,
    voices: Mapping[str, str],
    default: str,
    requested: str = "",
    *,
    subject: str = "the narration",
) -> str:
    """The voice that speaks ``text``: ``requested`` if given, else one of its language.

    ``voices`` maps each voice's exact name to its language as its config names it
    (``"en_US"``; ``""`` unknown); ``default`` is the voice an empty request gets.
    ``subject`` names ``text`` in messages ("the prompt", "the storyboard's narration").

    * The language of ``text`` unclear (:func:`detect_language`), or no voice naming a
      language at all: ``requested`` or ``default``, unchecked.
    * ``requested`` given: it, unless its language is known and clearly not the text's:
      then InvalidInput when another voice speaks the text's language (name it instead),
      FailedPrecondition when none does.
    * Nothing requested: ``default`` when it speaks the language, else the first voice by
      name that does; FailedPrecondition when none does (a voice for that language must be
      installed, or the caller's own audio played instead of narration).

    Unknown names are not checked here: callers check them against the same list first.
    """
    language = detect_language(text) if text.strip() else None
    return voice_for_language(language, voices, default, requested, subject=subject)


def voice_for_language(
    language: str | None,
    voices: Mapping[str, str],
    default: str,
    requested: str = "",
    *,
    subject: str = "the narration",
) -> str:
    """:func:`choose_voice` for a story whose language is already told (None: unclear)."""
    spoken = {name: voice_language(code) for name, code in voices.items()}
    if language is None or not any(spoken.values()):
        return requested or default
    speakers = sorted(name for name, code in spoken.items() if code == language)
    if requested:
        own = spoken.get(requested, "")
        if not own or own == language:
            return requested
        if speakers:
            raise InvalidInput(
                f"voice {requested!r} speaks {language_name(own)}, but {subject} is in "
                f"{language_name(language)}: choose a voice that speaks it "
                f"({', '.join(speakers)}) or leave voice empty to have one chosen"
            )
        raise FailedPrecondition(
            f"voice {requested!r} speaks {language_name(own)}, but {subject} is in "
            f"{language_name(language)}, and no voice here speaks it. {_remedy(language)}"
        )
    if spoken.get(default) == language:
        return default
    if speakers:
        return speakers[0]
    raise FailedPrecondition(
        f"{subject} is in {language_name(language)}, and no narration voice here speaks it "
        f"(the voices speak {_languages(spoken.values())}). {_remedy(language)}"
    )


def _languages(codes: Iterable[str]) -> str:
    return ", ".join(language_name(code) for code in sorted({c for c in codes if c})) or "none"


def _remedy(language: str) -> str:
    return (
        f"Install a piper voice for {language_name(language)} in the composer's voice folder, "
        "or bring your own soundtrack (an audio upload played instead of narration, "
        "audio_mode soundtrack): then no voice is needed"
    )
