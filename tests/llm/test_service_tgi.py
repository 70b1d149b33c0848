"""The story service over real gRPC with the TGI backend, against the TGI test double."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import grpc
import pytest
from storyreel_llm.service import StoryService
from support import health_status

from storyreel.serving import start_and_load
from storyreel.story.v1 import story_pb2, story_pb2_grpc


def storyboard_json(scene_count: int) -> str:
    return json.dumps(
        {
            "title": "The Fox",
            "characters": [{"name": "Rin", "appearance": "a red fox"}],
            "scenes": [
                {"narration": "Rin ran.", "image_prompt": "a fox running", "characters": ["Rin"]}
            ]
            * scene_count,
        }
    )


async def write(port: int, **fields) -> story_pb2.WriteStoryboardResponse:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = story_pb2_grpc.StoryServiceStub(channel)
        return await stub.WriteStoryboard(story_pb2.WriteStoryboardRequest(**fields), timeout=60)


async def wait_for_requests(double, count: int) -> None:
    for _ in range(1000):  # a hang guard: the request normally arrives at once
        if len(double.requests) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the TGI double saw {len(double.requests)} requests, not {count}")


async def test_tgi_service_serves_once_tgi_is_healthy(settings_for, tgi_double):
    tgi_double.health_statuses[:] = [503]
    settings = settings_for(backend="tgi", tgi_url=tgi_double.url, tgi_startup_poll_s=0.01)
    running = await start_and_load(settings, StoryService(settings))
    try:
        assert tgi_double.health_checks == 2
        assert await health_status(f"127.0.0.1:{running.port}") == "SERVING"
        tgi_double.answer(storyboard_json(2))
        response = await write(running.port, prompt="a fox", scene_count=2, seed=3)
        assert [s.index for s in response.storyboard.scenes] == [1, 2]
    finally:
        await running.stop(0)


async def test_unusable_model_answers_give_unavailable_with_the_reason(settings_for, tgi_double):
    settings = settings_for(backend="tgi", tgi_url=tgi_double.url, repair_attempts=1)
    running = await start_and_load(settings, StoryService(settings))
    try:
        tgi_double.answer('{"title": "cut off')
        tgi_double.answer('{"title": "cut off again')
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await write(running.port, prompt="a fox", scene_count=1)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no usable storyboard in 2 attempt(s)" in caught.value.details()
    finally:
        await running.stop(0)


async def test_request_beyond_the_waiting_limit_gets_resource_exhausted(settings_for, tgi_double):
    settings = settings_for(backend="tgi", tgi_url=tgi_double.url, max_waiting_requests=0)
    running = await start_and_load(settings, StoryService(settings))
    try:
        tgi_double.gate.clear()  # hold the first generation at the model server
        tgi_double.answer(storyboard_json(1))
        first = asyncio.create_task(write(running.port, prompt="a fox", scene_count=1))
        await wait_for_requests(tgi_double, 1)

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await write(running.port, prompt="a cat", scene_count=1)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        tgi_double.gate.set()
        assert len((await first).storyboard.scenes) == 1
        assert len(tgi_double.requests) == 1  # the rejected request never reached the model
    finally:
        await running.stop(0)


def test_tgi_backend_and_service_import_without_torch_or_transformers():
    code = (
        "import sys\n"
        "import storyreel_llm.backends.tgi, storyreel_llm.service, storyreel_llm.__main__\n"
        "heavy = [m for m in ('torch', 'transformers', 'outlines') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
