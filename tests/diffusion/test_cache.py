"""The content-addressed cache and micro-batching, on a renderer that has both on."""

from __future__ import annotations

import uuid

from storyreel_diffusion.renderer import Scene, SceneRenderer
from support import batch_close, image_pixels, new_job


def fresh(prompt: str) -> str:
    """A prompt no other test renders, so the first render of it is a cache miss."""
    return f"{prompt} {uuid.uuid4().hex[:8]}"


async def render_all(renderer: SceneRenderer, job_id: str, scenes, **options):
    return [image async for image in renderer.render(job_id, scenes, **options)]


async def test_cache_hit_returns_the_stored_image_without_calling_the_pipeline(
    cached_renderer, shared_store, record_calls
):
    scenes = [Scene(1, fresh("a lighthouse"), 3), Scene(2, fresh("a whale"), 4)]
    recorder = record_calls(cached_renderer)
    hits_before = cached_renderer.metrics.value("storyreel_render_cache_hits_total")

    first = await render_all(cached_renderer, new_job(), scenes)
    assert recorder.batch_sizes == [2]
    assert [image.cached for image in first] == [False, False]

    second_job = new_job()
    second = await render_all(cached_renderer, second_job, scenes)
    assert recorder.batch_sizes == [2]  # no further pipeline call
    assert [image.cached for image in second] == [True, True]
    assert [image.uri for image in second] == [
        shared_store.uri_for(f"jobs/{second_job}/images/scene-00{n}.png") for n in (1, 2)
    ]
    assert [shared_store.get_bytes(i.uri) for i in second] == [
        shared_store.get_bytes(i.uri) for i in first
    ]
    assert [(i.seed, i.content_key) for i in second] == [(i.seed, i.content_key) for i in first]
    assert cached_renderer.metrics.value("storyreel_render_cache_hits_total") == hits_before + 2


async def test_images_are_cached_under_their_content_key(cached_renderer, shared_store):
    [image] = await render_all(cached_renderer, new_job(), [Scene(1, fresh("a fox"), 1)])
    assert len(image.content_key) == 64
    cached = shared_store.uri_for(f"cache/{image.content_key}.png")
    assert shared_store.get_bytes(cached) == shared_store.get_bytes(image.uri)


async def test_regenerating_one_scene_of_a_job_is_served_from_the_cache(
    cached_renderer, shared_store, record_calls
):
    job = new_job()
    scenes = [Scene(i, fresh(f"scene {i}"), i) for i in (1, 2, 3)]
    whole = await render_all(cached_renderer, job, scenes)
    recorder = record_calls(cached_renderer)
    shared_store.delete(whole[1].uri)  # e.g. a job resumed after losing an image
    [again] = await render_all(cached_renderer, job, [scenes[1]])
    assert recorder.calls == []
    assert again.cached and again.uri == whole[1].uri
    assert shared_store.exists(again.uri)


async def test_a_change_that_affects_the_pixels_misses_the_cache(cached_renderer, record_calls):
    scene = [Scene(1, fresh("a storm"), 5)]
    await render_all(cached_renderer, new_job(), scene)
    recorder = record_calls(cached_renderer)
    [other] = await render_all(cached_renderer, new_job(), scene, steps=3)
    [negated] = await render_all(cached_renderer, new_job(), scene, negative_prompt="rain")
    assert recorder.batch_sizes == [1, 1]
    assert not other.cached and not negated.cached


async def test_hits_and_misses_of_one_request_come_back_in_request_order(
    cached_renderer, record_calls
):
    cached_scene = Scene(2, fresh("a reef"), 2)
    await render_all(cached_renderer, new_job(), [cached_scene])
    recorder = record_calls(cached_renderer)
    scenes = [
        Scene(1, fresh("a bay"), 1),
        cached_scene,
        Scene(3, fresh("a cove"), 3),
    ]
    images = await render_all(cached_renderer, new_job(), scenes)
    assert [(i.index, i.cached) for i in images] == [(1, False), (2, True), (3, False)]
    assert recorder.batch_sizes == [2]  # the two misses drawn together


async def test_scenes_are_drawn_in_batches_of_at_most_max_batch_size(cached_renderer, record_calls):
    assert cached_renderer.settings.max_batch_size == 3
    recorder = record_calls(cached_renderer)
    scenes = [Scene(i, fresh(f"shot {i}"), i) for i in range(1, 5)]
    images = await render_all(cached_renderer, new_job(), scenes)
    assert recorder.batch_sizes == [3, 1]
    assert [image.index for image in images] == [1, 2, 3, 4]


async def test_a_batched_render_gives_the_images_of_rendering_one_by_one(
    cached_renderer, renderer, shared_store, record_calls
):
    scenes = [Scene(i, fresh(f"harbour {i}"), 10 + i) for i in (1, 2, 3)]
    batched_calls, single_calls = record_calls(cached_renderer), record_calls(renderer)
    batched = await render_all(cached_renderer, new_job(), scenes)
    singles = await render_all(renderer, new_job(), scenes)
    assert (batched_calls.batch_sizes, single_calls.batch_sizes) == ([3], [1, 1, 1])
    for one, other in zip(batched, singles, strict=True):
        a, b = image_pixels(shared_store, one.uri), image_pixels(shared_store, other.uri)
        assert a.shape == b.shape
        assert batch_close(a, b, cached_renderer.facts.dtype)
        assert one.content_key == other.content_key and one.seed == other.seed
