"""The fast path: dtype by device, a replacement (tiny) VAE, memory order, threads, compile."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from storyreel_diffusion import models
from storyreel_diffusion.models import resolve_dtype, should_compile
from storyreel_diffusion.renderer import Scene
from support import batch_close, image_pixels, loaded_renderer, new_job

from storyreel.cpu import usable_cpus


def build_tiny_vae(folder: Path, latent_channels: int = 4) -> Path:
    """A random AutoencoderTiny (the TAESD architecture, shrunk), saved like the hub's."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=latent_channels,
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> Path:
    return build_tiny_vae(tmp_path_factory.mktemp("vae") / "taesd-tiny")


async def render(renderer, scenes):
    return [image async for image in renderer.render(new_job(), scenes)]


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_is_bf16_on_a_cpu_with_native_bf16_else_fp32(monkeypatch, native, expected):
    monkeypatch.setattr(models, "native_bf16", lambda: native)
    assert resolve_dtype("auto", torch.device("cpu")) == expected
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32


def test_compile_auto_means_cuda_only():
    assert should_compile("auto", torch.device("cuda"))
    assert not should_compile("auto", torch.device("cpu"))
    assert should_compile("on", torch.device("cpu"))
    assert not should_compile("off", torch.device("cuda"))


async def test_a_tiny_vae_decodes_and_names_itself_in_the_content_key(
    tiny_vae, diffusion_settings, file_store
):
    scene = [Scene(1, "a lighthouse at dusk", 7)]
    async with loaded_renderer(diffusion_settings, file_store) as renderer:
        [own] = await render(renderer, scene)
        own_fingerprint = renderer.facts.fingerprint
    settings = diffusion_settings.model_copy(update={"vae": str(tiny_vae)})
    async with loaded_renderer(settings, file_store) as renderer:
        assert type(renderer.pipeline.vae).__name__ == "AutoencoderTiny"
        assert renderer.facts.fingerprint.startswith(own_fingerprint + "+vae=AutoencoderTiny:")
        [tiny] = await render(renderer, scene)
        [again] = await render(renderer, scene)
    size = (diffusion_settings.default_width, diffusion_settings.default_height)
    assert Image.open(io.BytesIO(file_store.get_bytes(tiny.uri))).size == size
    # Other pixels, so another cache entry: never the full VAE's image for the tiny one's.
    assert tiny.content_key != own.content_key
    assert not np.array_equal(image_pixels(file_store, tiny), image_pixels(file_store, own))
    assert file_store.get_bytes(again.uri) == file_store.get_bytes(tiny.uri)


async def test_a_vae_of_another_kind_or_latent_width_is_refused_at_start(
    tmp_path, diffusion_settings, file_store
):
    wide = build_tiny_vae(tmp_path / "wide", latent_channels=16)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    cases = {
        str(wide): (ValueError, "16 latent channels; the checkpoint's VAE has 4"),
        str(other): (ValueError, "is a UNet2DModel; it must be one of AutoencoderKL"),
        str(tmp_path / "missing"): (FileNotFoundError, "has no config.json"),
    }
    for vae, (error, message) in cases.items():
        settings = diffusion_settings.model_copy(update={"vae": vae})
        with pytest.raises(error, match=message):
            async with loaded_renderer(settings, file_store):
                pass


@pytest.mark.parametrize("channels_last", [True, False])
async def test_memory_order_follows_the_setting_and_threads_fit_the_cpus(
    diffusion_settings, file_store, channels_last
):
    settings = diffusion_settings.model_copy(update={"channels_last": channels_last})
    async with loaded_renderer(settings, file_store) as renderer:
        pipe = renderer.pipeline
        for weight in (pipe.unet.conv_in.weight, pipe.vae.decoder.conv_in.weight):
            assert weight.is_contiguous(memory_format=torch.channels_last) is channels_last
        assert torch.get_num_threads() == usable_cpus()
        [image] = await render(renderer, [Scene(1, "a quiet harbour", 3)])
    assert image.uri


async def test_a_compiled_model_warms_up_at_the_default_size_and_keys_its_own_images(
    diffusion_settings, file_store
):
    """torch.compile on a CPU (inductor, C++ codegen): slow to compile, so one test."""
    from torch._dynamo.utils import counters

    scene = [Scene(1, "a windmill on a hill", 11)]
    async with loaded_renderer(diffusion_settings, file_store) as renderer:
        [eager] = await render(renderer, scene)
    settings = diffusion_settings.model_copy(update={"torch_compile": "on"})
    async with loaded_renderer(settings, file_store) as renderer:
        assert renderer.pipeline.unet._compiled_call_impl is not None
        compiled_frames = counters["frames"]["ok"]
        [compiled] = await render(renderer, scene)
        # The warm-up drew the default size, so the request compiled nothing more.
        assert counters["frames"]["ok"] == compiled_frames > 0
    # Compiled kernels round otherwise: a cache entry of their own, and the same picture.
    assert compiled.content_key != eager.content_key
    difference = np.abs(image_pixels(file_store, compiled) - image_pixels(file_store, eager))
    # (about 1.5 levels on average here in bfloat16; another seed is tens of levels away)
    assert difference.mean() < 5, difference.mean()


@pytest.fixture(scope="module")
def tiny_lora(tiny_sd, tmp_path_factory) -> Path:
    from storyreel_diffusion.tiny import build_tiny_lora

    return build_tiny_lora(tiny_sd, tmp_path_factory.mktemp("lora") / "tiny-lora")


async def test_a_lora_is_fused_at_its_scale_and_named_in_the_content_key(
    tiny_lora, diffusion_settings, file_store
):
    scene = [Scene(1, "a red kite over the dunes", 5)]
    async with loaded_renderer(diffusion_settings, file_store) as renderer:
        [own] = await render(renderer, scene)
        own_fingerprint = renderer.facts.fingerprint
    drawn = {}
    for scale in (0.0, 1.0):
        settings = diffusion_settings.model_copy(
            update={"lora": str(tiny_lora), "lora_scale": scale}
        )
        async with loaded_renderer(settings, file_store) as renderer:
            unet = renderer.pipeline.unet
            # Fused: no adapter layers are left to cost time at every step.
            assert not [name for name, _ in unet.named_parameters() if "lora" in name]
            assert renderer.facts.fingerprint.startswith(own_fingerprint + "+lora=sha256:")
            assert renderer.facts.fingerprint.endswith(f"@{scale:g}")
            [drawn[scale]] = await render(renderer, scene)
    assert len({own.content_key, drawn[0.0].content_key, drawn[1.0].content_key}) == 3
    # At scale 0 the fused weights are the checkpoint's own; at 1 the LoRA moves the image.
    assert batch_close(
        image_pixels(file_store, drawn[0.0]), image_pixels(file_store, own), "float32"
    )
    assert not batch_close(
        image_pixels(file_store, drawn[1.0]), image_pixels(file_store, own), "bfloat16"
    )


async def test_a_lora_that_cannot_be_found_or_fits_nothing_is_refused_at_start(
    tmp_path, diffusion_settings, file_store
):
    (tmp_path / "empty").mkdir()
    stray = tmp_path / "stray"
    stray.mkdir()
    from safetensors.torch import save_file

    save_file(
        {"nothing.lora_A.weight": torch.zeros(4, 4)}, stray / "pytorch_lora_weights.safetensors"
    )
    cases = {
        str(tmp_path / "missing"): (FileNotFoundError, "does not exist"),
        str(tmp_path / "empty"): (FileNotFoundError, "could not load LoRA"),
        str(stray): (ValueError, "LoRA .* (does not fit|matched no layer)"),
    }
    for lora, (error, message) in cases.items():
        settings = diffusion_settings.model_copy(update={"lora": lora})
        with pytest.raises(error, match=message):
            async with loaded_renderer(settings, file_store):
                pass
