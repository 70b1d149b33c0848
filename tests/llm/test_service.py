"""The LLM service over real gRPC: health, WriteStoryboard, and INVALID_ARGUMENT details."""

from __future__ import annotations

import grpc
import pytest
from storyreel_llm.backends.local import LocalBackend
from storyreel_llm.service import LlmService
from support import health_status

from storyreel.llm.v1 import llm_pb2, llm_pb2_grpc
from storyreel.serving import create_server, start_and_load

SERVICE_NAME = "storyreel.llm.v1.LlmService"


@pytest.fixture(scope="session")
async def story_server(smollm2, settings_for):
    """A real LlmService on a free port, serving the session's SmolLM2."""
    running = await start_and_load(settings_for(), LlmService(settings_for(), backend=smollm2))
    yield running
    await running.stop(0)


async def write(port: int, **fields) -> llm_pb2.WriteStoryboardResponse:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = llm_pb2_grpc.LlmServiceStub(channel)
        # A hang guard, not a speed requirement.
        return await stub.WriteStoryboard(llm_pb2.WriteStoryboardRequest(**fields), timeout=600)


@pytest.mark.model
async def test_health_is_not_serving_until_the_model_has_loaded(settings_for):
    settings = settings_for()
    backend = LocalBackend(settings)  # a fresh model, so load() really loads it
    running = await create_server(settings, LlmService(settings, backend=backend))
    address = f"127.0.0.1:{running.port}"
    try:
        assert await health_status(address) == "NOT_SERVING"
        assert await health_status(address, SERVICE_NAME) == "NOT_SERVING"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await write(running.port, prompt="a fox", scene_count=1)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "loading" in caught.value.details()

        await running.service.load()
        await running.set_serving(True)

        assert backend.loaded
        assert await health_status(address) == "SERVING"
        assert await health_status(address, SERVICE_NAME) == "SERVING"
    finally:
        await running.stop(0)
    assert not backend.loaded  # stop() released the model


async def test_invalid_request_is_rejected_even_while_the_model_loads(settings_for):
    """No model is loaded here: validation comes before the readiness check."""
    settings = settings_for()
    running = await create_server(settings, LlmService(settings, backend=LocalBackend(settings)))
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await write(running.port, prompt="", scene_count=1)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await running.stop(0)


@pytest.mark.model
async def test_write_storyboard_returns_the_requested_number_of_scenes(story_server):
    response = await write(
        story_server.port,
        prompt="A little owl is afraid of the dark",
        scene_count=2,
        style="storybook",
        seed=2024,
        job_id="job-llm-test",
    )
    storyboard = response.storyboard
    assert [s.index for s in storyboard.scenes] == [1, 2]
    assert storyboard.title
    assert all(c.name and c.appearance for c in storyboard.characters)
    names = {c.name for c in storyboard.characters}
    looks = {c.name: c.appearance for c in storyboard.characters}
    for scene in storyboard.scenes:
        assert scene.narration
        assert scene.image_prompt.startswith("children's storybook illustration")
        assert set(scene.characters) <= names
        assert all(looks[name] in scene.image_prompt for name in scene.characters)
    assert storyboard.style == "storybook"


@pytest.mark.model
@pytest.mark.parametrize(
    ("fields", "details"),
    [
        ({"prompt": "", "scene_count": 3}, "prompt must not be empty"),
        ({"prompt": "a fox", "scene_count": 0}, "scene_count must be between 1 and 24 (got 0)"),
        ({"prompt": "a fox", "scene_count": 25}, "scene_count must be between 1 and 24 (got 25)"),
        (
            {"prompt": "x" * 2001, "scene_count": 3},
            "prompt must be at most 2000 characters (got 2001)",
        ),
        (
            {"prompt": "a fox", "scene_count": 3, "style": "s" * 201},
            "style must be at most 200 characters (got 201)",
        ),
    ],
    ids=["empty-prompt", "scene-count-0", "scene-count-25", "prompt-2001-chars", "style-201"],
)
async def test_bad_request_gets_invalid_argument_with_a_helpful_message(
    story_server, fields, details
):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await write(story_server.port, **fields)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == details
