"""The shared service bootstrap: error mapping, health, JSON logs and SIGTERM drain."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from support import health_status

from storyreel.errors import InvalidInput, Overloaded
from storyreel.serving import Service, create_server, start_and_load
from storyreel.settings import ServiceSettings
from storyreel.story.v1 import story_pb2, story_pb2_grpc


class RaisingStoryServicer(story_pb2_grpc.StoryServiceServicer):
    """Raises whatever the prompt names, to exercise the error interceptor."""

    async def WriteStoryboard(self, request, context):
        if request.prompt == "invalid":
            raise InvalidInput("prompt is invalid because the test says so")
        if request.prompt == "overloaded":
            raise Overloaded("queue is full")
        raise RuntimeError("secret internal detail")


class RaisingService(Service):
    service_names = ("storyreel.story.v1.StoryService",)

    def add_to_server(self, server):
        story_pb2_grpc.add_StoryServiceServicer_to_server(RaisingStoryServicer(), server)


@pytest.fixture
async def raising_server():
    running = await start_and_load(ServiceSettings(port=0), RaisingService())
    yield f"127.0.0.1:{running.port}"
    await running.stop(0)


@pytest.mark.parametrize(
    ("prompt", "code", "detail"),
    [
        ("invalid", grpc.StatusCode.INVALID_ARGUMENT, "prompt is invalid because the test says so"),
        ("overloaded", grpc.StatusCode.RESOURCE_EXHAUSTED, "queue is full"),
    ],
)
async def test_domain_errors_map_to_status_codes(raising_server, prompt, code, detail):
    async with grpc.aio.insecure_channel(raising_server) as channel:
        stub = story_pb2_grpc.StoryServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.WriteStoryboard(story_pb2.WriteStoryboardRequest(prompt=prompt))
    assert caught.value.code() == code
    assert caught.value.details() == detail


async def test_unexpected_errors_are_internal_without_details(raising_server):
    async with grpc.aio.insecure_channel(raising_server) as channel:
        stub = story_pb2_grpc.StoryServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.WriteStoryboard(story_pb2.WriteStoryboardRequest(prompt="crash"))
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "secret internal detail" not in caught.value.details()
    assert "Traceback" not in caught.value.details()
    assert "ref" in caught.value.details()


async def test_health_is_not_serving_until_loaded():
    service = RaisingService()
    running = await create_server(ServiceSettings(port=0), service)
    try:
        address = f"127.0.0.1:{running.port}"
        assert await health_status(address) == "NOT_SERVING"
        assert await health_status(address, "storyreel.story.v1.StoryService") == "NOT_SERVING"
        await running.set_serving(True)
        assert await health_status(address) == "SERVING"
    finally:
        await running.stop(0)


def test_service_process_logs_json_and_drains_on_sigterm(tmp_path: Path):
    port_file = tmp_path / "gateway.port"
    env = dict(
        os.environ,
        STORYREEL_GATEWAY_PORT="0",
        STORYREEL_GATEWAY_PORT_FILE=str(port_file),
        STORYREEL_STORAGE_URL=(tmp_path / "artifacts").as_uri(),
    )
    log_path = tmp_path / "gateway.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "storyreel_gateway"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "gateway did not bind"
            time.sleep(0.05)
        address = f"127.0.0.1:{port_file.read_text()}"
        with grpc.insecure_channel(address) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    messages = [r["msg"] for r in records]
    assert "listening" in messages and "draining" in messages and "stopped" in messages
    assert all(r["service"] == "gateway" and "ts" in r and "level" in r for r in records)
