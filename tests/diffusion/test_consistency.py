"""Each character consistency mode on the tiny model, with a tiny IP-Adapter loaded.

Random weights draw noise, not people, so these tests check each mode's
mechanism: what changes, what must not, and what is shared between scenes.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from storyreel_diffusion.planning import derive_seed
from storyreel_diffusion.renderer import CastMember, Scene, SceneRenderer
from support import batch_close, image_pixels, new_job

from storyreel.errors import FailedPrecondition

MIRA = CastMember("Mira", "a girl with red braids", seed=77)
OTTO = CastMember("Otto", "an old grey whale")
SCENES = [
    Scene(1, "Mira on a cliff", 1, ("Mira",)),
    Scene(2, "Mira in a boat", 2, ("Mira",)),
    Scene(3, "the open sea", 3),
]


def with_appearance(scene: Scene) -> Scene:
    """The scene as mode NONE must get it to draw the same prompt the other modes build."""
    if not scene.characters:
        return Scene(scene.index, scene.prompt, scene.seed)
    return Scene(scene.index, f"{scene.prompt}, Mira, {MIRA.appearance}", scene.seed)


@pytest.fixture(scope="module")
async def consistent(diffusion_settings, ip_adapter_settings, shared_store):
    """A renderer with the tiny IP-Adapter, 64 px images in 2 steps, batches of 4, no cache.

    In float32: the distances these tests order are a level or two apart on random tiny
    weights, within bfloat16's rounding (there strength 1 and 2 swapped places).
    """
    settings = diffusion_settings.model_copy(
        update={
            **ip_adapter_settings,
            "dtype": "float32",
            "default_height": 64,
            "default_steps": 2,
            "max_batch_size": 4,
        }
    )
    renderer = SceneRenderer(settings, shared_store)
    await renderer.load()
    yield renderer
    await renderer.close()


async def render(renderer, scenes=SCENES, characters=(MIRA,), **options):
    job = new_job()
    return [
        image
        async for image in renderer.render(job, scenes, characters=list(characters), **options)
    ]


def same_image(store, a, b, dtype: str) -> bool:
    """Equal within the batch tolerance: batches of other sizes round a few pixels apart."""
    return batch_close(image_pixels(store, a), image_pixels(store, b), dtype)


def distance(store, a, b) -> float:
    """Mean absolute difference in 8-bit levels."""
    return float(np.abs(image_pixels(store, a) - image_pixels(store, b)).mean())


async def test_seed_lock_draws_a_characters_scenes_from_one_seed(consistent, shared_store):
    # Mira's scenes have no seed of their own (0): the lock gives them hers.
    unseeded = [Scene(s.index, s.prompt, 0, s.characters) if s.characters else s for s in SCENES]
    locked = await render(consistent, unseeded, consistency="seed_lock")
    plain = await render(consistent, consistency="none")
    assert [image.seed for image in locked] == [77, 77, 3]
    own = await render(consistent, consistency="seed_lock")
    assert [image.seed for image in own] == [1, 2, 3]  # a scene's own seed beats the lock
    assert [image.seed for image in plain] == [1, 2, 3]
    # Same starting noise: Mira's two scenes come out far closer to each other.
    assert distance(shared_store, *locked[:2]) < distance(shared_store, *plain[:2]) / 4
    # The scene without characters is drawn as in mode NONE.
    assert same_image(shared_store, locked[2], plain[2], consistent.facts.dtype)


async def test_consistent_self_attention_changes_only_scenes_with_characters(
    consistent, shared_store
):
    baseline = await render(consistent, [with_appearance(s) for s in SCENES], consistency="none")
    shared = await render(consistent, consistency="consistent_self_attention")
    assert [image.seed for image in shared] == [1, 2, 3]  # scenes keep their own seeds
    for with_identity, without in zip(shared[:2], baseline[:2], strict=True):
        assert distance(shared_store, with_identity, without) > 0.1
    assert same_image(shared_store, shared[2], baseline[2], consistent.facts.dtype)
    assert consistent.metrics.value("storyreel_render_images_total", kind="identity") > 0


async def test_stronger_self_attention_moves_scenes_further(consistent, shared_store):
    baseline = await render(consistent, [with_appearance(SCENES[0])], consistency="none")
    moved = []
    for strength in (0.25, 1.0, 2.0):
        [image] = await render(
            consistent,
            [SCENES[0]],
            consistency="consistent_self_attention",
            consistency_strength=strength,
        )
        moved.append(distance(shared_store, image, baseline[0]))
    assert moved == sorted(moved) and moved[0] > 0


async def test_identity_images_are_the_same_whatever_the_batch(consistent, shared_store):
    together = await render(consistent, SCENES[:2], consistency="consistent_self_attention")
    alone = await render(consistent, SCENES[1:2], consistency="consistent_self_attention")
    assert same_image(shared_store, together[1], alone[0], consistent.facts.dtype)


async def test_reference_images_condition_scenes_on_stored_portraits(consistent, shared_store):
    baseline = await render(consistent, [with_appearance(s) for s in SCENES], consistency="none")
    referenced = await render(consistent, consistency="reference_images")
    [portrait] = referenced[0].reference_uris
    assert portrait.endswith("/characters/01-mira.png")
    assert referenced[1].reference_uris == (portrait,) and referenced[2].reference_uris == ()
    assert Image.open(io.BytesIO(shared_store.get_bytes(portrait))).size == (64, 64)
    for conditioned, plain in zip(referenced[:2], baseline[:2], strict=True):
        assert distance(shared_store, conditioned, plain) > 1
    assert same_image(shared_store, referenced[2], baseline[2], consistent.facts.dtype)


async def test_a_different_portrait_changes_the_scene_it_conditions(consistent, shared_store):
    scene = [SCENES[0]]
    first = await render(consistent, scene, consistency="reference_images")
    other_look = CastMember("Mira", MIRA.appearance, seed=78)  # same prompts, another portrait
    second = await render(consistent, scene, [other_look], consistency="reference_images")
    assert shared_store.get_bytes(first[0].reference_uris[0]) != shared_store.get_bytes(
        second[0].reference_uris[0]
    )
    assert distance(shared_store, first[0], second[0]) > 0.1


async def test_adapter_scale_sets_how_far_references_move_a_scene(consistent, shared_store):
    baseline = await render(consistent, [with_appearance(SCENES[0])], consistency="none")
    moved = []
    for scale in (0.2, 1.0):
        [image] = await render(
            consistent, [SCENES[0]], consistency="reference_images", consistency_strength=scale
        )
        moved.append(distance(shared_store, image, baseline[0]))
    assert moved[0] < moved[1]


async def test_a_scene_with_two_characters_is_conditioned_on_both(consistent, shared_store):
    scene = [Scene(1, "Mira rides Otto", 5, ("Mira", "Otto"))]
    [image] = await render(consistent, scene, (MIRA, OTTO), consistency="reference_images")
    assert [uri.rsplit("/", 1)[1] for uri in image.reference_uris] == [
        "01-mira.png",
        "02-otto.png",
    ]
    # Otto has no seed of his own: his portrait's seed derives from his name.
    assert image.seed == 5
    assert derive_seed(0, "character", "Otto") != 0


async def test_reference_images_need_an_ip_adapter(renderer):
    with pytest.raises(FailedPrecondition, match="IP-Adapter"):
        await render(renderer, consistency="reference_images")
