"""The render core on its own: determinism, sizes, defaults and input checks."""

from __future__ import annotations

import asyncio
import io

import pytest
from PIL import Image
from storyreel_diffusion.planning import derive_seed
from storyreel_diffusion.renderer import (
    Scene,
    SceneImage,
    SceneRenderer,
    image_key,
)
from storyreel_diffusion.settings import DiffusionSettings
from support import new_job, stored_uris

from storyreel.errors import InvalidInput, NotReady
from storyreel.storage import ArtifactStore


async def render_all(renderer: SceneRenderer, job_id: str, scenes, **options) -> list[SceneImage]:
    return [image async for image in renderer.render(job_id, scenes, **options)]


def png(store: ArtifactStore, image: SceneImage) -> bytes:
    return store.get_bytes(image.uri)


async def test_same_request_gives_identical_png_bytes(renderer, shared_store):
    job = new_job()
    scenes = [Scene(1, "a lighthouse at dusk", 42), Scene(2, "a whale", 7)]
    first = [png(shared_store, image) for image in await render_all(renderer, job, scenes, steps=2)]
    second = [
        png(shared_store, image) for image in await render_all(renderer, job, scenes, steps=2)
    ]
    assert first == second
    assert first[0] != first[1]


async def test_png_has_requested_size_and_lands_under_the_job(renderer, shared_store):
    job = new_job()
    [image] = await render_all(
        renderer, job, [Scene(3, "a boat", 1)], width=128, height=72, steps=2
    )
    assert image.uri == shared_store.uri_for(f"jobs/{job}/images/scene-003.png")
    assert image.uri == shared_store.uri_for(image_key(job, 3))
    picture = Image.open(io.BytesIO(png(shared_store, image)))
    assert picture.format == "PNG"
    assert picture.size == (128, 72)


@pytest.mark.parametrize(
    "scenes",
    [
        [Scene(1, "a forest", 1), Scene(2, "a forest", 2)],
        [Scene(1, "a red fox in snow", 9), Scene(2, "a city at night", 9)],
    ],
    ids=["different-seeds", "different-prompts-one-seed"],
)
async def test_a_different_seed_or_prompt_gives_a_different_image(renderer, shared_store, scenes):
    images = await render_all(renderer, new_job(), scenes, steps=2)
    assert png(shared_store, images[0]) != png(shared_store, images[1])


async def test_image_depends_on_its_own_seed_not_on_earlier_scenes(renderer, shared_store):
    alone = await render_all(renderer, new_job(), [Scene(5, "a harbour", 5)], steps=2)
    after_another = await render_all(
        renderer,
        new_job(),
        [Scene(4, "a storm", 4), Scene(5, "a harbour", 5)],
        steps=2,
    )
    assert png(shared_store, alone[0]) == png(shared_store, after_another[1])


async def test_images_come_in_scene_order_with_their_seeds(renderer):
    scenes = [Scene(2, "b", 20), Scene(1, "a", 10), Scene(3, "c", 30)]
    images = await render_all(renderer, new_job(), scenes, steps=1)
    assert [(image.index, image.seed) for image in images] == [(2, 20), (1, 10), (3, 30)]


async def test_zero_fields_select_the_configured_defaults(renderer, shared_store):
    settings: DiffusionSettings = renderer.settings
    scene = Scene(1, "a meadow", 3)
    [by_default] = await render_all(renderer, new_job(), [scene])
    [explicit] = await render_all(
        renderer,
        new_job(),
        [scene],
        width=settings.default_width,
        height=settings.default_height,
        steps=settings.default_steps,
        guidance=settings.default_guidance,
    )
    picture = Image.open(io.BytesIO(png(shared_store, by_default)))
    assert picture.size == (settings.default_width, settings.default_height)
    assert png(shared_store, by_default) == png(shared_store, explicit)


async def test_negative_prompt_changes_the_image(renderer, shared_store):
    scene = Scene(1, "a castle", 11)
    [plain] = await render_all(renderer, new_job(), [scene], steps=2)
    [negated] = await render_all(renderer, new_job(), [scene], steps=2, negative_prompt="fog")
    assert png(shared_store, plain) != png(shared_store, negated)


async def test_concurrent_requests_match_sequential_ones(renderer, shared_store):
    # Requests with different step counts share one pipeline (and its
    # scheduler state); drawing one image at a time keeps them apart.
    requests = [
        ([Scene(1, "a desert", 1), Scene(2, "a dune", 2)], 2),
        ([Scene(1, "an island", 3), Scene(2, "a reef", 4)], 3),
    ]
    sequential = [
        [png(shared_store, i) for i in await render_all(renderer, new_job(), s, steps=n)]
        for s, n in requests
    ]
    together = await asyncio.gather(
        *(render_all(renderer, new_job(), s, steps=n) for s, n in requests)
    )
    assert [[png(shared_store, i) for i in images] for images in together] == sequential


async def test_job_seed_renders_what_the_derived_scene_seeds_render(renderer, shared_store):
    scenes = [Scene(1, "a bay", 0), Scene(2, "a pier", 0)]
    by_job_seed = await render_all(renderer, new_job(), scenes, job_seed=99, steps=1)
    derived = [Scene(s.index, s.prompt, derive_seed(99, s.index)) for s in scenes]
    by_scene_seeds = await render_all(renderer, new_job(), derived, steps=1)
    assert [i.seed for i in by_job_seed] == [s.seed for s in derived]
    assert [png(shared_store, i) for i in by_job_seed] == [
        png(shared_store, i) for i in by_scene_seeds
    ]


async def test_scheduler_is_chosen_per_request(renderer, shared_store):
    scene = [Scene(1, "a comet", 8)]
    [default] = await render_all(renderer, new_job(), scene, steps=3)
    [ddim] = await render_all(renderer, new_job(), scene, steps=3, scheduler="ddim")
    [euler_a] = await render_all(renderer, new_job(), scene, steps=3, scheduler="euler_a")
    # The tiny checkpoint's own scheduler is DDIM: the same pixels under either name.
    assert Image.open(io.BytesIO(png(shared_store, ddim))).tobytes() == (
        Image.open(io.BytesIO(png(shared_store, default))).tobytes()
    )
    assert png(shared_store, euler_a) != png(shared_store, default)
    # The next request without a scheduler is back on the default.
    [again] = await render_all(renderer, new_job(), scene, steps=3)
    assert png(shared_store, again) == png(shared_store, default)


@pytest.mark.parametrize(("aspect", "size"), [("9:16", (64, 112)), ("21:9", (152, 64))])
async def test_aspect_ratio_gives_a_frame_of_that_shape(renderer, shared_store, aspect, size):
    [image] = await render_all(renderer, new_job(), [Scene(1, "a road", 2)], aspect=aspect)
    picture = Image.open(io.BytesIO(png(shared_store, image)))
    # About the area of the 64x80 default, on multiples of 8, at least 64 px a side.
    assert picture.size == size


def _scenes(count: int) -> list[Scene]:
    return [Scene(i, f"scene {i}", i) for i in range(1, count + 1)]


INVALID_REQUESTS = {
    "job id with a slash": (dict(job_id="../etc"), "job_id"),
    "empty job id": (dict(job_id=""), "job_id"),
    "no scenes": (dict(scenes=[]), "scenes must hold 1 to 4 scenes, got 0"),
    "too many scenes": (dict(scenes=_scenes(5)), "scenes must hold 1 to 4 scenes, got 5"),
    "blank prompt": (
        dict(scenes=[Scene(1, "ok", 1), Scene(2, "  ", 2)]),
        "scenes[1] (index 2): prompt must not be empty",
    ),
    "oversized prompt": (dict(scenes=[Scene(1, "x" * 2001, 1)]), "the maximum is 2000"),
    "index 0": (dict(scenes=[Scene(0, "a", 1)]), "index must be 1 or more"),
    "duplicate index": (
        dict(scenes=[Scene(1, "a", 1), Scene(1, "b", 2)]),
        "index 1 appears more than once",
    ),
    "negative seed": (dict(scenes=[Scene(1, "a", -1)]), "seed must be between 0"),
    "width not a multiple of 8": (dict(width=100), "width must be a multiple of 8"),
    "width above the maximum": (dict(width=4104), "between 64 and 4096 pixels"),
    "height below the minimum": (dict(height=56), "height must be a multiple of 8 between 64"),
    "negative height": (dict(height=-64), "height must be"),
    "negative steps": (dict(steps=-1), "steps must be between 1 and 150"),
    "steps above the maximum": (dict(steps=151), "steps must be between 1 and 150"),
    "negative guidance": (dict(guidance=-1.0), "guidance must be above 0 and at most 30"),
    "guidance above the maximum": (dict(guidance=30.5), "guidance must be above 0 and at most 30"),
    "guidance not a number": (dict(guidance=float("nan")), "guidance must be"),
    "oversized negative prompt": (dict(negative_prompt="x" * 2001), "negative_prompt"),
    "unknown consistency mode": (dict(consistency="magic"), "consistency must be one of"),
    "unknown scheduler": (dict(scheduler="magic"), "scheduler must be one of"),
}


@pytest.mark.parametrize("case", INVALID_REQUESTS.values(), ids=INVALID_REQUESTS.keys())
async def test_invalid_request_is_rejected_before_anything_is_stored(renderer, shared_store, case):
    overrides, message = case
    request = dict(job_id=new_job(), scenes=_scenes(2), width=64, height=64, steps=1) | overrides
    job_id, scenes = request.pop("job_id"), request.pop("scenes")
    before = stored_uris(shared_store)
    with pytest.raises(InvalidInput) as raised:
        await render_all(renderer, job_id, scenes, **request)
    assert message in raised.value.message
    assert stored_uris(shared_store) == before


async def test_render_before_load_raises_not_ready_and_stores_nothing(
    diffusion_settings, file_store
):
    unloaded = SceneRenderer(diffusion_settings, file_store)
    with pytest.raises(NotReady):
        await render_all(unloaded, new_job(), _scenes(1))
    assert stored_uris(file_store) == []


async def test_missing_model_folder_fails_load_with_a_hint(
    diffusion_settings, file_store, tmp_path
):
    settings = diffusion_settings.model_copy(update={"model": str(tmp_path / "no-such-model")})
    unloadable = SceneRenderer(settings, file_store)
    try:
        with pytest.raises(FileNotFoundError, match="make models"):
            await unloadable.load()
        assert not unloadable.loaded
    finally:
        await unloadable.close()
