"""The LLM service over real gRPC with the TGI backend, against the TGI test double."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import grpc
import pytest
from llm.story_doubles import CAST, answers_for
from model_server_doubles import TGITestDouble
from storyreel_llm.service import LlmService
from support import health_status, service_process

from storyreel.llm.v1 import llm_pb2, llm_pb2_grpc
from storyreel.serving import start_and_load


async def write(port: int, **fields) -> llm_pb2.WriteStoryboardResponse:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = llm_pb2_grpc.LlmServiceStub(channel)
        return await stub.WriteStoryboard(llm_pb2.WriteStoryboardRequest(**fields), timeout=60)


@pytest.fixture
async def start_service(settings_for, tgi_double):
    """``await start_service(double=tgi_double, **settings)``: the LLM service on a TGI double,
    started and loaded; (the running server, its settings). All stop after the test."""
    started = []

    async def start(double=None, **overrides):
        url = (double or tgi_double).url
        settings = settings_for(backend="tgi", tgi_url=url, **overrides)
        running = await start_and_load(settings, LlmService(settings))
        started.append(running)
        return running, settings

    yield start
    for running in started:
        await running.stop(0)


async def wait_for_requests(double, count: int) -> None:
    for _ in range(1000):  # a hang guard: the request normally arrives at once
        if len(double.requests) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the TGI double saw {len(double.requests)} requests, not {count}")


async def test_tgi_service_serves_once_tgi_is_healthy(start_service, tgi_double):
    tgi_double.health_statuses[:] = [503]
    running, settings = await start_service(tgi_startup_poll_s=0.01)
    assert tgi_double.health_checks == 2
    assert await health_status(f"127.0.0.1:{running.port}") == "SERVING"
    tgi_double.answer_all(answers_for(2))
    response = await write(running.port, prompt="a fox", scene_count=2, seed=3, style="anime")
    board = response.storyboard
    assert [s.index for s in board.scenes] == [1, 2]
    assert board.title == CAST["title"] and board.logline == CAST["logline"]
    assert [c.name for c in board.characters] == ["Ada", "Moby"]
    first = board.scenes[0]
    assert first.image_prompt.startswith(settings.style_presets["anime"])
    assert CAST["characters"][0]["appearance"] in first.image_prompt
    assert (first.setting, first.camera) == ("on a rocky beach at dawn", "wide shot")
    assert first.action == "Ada rows a small boat toward the whale"
    assert list(first.characters) == ["Ada"]
    assert board.degraded is False


async def test_no_usable_story_gives_unavailable_with_the_reason(start_service, tgi_double):
    running, _ = await start_service(repair_attempts=1)
    tgi_double.answer("")
    tgi_double.answer("   ")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await write(running.port, prompt="a fox", scene_count=1)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "wrote no usable story in 2 attempt(s)" in caught.value.details()


async def test_unusable_extractions_still_give_a_degraded_storyboard(start_service, tgi_double):
    running, _ = await start_service(repair_attempts=0)
    tgi_double.answer("Rin ran up the hill. The moon rose over her.")
    tgi_double.answer('{"title": "cut off')
    tgi_double.answer('{"characters": [], "setting": "cut')
    response = await write(running.port, prompt="a fox and the moon", scene_count=1)
    board = response.storyboard
    assert board.degraded is True
    assert board.title == "A fox and the moon"
    assert board.scenes[0].narration == "Rin ran up the hill. The moon rose over her."
    assert "Rin ran up the hill" in board.scenes[0].image_prompt


async def test_request_beyond_the_waiting_limit_gets_resource_exhausted(start_service, tgi_double):
    running, _ = await start_service(max_waiting_requests=0)
    tgi_double.gate.clear()  # hold the first generation at the model server
    tgi_double.answer_all(answers_for(1))
    first = asyncio.create_task(write(running.port, prompt="a fox", scene_count=1))
    await wait_for_requests(tgi_double, 1)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await write(running.port, prompt="a cat", scene_count=1)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    tgi_double.gate.set()
    assert len((await first).storyboard.scenes) == 1
    assert len(tgi_double.requests) == 3  # the rejected request never reached the model


def test_tgi_and_openai_backends_and_service_import_without_torch_or_transformers():
    code = (
        "import sys\n"
        "import storyreel_llm.backends.tgi, storyreel_llm.backends.openai\n"
        "import storyreel_llm.service, storyreel_llm.__main__, storyreel_llm.writer\n"
        "heavy = [m for m in ('torch', 'transformers', 'outlines', 'llguidance')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sigterm_while_waiting_for_tgi_stops_the_service_promptly(
    settings_for, tgi_double, tmp_path
):
    """The start-up wait for TGI's /health ends on SIGTERM instead of running to its timeout."""
    tgi_double.health_statuses[:] = [503] * 100_000
    env = {
        "STORYREEL_LLM_BACKEND": "tgi",
        "STORYREEL_LLM_TGI_URL": tgi_double.url,
        "STORYREEL_LLM_TGI_STARTUP_TIMEOUT_S": "600",
        "STORYREEL_LLM_TGI_STARTUP_POLL_S": "30",
        "STORYREEL_LLM_GRACE_PERIOD_S": "1",
    }
    with service_process(
        "storyreel_llm", tmp_path / "port", env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    ) as process:
        deadline = time.monotonic() + 120  # a hang guard for a slow interpreter start
        while tgi_double.health_checks == 0 and time.monotonic() < deadline:
            assert process.poll() is None, process.stdout.read()
            time.sleep(0.05)
        assert tgi_double.health_checks > 0
        process.send_signal(signal.SIGTERM)
        # The poll interval is 30 s and the start-up timeout 600 s: exiting within the
        # hang guard below proves the wait was cut short.
        code = process.wait(timeout=25)
        output = process.stdout.read()
    assert code == 0, output
    assert "draining" in output and "stopped" in output


@pytest.mark.parametrize("scene_count", [1, 12])
async def test_the_schema_answering_tgi_double_yields_valid_storyboards(
    start_double, start_service, scene_count
):
    """tests/faults runs the stack on this double: its answers must make whole storyboards."""
    double = start_double(TGITestDouble(schema_answers=True))
    running, _ = await start_service(double)
    response = await write(running.port, prompt="a story", scene_count=scene_count)
    board = response.storyboard
    assert len(board.scenes) == scene_count and board.degraded is False
    assert [c.name for c in board.characters] == ["Ada"]
    assert all(list(s.characters) == ["Ada"] for s in board.scenes)
    assert len(double.requests) == 2 + scene_count  # story, cast, one shot per scene
