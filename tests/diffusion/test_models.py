"""Checkpoint families and loading: SDXL picked by itself, the safety checker, load failures."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from storyreel_diffusion.planning import derive_seed
from storyreel_diffusion.renderer import Scene, SceneRenderer
from storyreel_diffusion.tiny import build_tiny_pipeline
from support import loaded_renderer, new_job

from storyreel.errors import InvalidInput


async def render(renderer, scenes, **options):
    job = new_job()
    return [image async for image in renderer.render(job, scenes, **options)]


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sdxl", family="sdxl")


async def test_sdxl_checkpoint_gets_the_sdxl_pipeline_and_64_pixel_multiples(
    tiny_sdxl, diffusion_settings, file_store
):
    settings = diffusion_settings.model_copy(
        update={"model": str(tiny_sdxl), "default_width": 0, "default_height": 0}
    )
    async with loaded_renderer(settings, file_store) as renderer:
        facts = renderer.facts
        assert facts.pipeline == "StableDiffusionXLPipeline"
        assert facts.side_multiple == 64
        assert (facts.native_width, facts.native_height) == (512, 512)
        scene = [Scene(1, "a lighthouse", 1)]
        with pytest.raises(InvalidInput, match="width must be a multiple of 64"):
            await render(renderer, scene, width=96, height=64)
        [image] = await render(renderer, scene, width=128, height=64, steps=1)
        assert Image.open(io.BytesIO(file_store.get_bytes(image.uri))).size == (128, 64)


def add_tiny_safety_checker(pipeline_dir: Path, out_dir: Path, flag_everything: bool) -> Path:
    """Copy of a tiny pipeline with a tiny CLIP safety checker whose thresholds flag every
    image (or none): random weights cannot recognise anything, so the thresholds decide."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir)
    torch.manual_seed(0)
    vision = dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=4,
    )
    text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    checker = StableDiffusionSafetyChecker(
        CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    )
    # A concept counts when cosine(image, concept) - weight > 0; cosines lie in [-1, 1].
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-2.0 if flag_everything else 2.0)
        checker.special_care_embeds_weights.fill_(2.0)
    components = {**pipe.components, "safety_checker": checker}
    components["feature_extractor"] = CLIPImageProcessor(size=32, crop_size=32)
    StableDiffusionPipeline(**components).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def flagging_sd(tiny_sd, tmp_path_factory) -> Path:
    return add_tiny_safety_checker(tiny_sd, tmp_path_factory.mktemp("models") / "flags", True)


async def test_flagged_image_is_redrawn_with_new_seeds_then_reported(
    flagging_sd, diffusion_settings, file_store, record_calls
):
    settings = diffusion_settings.model_copy(
        update={
            "model": str(flagging_sd),
            "safety_retries": 2,
            "cache_enabled": True,
            "max_batch_size": 2,
        }
    )
    async with loaded_renderer(settings, file_store) as renderer:
        assert renderer.facts.safety_retries == 2
        recorder = record_calls(renderer)
        scenes = [Scene(1, "a cat", 5), Scene(2, "a dog", 6)]
        images = await render(renderer, scenes, steps=1)
        assert recorder.batch_sizes == [2, 2, 2]  # first attempt and two retries
        assert [i.seed for i in images] == [
            derive_seed(5, "safety", 2),
            derive_seed(6, "safety", 2),
        ]
        assert all(i.safety_flagged and i.safety_retries == 2 for i in images)
        picture = np.asarray(Image.open(io.BytesIO(file_store.get_bytes(images[0].uri))))
        assert picture.max() == 0  # the pipeline blacks flagged images out
        # A cache hit reports the same outcome without drawing again.
        again = await render(renderer, scenes, steps=1)
        assert recorder.batch_sizes == [2, 2, 2]
        assert [(i.cached, i.seed, i.safety_flagged, i.safety_retries) for i in again] == [
            (True, i.seed, True, 2) for i in images
        ]


async def test_safety_checker_can_be_turned_off(flagging_sd, diffusion_settings, file_store):
    settings = diffusion_settings.model_copy(
        update={"model": str(flagging_sd), "safety_checker": False}
    )
    async with loaded_renderer(settings, file_store) as renderer:
        assert renderer.pipeline.safety_checker is None
        assert renderer.facts.safety_retries is None
        [image] = await render(renderer, [Scene(1, "a cat", 5)], steps=1)
        assert (image.seed, image.safety_flagged, image.safety_retries) == (5, False, 0)


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"scheduler": "magic"}, ValueError, "scheduler 'magic' is not one of"),
        ({"attention_layers": ["nowhere"]}, ValueError, "match no self-attention layer"),
        ({"ip_adapter": "/no/such/adapter"}, FileNotFoundError, "IP-Adapter weights"),
    ],
    ids=["unknown scheduler", "attention layers", "missing IP-Adapter"],
)
async def test_bad_model_settings_fail_the_load(
    diffusion_settings, file_store, overrides, error, message
):
    settings = diffusion_settings.model_copy(update=overrides)
    renderer = SceneRenderer(settings, file_store)
    try:
        with pytest.raises(error, match=message):
            await renderer.load()
        assert not renderer.loaded
    finally:
        await renderer.close()
