"""The public StoryReelService: converts messages and calls the JobRunner."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from datetime import datetime

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from storyreel.errors import InvalidInput, Unauthenticated
from storyreel.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from storyreel.options import (
    ASPECTS,
    AUDIO_MODES,
    CAPTIONS,
    CONSISTENCY,
    RESOLUTIONS,
    from_enum,
    to_enum,
)
from storyreel.serving import Service
from storyreel.settings import StorageSettings
from storyreel.storage import ArtifactStore, open_store
from storyreel.story.v1 import story_pb2
from storyreel_gateway.auth import ApiKeys, tenant_var
from storyreel_gateway.clients import ComposeClient, RenderClient, StoryClient
from storyreel_gateway.index import JobIndex
from storyreel_gateway.jobs import (
    EventKind,
    JobEvent,
    JobRecord,
    JobSpec,
    JobState,
    JobStore,
    Stage,
)
from storyreel_gateway.pipeline import JobPipeline
from storyreel_gateway.runner import JobRunner
from storyreel_gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

_STATES = {
    JobState.QUEUED: gateway_pb2.JOB_STATE_QUEUED,
    JobState.RUNNING: gateway_pb2.JOB_STATE_RUNNING,
    JobState.DONE: gateway_pb2.JOB_STATE_DONE,
    JobState.FAILED: gateway_pb2.JOB_STATE_FAILED,
    JobState.CANCELLED: gateway_pb2.JOB_STATE_CANCELLED,
}
_STAGES = {
    None: gateway_pb2.STAGE_UNSPECIFIED,
    Stage.STORYBOARD: gateway_pb2.STAGE_STORYBOARD,
    Stage.RENDER: gateway_pb2.STAGE_RENDER,
    Stage.COMPOSE: gateway_pb2.STAGE_COMPOSE,
}
_EVENTS = {
    EventKind.SNAPSHOT: gateway_pb2.EVENT_KIND_SNAPSHOT,
    EventKind.STAGE_STARTED: gateway_pb2.EVENT_KIND_STAGE_STARTED,
    EventKind.STAGE_FINISHED: gateway_pb2.EVENT_KIND_STAGE_FINISHED,
    EventKind.SCENE_RENDERED: gateway_pb2.EVENT_KIND_SCENE_RENDERED,
    EventKind.JOB_FINISHED: gateway_pb2.EVENT_KIND_JOB_FINISHED,
    EventKind.RETRYING: gateway_pb2.EVENT_KIND_RETRYING,
}


def _timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def job_to_proto(
    record: JobRecord, public_url: Callable[[str], str] | None = None
) -> gateway_pb2.Job:
    """The job as the API shows it; ``public_url`` turns a finished job's URIs into URLs."""
    spec = record.spec
    done = record.state is JobState.DONE and public_url is not None

    def url(uri: str) -> str:
        return public_url(uri) if done and uri else ""

    def artifact(uri: str) -> gateway_pb2.JobArtifact | None:
        return gateway_pb2.JobArtifact(uri=uri, url=url(uri)) if uri else None

    job = gateway_pb2.Job(
        job_id=record.job_id,
        state=_STATES[record.state],
        stage=_STAGES[record.stage],
        progress=record.progress,
        prompt=spec.prompt,
        seed=spec.seed,
        scene_count=spec.scene_count,
        style=spec.style,
        audio_uri=spec.audio_uri,
        video_uri=record.video_uri,
        video_url=url(record.video_uri),
        duration_s=record.duration_s,
        scene_starts_s=record.scene_starts_s,
        eta_s=record.eta_s,
        idempotency_key=record.idempotency_key,
        created_at=_timestamp(record.created_at),
        updated_at=_timestamp(record.updated_at),
        aspect=to_enum(ASPECTS, spec.aspect),
        resolution=to_enum(RESOLUTIONS, spec.resolution),
        consistency=to_enum(CONSISTENCY, spec.consistency),
        captions=to_enum(CAPTIONS, spec.captions),
        audio_mode=to_enum(AUDIO_MODES, spec.audio_mode),
        voice=spec.voice,
        width=record.video_width or spec.width,
        height=record.video_height or spec.height,
        fps=record.video_fps or spec.fps,
        captions_srt=artifact(record.captions_srt_uri),
        captions_vtt=artifact(record.captions_vtt_uri),
        poster=artifact(record.poster_uri),
        contact_sheet=artifact(record.contact_sheet_uri),
    )
    for stage in record.stages:
        job.stages.add(
            stage=_STAGES[stage.stage],
            state=_STATES[stage.state],
            started_at=_timestamp(stage.started_at),
            finished_at=_timestamp(stage.finished_at),
            duration_s=stage.duration_s or 0.0,
        )
    if record.error:
        job.error.CopyFrom(
            gateway_pb2.JobError(
                stage=_STAGES[record.error.stage],
                code=record.error.code,
                message=record.error.message,
            )
        )
    if record.storyboard:
        board = record.storyboard
        job.storyboard.CopyFrom(
            story_pb2.Storyboard(
                title=board.title,
                characters=[
                    story_pb2.Character(name=c.name, appearance=c.appearance)
                    for c in board.characters
                ],
                scenes=[
                    story_pb2.Scene(
                        index=s.index,
                        narration=s.narration,
                        image_prompt=s.image_prompt,
                        characters=s.characters,
                    )
                    for s in board.scenes
                ],
                style=board.style,
                degraded=board.degraded,
            )
        )
    for image in record.images:
        job.images.add(index=image.index, uri=image.uri, seed=image.seed)
    return job


class StoryReelServicer(gateway_pb2_grpc.StoryReelServiceServicer):
    """Thin: converts messages, names the caller's tenant, calls the JobRunner."""

    def __init__(self, runner: JobRunner) -> None:
        self.runner = runner

    def _job(self, record: JobRecord) -> gateway_pb2.Job:
        return job_to_proto(record, self.runner.public_url)

    async def CreateVideo(self, request, context):
        """Starts a job and returns its id; the work runs in the background."""
        record = await self.runner.create(
            tenant_var.get(),
            JobSpec(
                prompt=request.prompt,
                scene_count=request.scene_count,
                style=request.style,
                seed=request.seed,
                audio_uri=request.audio_uri,
                width=request.width,
                height=request.height,
                fps=request.fps,
                aspect=from_enum(ASPECTS, request.aspect, "aspect"),
                resolution=from_enum(RESOLUTIONS, request.resolution, "resolution"),
                consistency=from_enum(CONSISTENCY, request.consistency, "consistency"),
                captions=from_enum(CAPTIONS, request.captions, "captions"),
                audio_mode=from_enum(AUDIO_MODES, request.audio_mode, "audio_mode"),
                voice=request.voice,
            ),
            request.idempotency_key,
        )
        return gateway_pb2.CreateVideoResponse(job_id=record.job_id)

    async def GetJob(self, request, context):
        """The job's current record."""
        record = await self.runner.get(tenant_var.get(), request.job_id)
        return gateway_pb2.GetJobResponse(job=self._job(record))

    async def WatchJob(self, request, context) -> AsyncIterator[gateway_pb2.WatchJobResponse]:
        """A snapshot of the job, then its events until it finishes."""
        event: JobEvent
        async for event in self.runner.watch(tenant_var.get(), request.job_id):
            yield gateway_pb2.WatchJobResponse(
                kind=_EVENTS[event.kind],
                stage=_STAGES[event.stage],
                scene_index=event.scene_index,
                job=self._job(event.job),
                message=event.message,
            )

    async def ListJobs(self, request, context):
        """The caller's jobs, newest first."""
        page, token = await self.runner.list(
            tenant_var.get(), request.page_size, request.page_token
        )
        return gateway_pb2.ListJobsResponse(
            jobs=[self._job(r) for r in page], next_page_token=token
        )

    async def CancelJob(self, request, context):
        """Stops the job in every stage."""
        record = await self.runner.cancel(tenant_var.get(), request.job_id)
        return gateway_pb2.CancelJobResponse(job=self._job(record))

    async def RegenerateScene(self, request, context):
        """Draws one scene again and composes the video again."""
        record = await self.runner.regenerate(
            tenant_var.get(),
            request.job_id,
            request.index,
            request.prompt if request.HasField("prompt") else None,
            request.seed if request.HasField("seed") else None,
        )
        return gateway_pb2.RegenerateSceneResponse(job=self._job(record))

    async def UploadAudio(self, request_iterator, context):
        """Stores a client-streamed audio file after checking its size and format."""

        async def chunks():
            first = True
            async for message in request_iterator:
                kind = message.WhichOneof("payload")
                if first and kind != "filename":
                    raise InvalidInput("the first UploadAudio message must carry the filename")
                if not first and kind != "chunk":
                    raise InvalidInput("only the first UploadAudio message may carry a filename")
                first = False
                if kind == "chunk":
                    yield message.chunk

        uri, size = await self.runner.upload_audio(tenant_var.get(), chunks())
        return gateway_pb2.UploadAudioResponse(audio_uri=uri, size_bytes=size)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Resolves the caller's API key to a tenant for every StoryReelService call.

    Health and reflection stay open so probes work without a key.
    """

    def __init__(self, keys: ApiKeys) -> None:
        self.keys = keys

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(_PUBLIC_PREFIX):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        try:
            tenant = self.keys.tenant_for(metadata.get("authorization"))
        except Unauthenticated as exc:
            return _refuse(handler, exc.message)
        return _with_tenant(handler, tenant)


_PUBLIC_PREFIX = "/storyreel.gateway.v1.StoryReelService/"


def _refuse(handler, message: str):
    async def abort(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def abort_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            abort, handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            abort_stream, handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            abort, handler.request_deserializer, handler.response_serializer
        )
    return grpc.stream_stream_rpc_method_handler(
        abort_stream, handler.request_deserializer, handler.response_serializer
    )


def _with_tenant(handler, tenant: str):
    def wrap(behavior, streaming_response: bool):
        if streaming_response:

            async def stream(request, context):
                token = tenant_var.set(tenant)
                try:
                    async for response in behavior(request, context):
                        yield response
                finally:
                    tenant_var.reset(token)

            return stream

        async def unary(request, context):
            token = tenant_var.set(tenant)
            try:
                return await behavior(request, context)
            finally:
                tenant_var.reset(token)

        return unary

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            wrap(handler.unary_unary, False),
            handler.request_deserializer,
            handler.response_serializer,
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            wrap(handler.unary_stream, True),
            handler.request_deserializer,
            handler.response_serializer,
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            wrap(handler.stream_unary, False),
            handler.request_deserializer,
            handler.response_serializer,
        )
    return handler


class GatewayService(Service):
    service_names = (gateway_pb2.DESCRIPTOR.services_by_name["StoryReelService"].full_name,)

    def __init__(self, settings: GatewaySettings, store: ArtifactStore | None = None) -> None:
        self.settings = settings
        self.store = store or open_store(StorageSettings())
        self.keys = ApiKeys(settings.tenant_keys())
        self.index = JobIndex(self.store)
        self.jobs = JobStore(self.store, self.index, settings.watch_poll_s)
        self.clients = (
            StoryClient(settings.story_address, settings.storyboard_timeout_s),
            RenderClient(
                settings.render_address, settings.render_timeout_s, settings.render_parallelism
            ),
            ComposeClient(settings.compose_address, settings.compose_timeout_s),
        )
        pipeline = JobPipeline.from_settings(settings, self.jobs, *self.clients)
        self.runner = JobRunner(settings, self.store, self.jobs, pipeline, self.index)

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [AuthInterceptor(self.keys)]

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if not self.settings.tls_cert_file:
            return None
        assert self.settings.tls_key_file is not None
        return grpc.ssl_server_credentials(
            [(self.settings.tls_key_file.read_bytes(), self.settings.tls_cert_file.read_bytes())]
        )

    def add_to_server(self, server: grpc.aio.Server) -> None:
        gateway_pb2_grpc.add_StoryReelServiceServicer_to_server(
            StoryReelServicer(self.runner), server
        )

    async def load(self) -> None:
        await asyncio.to_thread(self.store.check_ready)
        # Unfinished jobs are not resumed here: the runner adopts every job whose owner
        # stopped renewing it, this replica's own earlier incarnation included.
        await self.runner.start()

    async def drain(self) -> None:
        """While the calls in flight drain, keep running jobs but adopt no more."""
        await self.runner.stop_adopting()

    async def close(self) -> None:
        """Stop running jobs and hand them back: another replica (or the next) adopts them."""
        await self.runner.close()
        for client in self.clients:
            await client.close()
