"""gRPC clients of the story, render and compose services.

Each implements one stage protocol of :mod:`storyreel_gateway.pipeline`,
converting messages to the gateway's records and every RPC error to
:class:`~storyreel_gateway.pipeline.StageFailed`. Every call has a deadline;
the channels retry UNAVAILABLE and RESOURCE_EXHAUSTED with backoff.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import grpc

from storyreel.channels import open_channel
from storyreel.compose.v1 import compose_pb2, compose_pb2_grpc
from storyreel.options import (
    ASPECTS,
    AUDIO_MODES,
    CAPTIONS,
    CONSISTENCY,
    RENDER_ASPECTS,
    RESOLUTIONS,
    to_enum,
)
from storyreel.render.v1 import render_pb2, render_pb2_grpc
from storyreel.story.v1 import story_pb2, story_pb2_grpc
from storyreel_gateway.convert import image_from_proto, storyboard_from_proto, video_from_proto
from storyreel_gateway.jobs import Character, ComposedVideo, SceneImage, Storyboard
from storyreel_gateway.pipeline import (
    ComposeOptions,
    RenderSettings,
    SceneRequest,
    StageFailed,
)


def _failed(service: str, address: str, error: grpc.aio.AioRpcError) -> StageFailed:
    code = error.code().name if error.code() else "UNKNOWN"
    detail = error.details() or "no details"
    if error.code() == grpc.StatusCode.UNAVAILABLE:
        detail = f"{service} service at {address} is unavailable: {detail}"
    return StageFailed(code, detail)


class StoryClient:
    def __init__(self, address: str, timeout_s: float) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.channel = open_channel(address)
        self.stub = story_pb2_grpc.StoryServiceStub(self.channel)

    async def write_storyboard(
        self, job_id: str, prompt: str, scene_count: int, style: str, seed: int
    ) -> Storyboard:
        request = story_pb2.WriteStoryboardRequest(
            prompt=prompt, scene_count=scene_count, style=style, job_id=job_id, seed=seed
        )
        try:
            response = await self.stub.WriteStoryboard(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as error:
            raise _failed("story", self.address, error) from None
        return storyboard_from_proto(response.storyboard)

    async def close(self) -> None:
        await self.channel.close()


class RenderClient:
    """Render calls, spread over every replica.

    ``address`` is one target (``host:port``, or ``dns:///name:port`` whose
    replicas the channel balances round-robin) or a comma-separated list of
    targets, each with its own channel, used in turn. A job's scenes are split
    into ``parallelism`` calls that run at once, so they land on different
    replicas.
    """

    def __init__(self, address: str, timeout_s: float, parallelism: int = 0) -> None:
        self.address = address
        self.timeout_s = timeout_s
        targets = [a.strip() for a in address.split(",") if a.strip()]
        self.channels = [open_channel(target) for target in targets]
        self.stubs = [render_pb2_grpc.RenderServiceStub(c) for c in self.channels]
        self.parallelism = parallelism or len(self.stubs)
        self._next = 0

    async def render(
        self,
        job_id: str,
        scenes: list[SceneRequest],
        settings: RenderSettings,
        characters: Sequence[Character] = (),
    ) -> AsyncIterator[SceneImage]:
        known = {c.name for c in characters}
        request = render_pb2.RenderScenesRequest(
            job_id=job_id,
            scenes=[
                render_pb2.SceneToRender(
                    index=s.index,
                    prompt=s.prompt,
                    seed=s.seed,
                    characters=[name for name in s.characters if name in known],
                )
                for s in scenes
            ],
            width=settings.width,
            height=settings.height,
            steps=settings.steps,
            guidance=settings.guidance,
            characters=[
                render_pb2.CharacterToRender(name=c.name, appearance=c.appearance)
                for c in characters
            ],
            consistency=to_enum(CONSISTENCY, settings.consistency),
            aspect_ratio=to_enum(RENDER_ASPECTS, settings.aspect),
            revision=settings.revision,
        )
        if settings.job_seed is not None:
            request.job_seed = settings.job_seed
        stub = self.stubs[self._next % len(self.stubs)]
        self._next += 1
        call = stub.RenderScenes(request, timeout=self.timeout_s)
        try:
            async for response in call:
                yield image_from_proto(response.image)
        except grpc.aio.AioRpcError as error:
            raise _failed("render", self.address, error) from None
        finally:
            call.cancel()

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


class ComposeClient:
    def __init__(self, address: str, timeout_s: float) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.channel = open_channel(address)
        self.stub = compose_pb2_grpc.ComposeServiceStub(self.channel)

    async def compose(
        self, job_id: str, scenes: list[tuple[str, str]], options: ComposeOptions
    ) -> ComposedVideo:
        request = compose_pb2.ComposeRequest(
            job_id=job_id,
            scenes=[
                compose_pb2.SceneClip(image_uri=uri, narration=narration)
                for uri, narration in scenes
            ],
            audio_uri=options.audio_uri,
            fps=options.fps,
            width=options.width,
            height=options.height,
            aspect=to_enum(ASPECTS, options.aspect),
            resolution=to_enum(RESOLUTIONS, options.resolution),
            seed=options.seed,
            captions=to_enum(CAPTIONS, options.captions),
            audio_mode=to_enum(AUDIO_MODES, options.audio_mode),
            voice=options.voice,
            revision=options.revision,
        )
        try:
            response = await self.stub.Compose(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as error:
            raise _failed("compose", self.address, error) from None
        return video_from_proto(response)

    async def close(self) -> None:
        await self.channel.close()
