"""Serving behaviour over real gRPC: the bounded queue, cancellation, out of memory, metrics."""

from __future__ import annotations

import asyncio
import urllib.request
import uuid

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from storyreel_diffusion.renderer import Scene
from support import (
    batch_close,
    free_port,
    image_pixels,
    loaded_renderer,
    new_job,
    rendered_images,
    stored_uris,
)

from storyreel.diffusion.v1 import diffusion_pb2

# Only stops a hung test from hanging the suite; nothing is timed (rendered_images has its own).
HANG_GUARD_S = 120
LONG_STEPS = 150


def request(scenes: int = 1, steps: int = 1, **fields) -> diffusion_pb2.RenderScenesRequest:
    """A request for ``scenes`` scenes no other test renders (so never a cache hit)."""
    salt = uuid.uuid4().hex[:8]
    return diffusion_pb2.RenderScenesRequest(
        job_id=fields.pop("job_id", new_job()),
        scenes=[
            diffusion_pb2.Scene(index=i, prompt=f"scene {i} {salt}", seed=i)
            for i in range(1, scenes + 1)
        ],
        width=64,
        height=64,
        steps=steps,
        **fields,
    )


@pytest.fixture(scope="module")
async def server(start_server):
    """A render server admitting one request at a time, with cache and metrics on."""
    return await start_server(
        max_queue=1, max_batch_size=4, cache_enabled=True, metrics_port=free_port()
    )


@pytest.fixture(scope="module")
def service(server):
    return server.service


def metric(service, name: str, **labels) -> float:
    return service.renderer.metrics.value(name, **labels)


async def eventually(condition, what: str) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    try:
        await asyncio.wait_for(poll(), HANG_GUARD_S)
    except TimeoutError:
        pytest.fail(f"never happened: {what}")


async def test_full_queue_refuses_at_once_but_cache_hits_still_pass(service, stub, shared_store):
    cached = request()
    await rendered_images(stub, cached)
    slow = stub.RenderScenes(request(scenes=4, steps=LONG_STEPS), timeout=HANG_GUARD_S)
    waiting = asyncio.ensure_future(slow.read())
    try:
        await eventually(lambda: metric(service, "storyreel_render_queue_depth") == 1, "admitted")
        refused = request()
        before = stored_uris(shared_store)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await rendered_images(stub, refused)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "render queue is full (1 requests)" in raised.value.details()
        assert stored_uris(shared_store) == before
        assert metric(service, "storyreel_render_rejected_total", reason="queue_full") >= 1

        # A request the cache can answer needs no place in the queue.
        again = diffusion_pb2.RenderScenesRequest()
        again.CopyFrom(cached)
        again.job_id = new_job()
        [image] = await rendered_images(stub, again)
        assert image.cached
        assert not waiting.done()  # the slow render was still going all along
    finally:
        slow.cancel()
        waiting.cancel()
    await eventually(lambda: metric(service, "storyreel_render_queue_depth") == 0, "released")


async def test_cancelled_render_stops_at_the_next_denoising_step(service, stub, shared_store):
    steps = "storyreel_render_denoising_steps_total"
    before = metric(service, steps)
    slow_request = request(scenes=4, steps=LONG_STEPS)
    call = stub.RenderScenes(slow_request, timeout=HANG_GUARD_S)
    reading = asyncio.ensure_future(call.read())
    await eventually(lambda: metric(service, steps) >= before + 3, "drawing started")
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    await eventually(lambda: metric(service, "storyreel_render_queue_depth") == 0, "released")

    # The render thread takes batches in order: once this one-step render is back,
    # the cancelled batch has stopped.
    await rendered_images(stub, request(steps=1))
    ran = metric(service, steps) - before - 1
    assert 3 <= ran < LONG_STEPS  # one batch of 4 scenes would have run all 150
    assert metric(service, "storyreel_render_cancelled_total") >= 1
    assert not list(shared_store.list(f"jobs/{slow_request.job_id}/"))


@pytest.mark.parametrize(
    "error",
    [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), MemoryError()],
    ids=["gpu", "cpu"],
)
async def test_out_of_memory_is_resource_exhausted_and_the_service_keeps_serving(
    service, stub, shared_store, record_calls, error
):
    recorder = record_calls(service.renderer)
    recorder.fail_with = error
    failed = request(scenes=2)
    rejected_before = metric(service, "storyreel_render_rejected_total", reason="out_of_memory")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await rendered_images(stub, failed)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Halved down to one image, which did not fit either.
    assert "out of cpu memory drawing 1 image(s) at 64x64" in raised.value.details()
    assert not list(shared_store.list(f"jobs/{failed.job_id}/"))
    assert metric(service, "storyreel_render_rejected_total", reason="out_of_memory") == (
        rejected_before + 1
    )
    assert metric(service, "storyreel_render_queue_depth") == 0

    recorder.fail_with = None
    images = await rendered_images(stub, request(scenes=2))
    assert [image.index for image in images] == [1, 2]


async def test_a_batch_too_big_for_memory_is_drawn_in_halves_and_later_batches_fit(
    diffusion_settings, shared_store, record_calls
):
    update = {"max_batch_size": 4, "max_scenes": 8, "cache_enabled": False}
    settings = diffusion_settings.model_copy(update=update)
    async with loaded_renderer(settings, shared_store) as renderer:
        scenes = [Scene(i, f"a lantern, view {i}", 40 + i) for i in range(1, 6)]
        [*expected] = [image async for image in renderer.render(new_job(), scenes)]
        recorder = record_calls(renderer)
        recorder.fail_with, recorder.fail_above = MemoryError(), 2
        first = [image async for image in renderer.render(new_job(), scenes)]
        # 4 failed, its halves fitted; the last scene alone fitted.
        assert recorder.batch_sizes == [4, 2, 2, 1]
        again = [image async for image in renderer.render(new_job(), scenes)]
        assert recorder.batch_sizes[4:] == [2, 2, 1]  # no batch above the size that fitted
        dtype = renderer.facts.dtype
    for images in (first, again):
        assert [(i.index, i.seed, i.content_key) for i in images] == [
            (i.index, i.seed, i.content_key) for i in expected
        ]
        for image, reference in zip(images, expected, strict=True):
            assert batch_close(
                image_pixels(shared_store, image), image_pixels(shared_store, reference), dtype
            )


def scrape(service) -> dict[tuple[str, tuple], float]:
    url = f"http://127.0.0.1:{service.settings.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_endpoint_counts_images_seconds_and_cache_hits(service, stub):
    images = ("storyreel_render_images_total", (("kind", "scene"),))
    seconds = ("storyreel_render_image_seconds_count", ())
    hits = ("storyreel_render_cache_hits_total", ())
    misses = ("storyreel_render_cache_misses_total", ())
    depth = ("storyreel_render_queue_depth", ())
    before = await asyncio.to_thread(scrape, service)
    req = request(scenes=2)
    await rendered_images(stub, req)
    drawn = await asyncio.to_thread(scrape, service)
    assert drawn[images] == before[images] + 2
    assert drawn[seconds] == before[seconds] + 2
    assert drawn[misses] == before[misses] + 2
    assert drawn[hits] == before[hits]
    assert drawn[depth] == 0

    req.job_id = new_job()
    await rendered_images(stub, req)
    served = await asyncio.to_thread(scrape, service)
    assert served[hits] == drawn[hits] + 2
    assert served[images] == drawn[images]
