"""Gateway fixtures: upstream services replaced by gRPC test doubles.

The doubles are real gRPC servers on real ports that answer with canned
storyboards, images and videos (or canned errors), so gateway tests exercise
the gateway's own behaviour. The real services run together in tests/e2e.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc
import pytest
from storyreel_gateway.service import GatewayService
from storyreel_gateway.settings import GatewaySettings

from storyreel.compose.v1 import compose_pb2, compose_pb2_grpc
from storyreel.gateway.v1 import gateway_pb2_grpc
from storyreel.ids import job_key
from storyreel.render.v1 import render_pb2, render_pb2_grpc
from storyreel.serving import start_and_load
from storyreel.story.v1 import story_pb2, story_pb2_grpc


@dataclass
class UpstreamDoubles:
    """Story, render and compose test doubles sharing one gRPC server."""

    store: object
    render_error: grpc.StatusCode | None = None
    # Fail this many render calls with render_error, then succeed (None: fail every call).
    render_failures: int | None = None
    render_calls: int = 0
    # Seconds each scene takes to "render" (to catch a job mid-render).
    render_delay_s: float = 0.0
    # Scene indices of every render call, and how many calls were cancelled by the caller.
    render_requests: list = field(default_factory=list)
    # The whole RenderScenesRequest of every call.
    render_messages: list = field(default_factory=list)
    render_cancelled: int = 0
    story_requests: list = field(default_factory=list)
    compose_requests: list = field(default_factory=list)


class StoryDouble(story_pb2_grpc.StoryServiceServicer):
    def __init__(self, state: UpstreamDoubles) -> None:
        self.state = state

    async def WriteStoryboard(self, request, context):
        self.state.story_requests.append(request)
        return story_pb2.WriteStoryboardResponse(
            storyboard=story_pb2.Storyboard(
                title="Test title",
                characters=[story_pb2.Character(name="Ada", appearance="red coat")],
                scenes=[
                    story_pb2.Scene(
                        index=i,
                        narration=f"line {i}",
                        image_prompt=f"prompt {i}",
                        # Ada is in the odd scenes; "Ghost" is named but never cast.
                        characters=["Ada"] if i % 2 else ["Ghost"],
                    )
                    for i in range(1, request.scene_count + 1)
                ],
            )
        )


class RenderDouble(render_pb2_grpc.RenderServiceServicer):
    def __init__(self, state: UpstreamDoubles) -> None:
        self.state = state

    async def RenderScenes(self, request, context):
        self.state.render_calls += 1
        failures = self.state.render_failures
        if self.state.render_error is not None and (
            failures is None or self.state.render_calls <= failures
        ):
            await context.abort(self.state.render_error, "render double refuses")
        self.state.render_requests.append([scene.index for scene in request.scenes])
        self.state.render_messages.append(request)
        try:
            for scene in request.scenes:
                await asyncio.sleep(self.state.render_delay_s)
                key = job_key(
                    request.job_id,
                    "images",
                    f"scene-{scene.index:03d}.png",
                    revision=request.revision,
                )
                uri = self.state.store.put_bytes(key, f"png {scene.seed}".encode())
                yield render_pb2.RenderScenesResponse(
                    image=render_pb2.RenderedImage(index=scene.index, uri=uri, seed=scene.seed)
                )
        except (asyncio.CancelledError, GeneratorExit):
            self.state.render_cancelled += 1
            raise


class ComposeDouble(compose_pb2_grpc.ComposeServiceServicer):
    def __init__(self, state: UpstreamDoubles) -> None:
        self.state = state

    async def Compose(self, request, context):
        self.state.compose_requests.append(request)
        folder = job_key(request.job_id, "video", revision=request.revision)
        uri = self.state.store.put_bytes(f"{folder}/video.mp4", b"mp4")
        extras = {
            "poster_uri": self.state.store.put_bytes(f"{folder}/poster.png", b"png"),
            "contact_sheet_uri": self.state.store.put_bytes(f"{folder}/contact-sheet.png", b"png"),
        }
        if request.captions != compose_pb2.CAPTIONS_OFF:
            extras["captions_srt_uri"] = self.state.store.put_bytes(f"{folder}/captions.srt", b"1")
            extras["captions_vtt_uri"] = self.state.store.put_bytes(f"{folder}/captions.vtt", b"W")
        portrait = request.aspect == compose_pb2.ASPECT_9_16
        width, height = (request.width, request.height) if request.width else (1280, 720)
        if portrait:
            width, height = 720, 1280
        starts = [1.5 * i for i in range(len(request.scenes))]
        return compose_pb2.ComposeResponse(
            video_uri=uri,
            duration_s=4.5,
            scene_starts_s=starts,
            width=width,
            height=height,
            fps=request.fps or 24,
            **extras,
        )


@pytest.fixture
async def upstream(file_store):
    state = UpstreamDoubles(store=file_store)
    server = grpc.aio.server()
    story_pb2_grpc.add_StoryServiceServicer_to_server(StoryDouble(state), server)
    render_pb2_grpc.add_RenderServiceServicer_to_server(RenderDouble(state), server)
    compose_pb2_grpc.add_ComposeServiceServicer_to_server(ComposeDouble(state), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    state.address = f"127.0.0.1:{port}"
    yield state
    await server.stop(0)


@dataclass
class GatewayUnderTest:
    stub: gateway_pb2_grpc.StoryReelServiceStub
    running: object
    channel: grpc.aio.Channel
    address: str

    async def stop(self) -> None:
        await self.channel.close()
        await self.running.stop(0)


@pytest.fixture
def gateway_database(sqlite_url):
    """The job database every gateway of one test shares (SQLite; see test_replicas for both)."""
    return sqlite_url


@pytest.fixture
async def start_gateway(upstream, file_store, gateway_database, tmp_path):
    """Start gateways wired to the upstream doubles; every one is stopped at the end."""
    started: list[GatewayUnderTest] = []

    async def start(store=None, **overrides) -> GatewayUnderTest:
        fields = {
            "port": 0,
            "story_address": upstream.address,
            "render_address": upstream.address,
            "compose_address": upstream.address,
            "max_upload_bytes": 64 * 1024,
            "retry_initial_s": 0.05,
            "retry_give_up_after_s": 4.0,
            "database_url": gateway_database,
            "upload_tmp_dir": tmp_path / "upload-spool",
            "claim_poll_s": 0.2,
            **overrides,
        }
        settings = GatewaySettings(**fields)
        running = await start_and_load(settings, GatewayService(settings, store or file_store))
        address = f"127.0.0.1:{running.port}"
        channel = grpc.aio.insecure_channel(address)
        under_test = GatewayUnderTest(
            gateway_pb2_grpc.StoryReelServiceStub(channel), running, channel, address
        )
        started.append(under_test)
        return under_test

    yield start
    for under_test in started:
        await under_test.stop()


@pytest.fixture
async def gateway(start_gateway):
    under_test = await start_gateway()
    stub = under_test.stub
    stub.address = under_test.address
    return stub
