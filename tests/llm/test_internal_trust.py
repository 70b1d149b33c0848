"""The LLM service answers only callers that present the deployment's internal token.

WriteStoryboard reads and writes no stored object (its job_id only tags the logs), so
the token is its whole defence: a stranger on the network, or another user of the
machine, cannot spend its model. A real LlmService on a real port, with a scripted
backend (no model).
"""

from __future__ import annotations

import asyncio
import os
import sys

import grpc
import pytest
from llm.story_doubles import CAST, ScriptedBackend, answers_for
from storyreel_llm.service import LlmService

from storyreel.channels import open_channel
from storyreel.llm.v1 import llm_pb2, llm_pb2_grpc
from storyreel.serving import start_and_load
from storyreel.settings import InternalSettings

TOKEN = "story-internal-token-0123456789"


@pytest.fixture
async def story(settings_for, monkeypatch):
    """A LLM service that requires the token (from the environment, as deployed)."""
    monkeypatch.setenv("STORYREEL_INTERNAL_TOKEN", TOKEN)
    settings = settings_for()
    backend = ScriptedBackend(answers_for(1))
    running = await start_and_load(settings, LlmService(settings, backend=backend))
    running.backend = backend
    yield running
    await running.stop(0)


def request() -> llm_pb2.WriteStoryboardRequest:
    return llm_pb2.WriteStoryboardRequest(prompt="a lighthouse keeper", scene_count=1)


async def test_a_direct_storyboard_call_without_the_token_is_unauthenticated(story):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{story.port}") as channel:
        stub = llm_pb2_grpc.LlmServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.WriteStoryboard(request(), timeout=60)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert story.backend.calls == []  # the model was never asked


async def test_the_gateways_channel_gets_a_storyboard(story):
    internal = InternalSettings(token=TOKEN)
    async with open_channel(f"127.0.0.1:{story.port}", internal=internal) as channel:
        stub = llm_pb2_grpc.LlmServiceStub(channel)
        response = await stub.WriteStoryboard(request(), timeout=60)
    assert response.storyboard.title == CAST["title"]


async def cli(address: str, **env: str) -> tuple[int, str, str]:
    scrubbed = {k: v for k, v in os.environ.items() if not k.startswith("STORYREEL_INTERNAL_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "storyreel.cli",
        "storyboard",
        "a lighthouse keeper",
        "--scenes",
        "1",
        "--json",
        "--address",
        address,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=scrubbed | env,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
    return process.returncode, stdout.decode(), stderr.decode()


async def test_storyreel_storyboard_presents_the_token_it_is_given(story, tmp_path):
    address = f"127.0.0.1:{story.port}"
    code, _, err = await cli(address)
    assert code == 2, err
    assert "STORYREEL_INTERNAL_TOKEN" in err and "no internal token" in err
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    code, out, err = await cli(address, STORYREEL_INTERNAL_TOKEN_FILE=str(token_file))
    assert code == 0, err
    assert CAST["title"] in out
