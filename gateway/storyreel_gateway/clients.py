"""gRPC clients of the story, render and composer services.

Each implements one stage protocol of :mod:`storyreel_gateway.pipeline`,
converting messages to the gateway's records and every RPC error to
:class:`~storyreel_gateway.pipeline.StageFailed`. Every call has a deadline;
the pipeline retries transient failures (the channels retry nothing). Every call
carries the deployment's internal token, over mutual TLS when it is configured
(``internal``, :func:`storyreel.channels.open_channel`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import grpc

from storyreel.channels import open_channel
from storyreel.compose_options import ComposeOptions, request_fields
from storyreel.composer.v1 import composer_pb2, composer_pb2_grpc
from storyreel.diffusion.v1 import diffusion_pb2, diffusion_pb2_grpc
from storyreel.errors import InvalidInput, Overloaded, UpstreamFailed
from storyreel.llm.v1 import llm_pb2, llm_pb2_grpc
from storyreel.options import ASPECTS, CONSISTENCY, to_enum
from storyreel.settings import InternalSettings
from storyreel.storyboard import Character, Storyboard, storyboard_from_proto
from storyreel_gateway.admission import VoiceList
from storyreel_gateway.convert import image_from_proto, video_from_proto
from storyreel_gateway.jobs import ComposedVideo, SceneImage
from storyreel_gateway.pipeline import RenderSettings, SceneToRender, StageFailed
from storyreel_gateway.uploads import ProbedAudio

#: Deadlines of the admission calls to the composer, in seconds: listing the voices
#: is instant; a probe decodes the whole upload (ffmpeg), seconds for the largest.
LIST_VOICES_TIMEOUT_S = 10.0
PROBE_AUDIO_TIMEOUT_S = 300.0
#: The most of an upstream's message passed on to a caller.
_MAX_DETAIL_CHARS = 1000


def _failed(service: str, address: str, error: grpc.aio.AioRpcError) -> StageFailed:
    code = error.code().name if error.code() else "UNKNOWN"
    detail = error.details() or "no details"
    if error.code() == grpc.StatusCode.UNAVAILABLE:
        detail = f"{service} service at {address} is unavailable: {detail}"
    return StageFailed(code, detail)


def _detail(error: grpc.aio.AioRpcError) -> str:
    detail = error.details() or "no details"
    return detail if len(detail) <= _MAX_DETAIL_CHARS else detail[:_MAX_DETAIL_CHARS] + "..."


def _status(error: grpc.aio.AioRpcError) -> str:
    code = error.code().name if error.code() else "UNKNOWN"
    return f"{code}: {_detail(error)}"


class LlmClient:
    def __init__(
        self, address: str, timeout_s: float, *, internal: InternalSettings | None = None
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.channel = open_channel(address, internal=internal)
        self.stub = llm_pb2_grpc.LlmServiceStub(self.channel)

    async def write_storyboard(
        self, job_id: str, prompt: str, scene_count: int, style: str, seed: int
    ) -> Storyboard:
        request = llm_pb2.WriteStoryboardRequest(
            prompt=prompt, scene_count=scene_count, style=style, job_id=job_id, seed=seed
        )
        try:
            response = await self.stub.WriteStoryboard(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as error:
            raise _failed("story", self.address, error) from None
        return storyboard_from_proto(response.storyboard)

    async def close(self) -> None:
        await self.channel.close()


class DiffusionClient:
    """Render calls, spread over every replica.

    ``address`` is one target (``host:port``, or ``dns:///name:port`` whose
    replicas the channel balances round-robin) or a comma-separated list of
    targets, each with its own channel, used in turn. A job's scenes are split
    into ``parallelism`` calls that run at once, so they land on different
    replicas.
    """

    def __init__(
        self,
        address: str,
        timeout_s: float,
        parallelism: int = 0,
        *,
        internal: InternalSettings | None = None,
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        targets = [a.strip() for a in address.split(",") if a.strip()]
        self.channels = [open_channel(target, internal=internal) for target in targets]
        self.stubs = [diffusion_pb2_grpc.DiffusionServiceStub(c) for c in self.channels]
        self.parallelism = parallelism or len(self.stubs)
        self._next = 0

    async def render(
        self,
        job_id: str,
        scenes: list[SceneToRender],
        settings: RenderSettings,
        characters: Sequence[Character] = (),
    ) -> AsyncIterator[SceneImage]:
        known = {c.name for c in characters}
        request = diffusion_pb2.RenderScenesRequest(
            job_id=job_id,
            scenes=[
                diffusion_pb2.Scene(
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
                diffusion_pb2.Character(
                    name=c.name, appearance=c.appearance, reference_uri=c.reference_uri
                )
                for c in characters
            ],
            consistency=to_enum(CONSISTENCY, settings.consistency),
            aspect=to_enum(ASPECTS, settings.aspect),
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


class ComposerClient:
    """Compose calls, and the composer's facts that admission needs (voices, uploads)."""

    def __init__(
        self,
        address: str,
        timeout_s: float,
        *,
        list_voices_timeout_s: float = LIST_VOICES_TIMEOUT_S,
        probe_timeout_s: float = PROBE_AUDIO_TIMEOUT_S,
        internal: InternalSettings | None = None,
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.list_voices_timeout_s = list_voices_timeout_s
        self.probe_timeout_s = probe_timeout_s
        self.channel = open_channel(address, internal=internal)
        self.stub = composer_pb2_grpc.ComposerServiceStub(self.channel)

    async def list_voices(self) -> VoiceList:
        """The composer's voices; UpstreamFailed (UNAVAILABLE) when it cannot say."""
        try:
            response = await self.stub.ListVoices(
                composer_pb2.ListVoicesRequest(), timeout=self.list_voices_timeout_s
            )
        except grpc.aio.AioRpcError as error:
            raise UpstreamFailed(
                f"the composer at {self.address} could not list its voices: {_status(error)}"
            ) from None
        return VoiceList(
            names=tuple(voice.name for voice in response.voices),
            default=response.default_voice,
            languages={voice.name: voice.language for voice in response.voices},
        )

    async def probe_audio(self, uri: str) -> ProbedAudio:
        """What the uploaded audio at ``uri`` holds, as the composer reads it.

        InvalidInput with the composer's own message when Compose would refuse
        the audio; Overloaded when the composer is busy; UpstreamFailed when it
        cannot be asked (or cannot see the object: a different artifact store).
        """
        try:
            response = await self.stub.ProbeAudio(
                composer_pb2.ProbeAudioRequest(uri=uri), timeout=self.probe_timeout_s
            )
        except grpc.aio.AioRpcError as error:
            code = error.code()
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidInput(_detail(error)) from None
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise Overloaded(
                    f"the composer is too busy to check the upload; send it again later "
                    f"({_detail(error)})"
                ) from None
            if code == grpc.StatusCode.NOT_FOUND:
                raise UpstreamFailed(
                    f"the composer service at {self.address} cannot read the stored upload "
                    "(do the gateway and the composer share one artifact store?)"
                ) from None
            raise UpstreamFailed(
                f"the composer service at {self.address} could not check the upload: "
                f"{_status(error)}"
            ) from None
        return ProbedAudio(
            duration_s=response.duration_s,
            codec=response.codec,
            sample_rate=response.sample_rate,
            channels=response.channels,
            format=response.format,
        )

    async def compose(
        self,
        job_id: str,
        scenes: list[tuple[str, str]],
        audio_uri: str = "",
        *,
        fps: int = 0,
        width: int = 0,
        height: int = 0,
        options: ComposeOptions | None = None,
        revision: int = 0,
    ) -> ComposedVideo:
        request = composer_pb2.ComposeRequest(
            job_id=job_id,
            scenes=[
                composer_pb2.Scene(image_uri=uri, narration=narration) for uri, narration in scenes
            ],
            audio_uri=audio_uri,
            fps=fps,
            width=width,
            height=height,
            revision=revision,
            **request_fields(options or ComposeOptions()),
        )
        try:
            response = await self.stub.Compose(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as error:
            raise _failed("compose", self.address, error) from None
        return video_from_proto(response)

    async def close(self) -> None:
        await self.channel.close()
