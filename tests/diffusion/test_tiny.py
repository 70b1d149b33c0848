"""The offline tiny checkpoint that `make models` builds."""

from __future__ import annotations

import json

import pytest
from storyreel_diffusion.tiny import (
    IP_ADAPTER_WEIGHTS,
    build_tiny_ip_adapter,
    build_tiny_pipeline,
    is_complete_pipeline,
    main,
)
from transformers import CLIPTokenizer


def test_built_pipeline_is_complete_with_the_real_clip_tokenizer(tiny_sd):
    assert is_complete_pipeline(tiny_sd)
    index = json.loads((tiny_sd / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None]
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd / "tokenizer")
    assert tokenizer.model_max_length == 77
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    config = json.loads((tiny_sd / "text_encoder" / "config.json").read_text())
    assert config["vocab_size"] == len(tokenizer) == 49408


def test_second_build_leaves_a_complete_pipeline_untouched(tiny_sd):
    before = {p: p.stat().st_mtime_ns for p in tiny_sd.rglob("*")}
    assert main([str(tiny_sd)]) == 0
    assert {p: p.stat().st_mtime_ns for p in tiny_sd.rglob("*")} == before


def test_build_refuses_a_folder_that_is_not_a_pipeline(tmp_path):
    target = tmp_path / "tiny-sd"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a complete pipeline"):
        build_tiny_pipeline(target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]


def test_half_written_pipeline_is_not_complete(tiny_sd, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "model_index.json").write_bytes((tiny_sd / "model_index.json").read_bytes())
    assert not is_complete_pipeline(partial)


def test_same_seed_builds_identical_weights(tiny_sd, tmp_path):
    again = build_tiny_pipeline(tmp_path / "again")
    for part in (
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ):
        assert (again / part).read_bytes() == (tiny_sd / part).read_bytes(), part
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no staging folder left


def test_tiny_ip_adapter_has_a_projection_and_one_pair_per_cross_attention(tiny_ip_adapter):
    from safetensors import safe_open

    with safe_open(tiny_ip_adapter / IP_ADAPTER_WEIGHTS, framework="pt") as weights:
        keys = set(weights.keys())
    assert {"image_proj.proj.weight", "image_proj.norm.weight"} <= keys
    pairs = sorted(int(k.split(".")[1]) for k in keys if k.endswith("to_k_ip.weight"))
    assert pairs == list(range(1, 2 * len(pairs), 2))  # numbered as the loader counts them
    config = json.loads((tiny_ip_adapter / "image_encoder" / "config.json").read_text())
    assert config["architectures"] == ["CLIPVisionModelWithProjection"]


def test_ip_adapter_build_refuses_a_folder_that_is_not_one(tiny_sd, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a complete IP-Adapter"):
        build_tiny_ip_adapter(tiny_sd, tmp_path)
    assert build_tiny_ip_adapter(tiny_sd, tmp_path / "fresh") == tmp_path / "fresh"
