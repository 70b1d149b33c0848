"""The public StoryReelService: converts messages and calls the JobRunner."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from storyreel.errors import InvalidInput, Unauthenticated
from storyreel.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from storyreel.serving import Service, refusing_handler, rewrapped_handler
from storyreel.settings import InternalSettings, StorageSettings
from storyreel.storage import ArtifactStore, open_store
from storyreel_gateway.auth import ApiKeys, tenant_var
from storyreel_gateway.clients import ComposerClient, DiffusionClient, LlmClient
from storyreel_gateway.convert import (
    edited_storyboard_from_request,
    event_to_proto,
    image_upload_to_proto,
    job_to_proto,
    spec_from_request,
    upload_to_proto,
)
from storyreel_gateway.db import Database, default_url, describe
from storyreel_gateway.jobs import JobRecord
from storyreel_gateway.pipeline import JobPipeline
from storyreel_gateway.runner import JobRunner
from storyreel_gateway.settings import GatewaySettings
from storyreel_gateway.store import JobStore
from storyreel_gateway.web import WebPort

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

    async def UpdateStoryboard(self, request, context):
        """Replaces the storyboard of a job in review, or of a finished job (a new run)."""
        board, hints = edited_storyboard_from_request(request)
        record = await self.runner.update_storyboard(
            tenant_var.get(), request.job_id, board, hints, request.version
        )
        return gateway_pb2.UpdateStoryboardResponse(job=self._job(record))

    async def ApproveStoryboard(self, request, context):
        """Lets a job in review go on to render and compose."""
        record = await self.runner.approve_storyboard(
            tenant_var.get(), request.job_id, request.version
        )
        return gateway_pb2.ApproveStoryboardResponse(job=self._job(record))

    async def UploadAudio(self, request_iterator, context):
        """Stores a client-streamed audio file after checking its size and format."""
        # The caller's file name, once the first message is read: a refusal names it.
        names: list[str] = []
        chunks = _upload_chunks(request_iterator, "UploadAudio", names)
        stored = await self.runner.upload_audio(
            tenant_var.get(), chunks, filename=lambda: names[0] if names else ""
        )
        return upload_to_proto(stored)

    async def UploadImage(self, request_iterator, context):
        """Stores a client-streamed reference image after checking its format and size."""
        chunks = _upload_chunks(request_iterator, "UploadImage", [])
        stored = await self.runner.upload_image(tenant_var.get(), chunks)
        return image_upload_to_proto(stored)

    async def ReadArtifact(self, request, context):
        """Streams one of the caller's artifacts: its size and type, then its bytes."""
        reader = await self.runner.open_artifact(
            tenant_var.get(), request.job_id, request.uri, request.offset
        )
        try:
            yield gateway_pb2.ReadArtifactResponse(
                size_bytes=reader.size, content_type=reader.content_type
            )
            async for chunk in self.runner.artifact_chunks(reader):
                yield gateway_pb2.ReadArtifactResponse(chunk=chunk)
        finally:
            reader.close()


async def _upload_chunks(request_iterator, method: str, names: list[str]) -> AsyncIterator[bytes]:
    """The chunks of an upload stream whose first message carries the file name (kept in
    ``names``).

    A stream gRPC itself ended (a message over the size limit: the caller already has
    RESOURCE_EXHAUSTED) reads here as if it had ended well; gRPC cancels the call at once,
    and the upload (:func:`storyreel_gateway.uploads._idle_limited`) keeps nothing.
    """
    first = True
    async for message in request_iterator:
        kind = message.WhichOneof("payload")
        if first and kind != "filename":
            raise InvalidInput(f"the first {method} message must carry the filename")
        if not first and kind != "chunk":
            raise InvalidInput(f"only the first {method} message may carry a filename")
        first = False
        if kind == "chunk":
            yield message.chunk
        else:
            names.append(message.filename)


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
        # Every authorization header, not the last one: two of them are refused.
        authorization = [
            value
            for key, value in handler_call_details.invocation_metadata or ()
            if key == "authorization"
        ]
        try:
            tenant = self.keys.tenant_for(authorization)
        except Unauthenticated as exc:
            return refusing_handler(
                handler, grpc.StatusCode.UNAUTHENTICATED, exc.message, abort=_abort_quietly
            )
        return _with_tenant(handler, tenant)


_PUBLIC_PREFIX = "/storyreel.gateway.v1.StoryReelService/"


async def _abort_quietly(context, code: grpc.StatusCode, message: str) -> None:
    try:
        await context.abort(code, message)
    except grpc.aio.AbortError:
        raise
    except Exception:
        # No status can be sent: gRPC already ended the call. It runs a client-streaming
        # handler even for a call it refused itself (metadata over its size limit: the
        # client got RESOURCE_EXHAUSTED). Nothing crashed, so end as a cancelled call
        # rather than as INTERNAL with a traceback in the log.
        raise asyncio.CancelledError from None


def _with_tenant(handler, tenant: str):
    def wrap(behavior, _takes_stream: bool, streaming_response: bool):
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

    return rewrapped_handler(handler, wrap)


class GatewayService(Service):
    service_names = (gateway_pb2.DESCRIPTOR.services_by_name["StoryReelService"].full_name,)
    # The public API: its callers are tenants with API keys (AuthInterceptor), not the
    # deployment's services. It presents the internal token (and, with mutual TLS, its
    # client certificate) to the llm, diffusion and composer services.
    internal = False

    def __init__(
        self,
        settings: GatewaySettings,
        store: ArtifactStore | None = None,
        *,
        internal: InternalSettings | None = None,
    ) -> None:
        self.settings = settings
        # The deployment's token and certificates (STORYREEL_INTERNAL_*) unless given.
        self.internal_settings = internal if internal is not None else InternalSettings()
        self.store = store or open_store(StorageSettings())
        self.keys = ApiKeys(settings.tenant_keys())
        self.database = Database(
            settings.database_url or default_url(), settings.database_pool_size
        )
        self.jobs = JobStore(self.database)
        trust = self.internal_settings
        self.clients = (
            LlmClient(settings.llm_address, settings.storyboard_timeout_s, internal=trust),
            DiffusionClient(
                settings.diffusion_address,
                settings.render_timeout_s,
                settings.render_parallelism,
                internal=trust,
            ),
            ComposerClient(settings.composer_address, settings.compose_timeout_s, internal=trust),
        )
        pipeline = JobPipeline.from_settings(settings, self.jobs, *self.clients)
        self.runner = JobRunner(settings, self.store, self.jobs, pipeline, composer=self.clients[2])
        # The web port (studio page, gRPC-Web), unless settings turn it off.
        self.web: WebPort | None = WebPort() if settings.web_bind else None

    @property
    def web_url(self) -> str | None:
        """``http://host:port/`` of the web port once it listens (https with TLS), or None."""
        return self.web.url if self.web and self.web.port else None

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
        # The web port's calls come in here, to the same interceptors and servicer.
        if self.web is not None and not server.add_insecure_port(self.web.grpc_address):
            raise OSError(f"cannot listen on {self.web.grpc_address}")

    async def serve_beside(self, running) -> None:
        """Open the web port (storyreel_gateway.web), and write it to web_port_file."""
        bind = self.settings.web_bind
        if self.web is None or bind is None:
            return
        settings = self.settings
        tls = (settings.tls_cert_file, settings.tls_key_file) if settings.tls_cert_file else None
        await self.web.start(
            *bind,
            max_message_bytes=settings.max_message_bytes,
            tls=tls,
            grace_s=settings.grace_period_s,
        )
        log.info("studio and gRPC-Web", extra={"url": self.web.url})
        if settings.web_port_file:
            tmp = settings.web_port_file.with_suffix(".tmp")
            tmp.write_text(str(self.web.port))
            tmp.replace(settings.web_port_file)

    async def load(self) -> None:
        """Check the store, migrate the database, start the runner, wait for the upstreams.

        Health is SERVING once this returns, so it stays NOT_SERVING until the story,
        render and composer services report SERVING (see :meth:`_wait_for_upstreams`).
        """
        await asyncio.to_thread(self.store.check_ready)
        log.info("database", extra={"url": describe(str(self.database.url))})
        await self.database.migrate()
        # Unfinished jobs are not resumed here: the replica claims every job nobody runs,
        # those its own earlier incarnation left included.
        await self.runner.start()
        await self._wait_for_upstreams()

    def _upstreams(self) -> list[tuple[str, str, grpc.aio.Channel]]:
        story, render, compose = self.clients
        render_targets = [a.strip() for a in render.address.split(",") if a.strip()]
        return [
            ("story", story.address, story.channel),
            *(("render", t, c) for t, c in zip(render_targets, render.channels, strict=True)),
            ("compose", compose.address, compose.channel),
        ]

    async def _wait_for_upstreams(self, poll_s: float = 0.5) -> None:
        """Return once every upstream's grpc.health.v1 Check says SERVING.

        The gateway works meanwhile (its calls are answered; jobs wait in the queue or
        retry) but reports NOT_SERVING, so no load balancer sends it traffic yet. An
        upstream with no health service counts as ready. After retry_give_up_after_s,
        the time a stage keeps retrying an upstream, the gateway serves anyway and logs
        which upstream is not ready: its jobs fail naming that service, and GetJob,
        ListJobs and CancelJob keep working.
        """
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        async def state(channel: grpc.aio.Channel) -> str:
            try:
                response = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=max(poll_s, 2.0)
                )
            except grpc.aio.AioRpcError as error:
                return (
                    "SERVING"
                    if error.code() == grpc.StatusCode.UNIMPLEMENTED
                    else (error.code().name if error.code() else "UNKNOWN")
                )
            return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.retry_give_up_after_s
        reported: dict[str, str] | None = None
        while True:
            upstreams = self._upstreams()
            states = await asyncio.gather(*(state(channel) for _, _, channel in upstreams))
            not_ready = {
                f"{name} {address}": status
                for (name, address, _), status in zip(upstreams, states, strict=True)
                if status != "SERVING"
            }
            if not not_ready:
                log.info("upstream services are SERVING", extra={"waited": reported is not None})
                return
            if not_ready != reported:
                log.info(
                    "waiting for the upstream services to report SERVING; "
                    "the gateway reports NOT_SERVING until they do",
                    extra={"not_ready": not_ready},
                )
                reported = not_ready
            if loop.time() >= deadline:
                log.error(
                    "upstream services still not SERVING after %.0f s "
                    "(retry_give_up_after_s); serving anyway",
                    self.settings.retry_give_up_after_s,
                    extra={"not_ready": not_ready},
                )
                return
            await asyncio.sleep(poll_s)

    async def drain(self) -> None:
        """While the calls in flight drain, keep running jobs but claim no more."""
        await self.runner.stop_claiming()
        if self.web is not None:
            self.web.begin_stop()

    async def close(self) -> None:
        """Stop running jobs and hand them back: another replica (or the next) claims them."""
        if self.web is not None:
            await self.web.stop()
        await self.runner.close()
        for client in self.clients:
            await client.close()
        await self.database.close()
