"""RenderService through a real gRPC server on a real port, driven by the generated stub."""

from __future__ import annotations

import io
import uuid

import grpc
import pytest
from PIL import Image
from storyreel_diffusion.service import DiffusionService
from support import health_status, stored_uris

from storyreel.channels import open_channel
from storyreel.render.v1 import render_pb2, render_pb2_grpc
from storyreel.serving import create_server, start_and_load

SERVICE_NAME = "storyreel.render.v1.RenderService"


def new_job() -> str:
    return f"job-{uuid.uuid4().hex[:12]}"


def request(**fields) -> render_pb2.RenderScenesRequest:
    scenes = fields.pop(
        "scenes",
        [
            render_pb2.SceneToRender(index=1, prompt="a lighthouse at dusk", seed=11),
            render_pb2.SceneToRender(index=2, prompt="a whale under the moon", seed=22),
        ],
    )
    fields = {"job_id": new_job(), "width": 64, "height": 64, "steps": 2} | fields
    return render_pb2.RenderScenesRequest(scenes=scenes, **fields)


@pytest.fixture(scope="module")
async def server(diffusion_settings, shared_store):
    running = await start_and_load(
        diffusion_settings, DiffusionService(diffusion_settings, shared_store)
    )
    yield running
    await running.stop(0)


@pytest.fixture
async def stub(server):
    async with open_channel(f"127.0.0.1:{server.port}", retries=False) as channel:
        yield render_pb2_grpc.RenderServiceStub(channel)


async def collect(stub, req) -> list[render_pb2.RenderedImage]:
    return [response.image async for response in stub.RenderScenes(req, timeout=120)]


async def test_health_is_not_serving_until_the_model_is_loaded(diffusion_settings, file_store):
    service = DiffusionService(diffusion_settings, file_store)
    running = await create_server(diffusion_settings, service)
    address = f"127.0.0.1:{running.port}"
    try:
        assert await health_status(address) == "NOT_SERVING"
        assert await health_status(address, SERVICE_NAME) == "NOT_SERVING"
        async with open_channel(address, retries=False) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await collect(render_pb2_grpc.RenderServiceStub(channel), request())
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert stored_uris(file_store) == []

        await service.load()
        await running.set_serving(True)
        assert await health_status(address) == "SERVING"
        assert await health_status(address, SERVICE_NAME) == "SERVING"
    finally:
        await running.stop(0)


async def test_stream_returns_one_stored_image_per_scene(stub, shared_store):
    req = request(width=96, height=64)
    images = await collect(stub, req)
    assert [(image.index, image.seed) for image in images] == [(1, 11), (2, 22)]
    for image in images:
        assert image.uri == shared_store.uri_for(
            f"jobs/{req.job_id}/images/scene-{image.index:03d}.png"
        )
        assert shared_store.exists(image.uri)
        assert Image.open(io.BytesIO(shared_store.get_bytes(image.uri))).size == (96, 64)


async def test_repeated_request_gives_identical_images(stub, shared_store):
    req = request()
    first = [shared_store.get_bytes(image.uri) for image in await collect(stub, req)]
    second = [shared_store.get_bytes(image.uri) for image in await collect(stub, req)]
    assert first == second


async def test_zero_size_and_steps_select_the_service_defaults(
    stub, shared_store, diffusion_settings
):
    [image] = await collect(
        stub,
        request(
            width=0,
            height=0,
            steps=0,
            scenes=[render_pb2.SceneToRender(index=1, prompt="a fox", seed=1)],
        ),
    )
    picture = Image.open(io.BytesIO(shared_store.get_bytes(image.uri)))
    assert picture.size == (diffusion_settings.default_width, diffusion_settings.default_height)


INVALID = {
    "width not a multiple of 8": (dict(width=100), "width must be a multiple of 8"),
    "size above 4096": (dict(height=4104), "between 64 and 4096 pixels"),
    "negative steps": (dict(steps=-1), "steps must be between 1 and 150"),
    "steps above the maximum": (dict(steps=151), "steps must be between 1 and 150"),
    "empty prompt": (
        dict(
            scenes=[
                render_pb2.SceneToRender(index=1, prompt="a cliff", seed=1),
                render_pb2.SceneToRender(index=2, prompt="", seed=2),
            ]
        ),
        "(index 2): prompt must not be empty",
    ),
    "no scenes": (dict(scenes=[]), "scenes must hold 1 to"),
    "bad job id": (dict(job_id="../../etc"), "job_id must be"),
    "guidance above the maximum": (dict(guidance=31.0), "guidance must be above 0 and at most 30"),
}


@pytest.mark.parametrize("case", INVALID.values(), ids=INVALID.keys())
async def test_invalid_request_is_invalid_argument_and_stores_nothing(stub, shared_store, case):
    fields, message = case
    before = stored_uris(shared_store)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(stub, request(**fields))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in raised.value.details()
    assert stored_uris(shared_store) == before
