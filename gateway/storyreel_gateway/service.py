"""The public StoryReelService: converts messages and calls the JobRunner."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from storyreel.errors import InvalidInput, Unauthenticated
from storyreel.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from storyreel.serving import Service
from storyreel.settings import StorageSettings
from storyreel.storage import ArtifactStore, open_store
from storyreel_gateway.auth import ApiKeys, tenant_var
from storyreel_gateway.clients import ComposeClient, RenderClient, StoryClient
from storyreel_gateway.convert import event_to_proto, job_to_proto, spec_from_request
from storyreel_gateway.db import Database, default_url, describe
from storyreel_gateway.jobs import JobRecord
from storyreel_gateway.pipeline import JobPipeline
from storyreel_gateway.runner import JobRunner
from storyreel_gateway.settings import GatewaySettings
from storyreel_gateway.store import JobStore

log = logging.getLogger(__name__)


class StoryReelServicer(gateway_pb2_grpc.StoryReelServiceServicer):
    """Thin: converts messages, names the caller's tenant, calls the JobRunner."""

    def __init__(self, runner: JobRunner) -> None:
        self.runner = runner

    def _job(self, record: JobRecord) -> gateway_pb2.Job:
        return job_to_proto(record, self.runner.public_url)

    async def CreateVideo(self, request, context):
        """Starts a job and returns its id; the work runs in the background."""
        record = await self.runner.create(
            tenant_var.get(), spec_from_request(request), request.idempotency_key
        )
        return gateway_pb2.CreateVideoResponse(job_id=record.job_id)

    async def GetJob(self, request, context):
        """The job's current record."""
        record = await self.runner.get(tenant_var.get(), request.job_id)
        return gateway_pb2.GetJobResponse(job=self._job(record))

    async def WatchJob(self, request, context) -> AsyncIterator[gateway_pb2.WatchJobResponse]:
        """A snapshot of the job, then its events until it finishes."""
        async for event in self.runner.watch(tenant_var.get(), request.job_id):
            yield event_to_proto(event, self.runner.public_url)

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
        self.database = Database(
            settings.database_url or default_url(), settings.database_pool_size
        )
        self.jobs = JobStore(self.database)
        self.clients = (
            StoryClient(settings.story_address, settings.storyboard_timeout_s),
            RenderClient(
                settings.render_address, settings.render_timeout_s, settings.render_parallelism
            ),
            ComposeClient(settings.compose_address, settings.compose_timeout_s),
        )
        pipeline = JobPipeline.from_settings(settings, self.jobs, *self.clients)
        self.runner = JobRunner(settings, self.store, self.jobs, pipeline)

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
        log.info("database", extra={"url": describe(str(self.database.url))})
        await self.database.migrate()
        # Unfinished jobs are not resumed here: the replica claims every job nobody runs,
        # those its own earlier incarnation left included.
        await self.runner.start()

    async def drain(self) -> None:
        """While the calls in flight drain, keep running jobs but claim no more."""
        await self.runner.stop_claiming()

    async def close(self) -> None:
        """Stop running jobs and hand them back: another replica (or the next) claims them."""
        await self.runner.close()
        for client in self.clients:
            await client.close()
        await self.database.close()
