"""The shared service bootstrap: error mapping, health, JSON logs and SIGTERM drain."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import health_status, reflection_answers

from storyreel.errors import InvalidInput, Overloaded
from storyreel.llm.v1 import llm_pb2, llm_pb2_grpc
from storyreel.logs import JsonFormatter, job_id_var
from storyreel.serving import Service, create_server, serve, start_and_load
from storyreel.settings import ServiceSettings
from storyreel.types.v1 import types_pb2


class RaisingLlmServicer(llm_pb2_grpc.LlmServiceServicer):
    """Raises whatever the prompt names, to exercise the error interceptor."""

    async def WriteStoryboard(self, request, context):
        if request.prompt == "invalid":
            raise InvalidInput("prompt is invalid because the test says so")
        if request.prompt == "overloaded":
            raise Overloaded("queue is full")
        raise RuntimeError("secret internal detail")


class RaisingService(Service):
    service_names = ("storyreel.llm.v1.LlmService",)

    def add_to_server(self, server):
        llm_pb2_grpc.add_LlmServiceServicer_to_server(RaisingLlmServicer(), server)


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
        stub = llm_pb2_grpc.LlmServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.WriteStoryboard(llm_pb2.WriteStoryboardRequest(prompt=prompt))
    assert caught.value.code() == code
    assert caught.value.details() == detail


async def test_unexpected_errors_are_internal_without_details(raising_server):
    async with grpc.aio.insecure_channel(raising_server) as channel:
        stub = llm_pb2_grpc.LlmServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.WriteStoryboard(llm_pb2.WriteStoryboardRequest(prompt="crash"))
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
        assert await health_status(address, "storyreel.llm.v1.LlmService") == "NOT_SERVING"
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


# --- Standard gRPC behaviour at the edges (issue 11, findings 5 and 6) ---------------


class EchoingLlmServicer(llm_pb2_grpc.LlmServiceServicer):
    """Answers with what it was sent, records the job id the logs carry, or fails big."""

    def __init__(self) -> None:
        self.logged_job_ids: list[str | None] = []

    async def WriteStoryboard(self, request, context):
        self.logged_job_ids.append(job_id_var.get())
        if request.prompt == "huge error":
            raise InvalidInput("bad value " + "v" * (1024 * 1024) + " end of message")
        if request.prompt == "huge crash":
            raise OSError(36, "File name too long", "n" * (1024 * 1024))
        return llm_pb2.WriteStoryboardResponse(
            storyboard=types_pb2.Storyboard(title=request.prompt)
        )


class EchoingService(Service):
    service_names = ("storyreel.llm.v1.LlmService",)

    def __init__(self) -> None:
        self.servicer = EchoingLlmServicer()

    def add_to_server(self, server):
        llm_pb2_grpc.add_LlmServiceServicer_to_server(self.servicer, server)


@pytest.fixture
async def echoing():
    service = EchoingService()
    running = await start_and_load(ServiceSettings(port=0), service)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    yield channel, service, running
    await channel.close()
    await running.stop(0)


async def test_a_malformed_message_is_invalid_argument(echoing):
    channel, service, _ = echoing
    write = channel.unary_unary("/storyreel.llm.v1.LlmService/WriteStoryboard")
    # Field 1 (prompt) as a length-delimited value that runs past the end of the message.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await write(b"\x0a\xff\xff\xff\x0f" + b"x" * 10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed request" in caught.value.details()
    assert service.servicer.logged_job_ids == []  # the servicer never saw it
    # A good message on the same channel still works.
    good = llm_pb2.WriteStoryboardRequest(prompt="fine").SerializeToString()
    assert llm_pb2.WriteStoryboardResponse.FromString(await write(good)).storyboard.title == (
        "fine"
    )


async def test_error_messages_and_logs_are_bounded(echoing, caplog):
    channel, service, _ = echoing
    stub = llm_pb2_grpc.LlmServiceStub(channel)
    job_id = "j" * (3 * 1024 * 1024)
    with caplog.at_level("INFO", logger="storyreel"):
        errors = {}
        for prompt in ("huge error", "huge crash"):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.WriteStoryboard(
                    llm_pb2.WriteStoryboardRequest(prompt=prompt, job_id=job_id)
                )
            errors[prompt] = caught.value
    assert errors["huge error"].code() == grpc.StatusCode.INVALID_ARGUMENT
    assert errors["huge crash"].code() == grpc.StatusCode.INTERNAL
    assert all(len(error.details()) <= 1100 for error in errors.values())
    # The middle of a long message is cut: its start and its end (often the why) stay.
    assert errors["huge error"].details().startswith("bad value vvv")
    assert errors["huge error"].details().endswith(" end of message")
    # The job id the logs carry is cut too, and so is every log record.
    assert all(len(j) < 200 for j in service.servicer.logged_job_ids)
    formatter = JsonFormatter("test")
    logged = sum(len(formatter.format(record)) for record in caplog.records)
    assert 0 < logged < 100_000


async def test_health_list_and_watch_behave_as_the_standard_service(echoing):
    channel, _, running = echoing
    stub = health_pb2_grpc.HealthStub(channel)
    listed = await stub.List(health_pb2.HealthListRequest())
    assert {name: s.status for name, s in listed.statuses.items()} == {
        "": health_pb2.HealthCheckResponse.SERVING,
        "storyreel.llm.v1.LlmService": health_pb2.HealthCheckResponse.SERVING,
    }
    watch = stub.Watch(health_pb2.HealthCheckRequest(service="storyreel.llm.v1.LlmService"))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    await running.set_serving(False)
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    watch.cancel()
    unknown = stub.Watch(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert (await unknown.read()).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    unknown.cancel()


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_reflection_serves_v1_and_v1alpha(echoing, version):
    channel, _, _ = echoing
    answers = await reflection_answers(
        channel, version, "storyreel.llm.v1.LlmService", "grpc.reflection.v1.ServerReflection"
    )
    services = {s.name for s in answers[0].list_services_response.service}
    assert {
        "storyreel.llm.v1.LlmService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= services
    for answer in answers[1:]:
        files = [
            descriptor_pb2.FileDescriptorProto.FromString(raw)
            for raw in answer.file_descriptor_response.file_descriptor_proto
        ]
        assert files, answer
    v1_file = descriptor_pb2.FileDescriptorProto.FromString(
        answers[2].file_descriptor_response.file_descriptor_proto[0]
    )
    assert v1_file.package == "grpc.reflection.v1"


async def test_binding_a_port_in_use_fails_loudly(echoing, caplog):
    _, _, running = echoing
    taken = ServiceSettings(port=running.port)
    with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{running.port}"):
        await create_server(taken, RaisingService())
    # A service process says so and exits 1 (serve() is what every __main__ runs).
    with caplog.at_level("ERROR", logger="storyreel"):
        assert await serve(taken, RaisingService()) == 1
    assert any("port is in use" in r.getMessage() for r in caplog.records)


async def test_an_idle_connection_is_closed_by_the_server():
    running = await start_and_load(
        ServiceSettings(port=0, max_connection_idle_s=0.2), RaisingService()
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert channel.get_state() == grpc.ChannelConnectivity.READY
            # The server's GOAWAY after max_connection_idle puts the channel back to IDLE.
            await asyncio.wait_for(
                channel.wait_for_state_change(grpc.ChannelConnectivity.READY), 60
            )
            assert channel.get_state() == grpc.ChannelConnectivity.IDLE
    finally:
        await running.stop(0)


def test_every_server_sets_idle_age_and_keepalive_limits(monkeypatch):
    seen = {}
    real_server = grpc.aio.server

    def recording_server(*args, **kwargs):
        seen.update(dict(kwargs.get("options") or ()))
        return real_server(*args, **kwargs)

    monkeypatch.setattr(grpc.aio, "server", recording_server)

    async def start_and_stop():
        running = await create_server(ServiceSettings(port=0), RaisingService())
        await running.stop(0)

    asyncio.run(start_and_stop())
    for option in (
        "grpc.max_connection_idle_ms",
        "grpc.max_connection_age_ms",
        "grpc.keepalive_time_ms",
        "grpc.keepalive_timeout_ms",
    ):
        assert seen.get(option, 0) > 0, option
    assert seen["grpc.so_reuseport"] == 0
