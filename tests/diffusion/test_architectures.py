"""Transformer pipelines (SD3, FLUX.1 schnell and dev, PixArt-Σ) through the render service.

Each tiny checkpoint is built from configs by the code `python -m storyreel_diffusion.tiny
--family ...` runs, saved, and loaded through the service's own ``from_pretrained`` path.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from storyreel_diffusion.models import SCHEDULERS
from storyreel_diffusion.renderer import CastMember, Scene, SceneRenderer
from storyreel_diffusion.tiny import build_tiny_pipeline, main
from support import (
    batch_close,
    image_pixels,
    loaded_renderer,
    new_job,
    rendered_images,
    stored_uris,
)

from storyreel.channels import open_channel
from storyreel.diffusion.v1 import diffusion_pb2, diffusion_pb2_grpc
from storyreel.errors import FailedPrecondition, InvalidInput
from storyreel.types.v1 import types_pb2

#: family -> (pipeline class, flow-matching, takes a negative prompt, native side)
FAMILIES = {
    "sd3": ("StableDiffusion3Pipeline", True, True, 256),
    "flux": ("FluxPipeline", True, False, 1024),
    "flux-dev": ("FluxPipeline", True, False, 1024),
    "pixart": ("PixArtSigmaPipeline", False, True, 256),
}
UNET_ONLY = ("consistent_self_attention", "reference_images")


@pytest.fixture(scope="session")
def tiny_transformers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every tiny transformer checkpoint, built once (pixart by the command line)."""
    root = tmp_path_factory.mktemp("transformers")
    built = {f: build_tiny_pipeline(root / f, family=f) for f in FAMILIES if f != "pixart"}
    assert main([str(root / "pixart"), "--family", "pixart"]) == 0
    return {**built, "pixart": root / "pixart"}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def family_settings(family, tiny_transformers, diffusion_settings):
    """The test settings (64x64, 2 steps, no cache) on ``family``'s tiny checkpoint, with
    batches of two, in the default dtype (bfloat16 on a CPU with native bf16)."""
    return diffusion_settings.model_copy(
        update={
            "model": str(tiny_transformers[family]),
            "default_width": 64,
            "default_height": 64,
            "max_batch_size": 2,
            "default_guidance": 4.0,
        }
    )


@pytest.fixture(scope="module")
async def arch_renderer(family_settings, shared_store):
    async with loaded_renderer(family_settings, shared_store) as renderer:
        yield renderer


async def render(renderer: SceneRenderer, scenes, **options):
    return [image async for image in renderer.render(new_job(), scenes, **options)]


def test_tiny_checkpoint_saves_the_pipeline_with_a_t5_tokenizer(family, tiny_transformers):
    from transformers import AutoTokenizer

    folder = tiny_transformers[family]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == FAMILIES[family][0]
    t5 = "tokenizer" if family == "pixart" else {"sd3": "tokenizer_3"}.get(family, "tokenizer_2")
    assert index[t5] == ["transformers", "T5Tokenizer"]
    tokenizer = AutoTokenizer.from_pretrained(folder / t5)
    ids = tokenizer("a cat").input_ids
    assert ids[-1] == tokenizer.eos_token_id == 1 and tokenizer.unk_token_id not in ids
    weights = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
    assert weights < 20 * 2**20


async def test_facts_name_the_transformer_and_its_limits(family, arch_renderer):
    pipeline, flow, negative, native = FAMILIES[family]
    facts = arch_renderer.facts
    assert (facts.pipeline, facts.denoiser, facts.flow_matching) == (pipeline, "transformer", flow)
    assert facts.negative_prompt is negative
    # 8-pixel latents in 2x2 patches (FLUX packs them, SD3 and PixArt patch them).
    assert facts.side_multiple == 16
    assert (facts.native_width, facts.native_height) == (native, native)
    assert facts.attention_layers == ()
    assert facts.schedulers == (("default",) if flow else ("default", *SCHEDULERS))
    with pytest.raises(InvalidInput, match="width must be a multiple of 16"):
        await render(arch_renderer, [Scene(1, "a boat", 1)], width=72, height=64)


async def test_scenes_have_the_asked_size_and_the_same_seed_gives_the_same_bytes(
    arch_renderer, shared_store
):
    scenes = [Scene(1, "a lighthouse at dusk", 42), Scene(2, "a whale", 7), Scene(3, "a fox", 9)]
    first = await render(arch_renderer, scenes, width=96, height=64)
    second = await render(arch_renderer, scenes, width=96, height=64)
    assert [(i.index, i.seed, i.cached) for i in first] == [
        (1, 42, False),
        (2, 7, False),
        (3, 9, False),
    ]
    assert [i.seed for i in second] == [42, 7, 9]
    pngs = [shared_store.get_bytes(i.uri) for i in first]
    assert pngs == [shared_store.get_bytes(i.uri) for i in second]
    assert len(set(pngs)) == 3
    assert all(Image.open(io.BytesIO(png)).size == (96, 64) for png in pngs)


async def test_a_batch_of_two_gives_the_images_of_drawing_one_by_one(
    arch_renderer, shared_store, record_calls
):
    recorder = record_calls(arch_renderer)
    steps_before = arch_renderer.metrics.value("storyreel_render_denoising_steps_total")
    scenes = [Scene(i, f"a harbour, view {i}", 30 + i) for i in (1, 2, 3)]
    batched = await render(arch_renderer, scenes, steps=3)
    singles = [(await render(arch_renderer, [scene], steps=3))[0] for scene in scenes]
    assert recorder.batch_sizes == [2, 1, 1, 1, 1]
    # Every call reports its steps (PixArt-Σ through the older per-step callback).
    steps = arch_renderer.metrics.value("storyreel_render_denoising_steps_total") - steps_before
    assert steps == 3 * 5
    for one, other in zip(batched, singles, strict=True):
        a, b = image_pixels(shared_store, one), image_pixels(shared_store, other)
        assert a.shape == b.shape == (64, 64, 3)
        assert batch_close(a, b, arch_renderer.facts.dtype)
        assert (one.content_key, one.seed) == (other.content_key, other.seed)


async def test_none_and_seed_lock_work_and_unet_modes_are_refused(
    family, arch_renderer, shared_store
):
    mira = CastMember("Mira", "a girl with red braids", seed=77)
    scenes = [Scene(1, "Mira on a cliff", 0, ("Mira",)), Scene(2, "a storm", 5)]
    [plain, storm] = await render(arch_renderer, scenes, characters=[mira], consistency="none")
    assert (plain.seed, storm.seed) == (0, 5)
    locked = await render(arch_renderer, scenes, characters=[mira], consistency="seed_lock")
    assert [i.seed for i in locked] == [77, 5]
    assert image_pixels(shared_store, locked[0]).shape == (64, 64, 3)
    before = stored_uris(shared_store)
    for mode in UNET_ONLY:
        with pytest.raises(FailedPrecondition) as raised:
            await render(arch_renderer, scenes, characters=[mira], consistency=mode)
        message = raised.value.message
        assert f"consistency {mode} needs a UNet pipeline" in message
        assert f"{FAMILIES[family][0]} has a transformer denoiser" in message
    assert stored_uris(shared_store) == before


async def test_schedulers_and_negative_prompts_follow_the_model(
    family, arch_renderer, shared_store
):
    _, flow, negative, _ = FAMILIES[family]
    scene = [Scene(1, "a castle", 11)]
    [plain] = await render(arch_renderer, scene)
    if flow:
        with pytest.raises(InvalidInput, match="is a flow-matching model") as raised:
            await render(arch_renderer, scene, scheduler="ddim")
        assert raised.value.message.startswith("scheduler must be one of default (")
    else:
        [euler_a] = await render(arch_renderer, scene, scheduler="euler_a")
        assert shared_store.get_bytes(euler_a.uri) != shared_store.get_bytes(plain.uri)
    if negative:
        [negated] = await render(arch_renderer, scene, negative_prompt="fog")
        assert shared_store.get_bytes(negated.uri) != shared_store.get_bytes(plain.uri)
    else:
        with pytest.raises(FailedPrecondition, match="negative_prompt is not used by FluxPipeline"):
            await render(arch_renderer, scene, negative_prompt="fog")


async def test_guidance_reaches_the_model_as_it_takes_it(family, arch_renderer, shared_store):
    # SD3 and PixArt-Σ: classifier-free guidance; FLUX.1 dev: an embedding; schnell: none.
    scene = [Scene(1, "a comet", 8)]
    low, high = [
        image_pixels(shared_store, (await render(arch_renderer, scene, guidance=g))[0])
        for g in (1.5, 6)
    ]
    transformer = arch_renderer.pipeline.transformer
    assert transformer.config.get("guidance_embeds", False) is (family == "flux-dev")
    assert bool(np.any(low != high)) is (family != "flux")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"consistency": "consistent_self_attention"}, "needs a UNet pipeline"),
        ({"consistency": "reference_images"}, "needs a UNet pipeline"),
        ({"ip_adapter": "/no/such/adapter"}, "ip_adapter needs a UNet pipeline"),
        ({"scheduler": "ddim"}, "is a flow-matching model: it runs only its own scheduler"),
    ],
    ids=["self-attention", "reference images", "ip-adapter", "ddim"],
)
async def test_settings_a_transformer_cannot_honour_fail_the_load(
    tiny_transformers, diffusion_settings, file_store, overrides, message
):
    settings = diffusion_settings.model_copy(
        update={"model": str(tiny_transformers["flux"]), **overrides}
    )
    renderer = SceneRenderer(settings, file_store)
    try:
        with pytest.raises(ValueError, match=message) as raised:
            await renderer.load()
        assert "FluxPipeline" in str(raised.value)
        assert not renderer.loaded
    finally:
        await renderer.close()


async def test_grpc_renders_on_flux_and_refuses_unet_modes_as_failed_precondition(
    start_server, tiny_transformers, shared_store
):
    server = await start_server(model=str(tiny_transformers["flux"]), max_batch_size=2)
    scenes = [
        diffusion_pb2.Scene(index=1, prompt="a lighthouse", seed=3),
        diffusion_pb2.Scene(index=2, prompt="a whale", seed=4),
    ]

    def request(**fields):
        fields = {"job_id": new_job(), "width": 128, "height": 64, "steps": 2} | fields
        return diffusion_pb2.RenderScenesRequest(scenes=scenes, **fields)

    async with open_channel(f"127.0.0.1:{server.port}") as channel:
        stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)
        images = await rendered_images(stub, request())
        assert [(i.index, i.seed) for i in images] == [(1, 3), (2, 4)]
        for image in images:
            picture = Image.open(io.BytesIO(shared_store.get_bytes(image.uri)))
            assert picture.size == (128, 64)
        refusals = {
            types_pb2.CONSISTENCY_MODE_CONSISTENT_SELF_ATTENTION: "consistent_self_attention",
            types_pb2.CONSISTENCY_MODE_REFERENCE_IMAGES: "reference_images",
        }
        for mode, name in refusals.items():
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await rendered_images(stub, request(consistency=mode))
            assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert f"consistency {name} needs a UNet pipeline" in raised.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await rendered_images(stub, request(negative_prompt="fog"))
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await rendered_images(stub, request(scheduler="ddim"))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "flow-matching" in raised.value.details()


def test_a_transformer_pipeline_the_service_cannot_drive_is_refused(diffusion_settings):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from storyreel_diffusion.models import describe_architecture

    class AuraFlowPipeline:  # a transformer pipeline with another call signature
        transformer = object()
        vae_scale_factor = 8
        scheduler = FlowMatchEulerDiscreteScheduler()

    with pytest.raises(ValueError, match="AuraFlowPipeline is not a pipeline the diffusion"):
        describe_architecture(AuraFlowPipeline(), diffusion_settings)
