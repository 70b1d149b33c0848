"""Service bootstrap shared by every storyreel gRPC server.

A service provides a :class:`Service`: it adds its servicer to the server and
loads its model. :func:`create_server` builds a ``grpc.aio`` server with the
error-mapping interceptor, the standard health service (NOT_SERVING until the
model is loaded) and reflection, and binds the port. :func:`serve` runs it as
a process: it loads the model, flips health to SERVING and, on SIGTERM or
SIGINT, reports NOT_SERVING, drains in-flight calls and unloads.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import signal
import uuid
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from storyreel.errors import StoryreelError
from storyreel.logs import job_id_var
from storyreel.settings import ServiceSettings

log = logging.getLogger(__name__)


class Service(abc.ABC):
    """One gRPC service: its servicers plus the model it needs loaded."""

    #: Full protobuf names of the services added by :meth:`add_to_server`.
    service_names: tuple[str, ...] = ()

    @abc.abstractmethod
    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Add the servicer(s) to ``server``."""

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """Extra interceptors, run after the error interceptor (e.g. authentication)."""
        return []

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS credentials for the port; None serves plaintext."""
        return None

    async def load(self) -> None:  # noqa: B027 - optional hook
        """Load models and check dependencies. Health is SERVING once this returns."""

    async def drain(self) -> None:  # noqa: B027 - optional hook
        """The server is stopping: health says NOT_SERVING and calls in flight drain."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release models and connections after the server stopped."""


def _job_id_from(request: object, context: grpc.aio.ServicerContext) -> str | None:
    job_id = getattr(request, "job_id", None)
    if job_id:
        return job_id
    for key, value in context.invocation_metadata() or ():
        if key == "x-job-id":
            return value
    return None


async def _abort_for(exc: BaseException, context: grpc.aio.ServicerContext, method: str) -> None:
    if isinstance(exc, StoryreelError):
        log.info("%s failed: %s: %s", method, exc.status, exc.message)
        await context.abort(grpc.StatusCode[exc.status], exc.message)
    ref = uuid.uuid4().hex[:12]
    log.exception("%s crashed (ref %s)", method, ref)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (ref {ref}); see server logs")


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps domain errors to status codes and tags logs with the job id.

    Servicers never set status codes by hand: they raise a
    :class:`~storyreel.errors.StoryreelError`. Any other exception becomes
    INTERNAL with a reference to the server log, never a traceback.
    """

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        passthrough = (grpc.aio.AbortError, asyncio.CancelledError)

        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary_unary(request, context):
                token = job_id_var.set(_job_id_from(request, context))
                try:
                    return await inner(request, context)
                except passthrough:
                    raise
                except Exception as exc:
                    await _abort_for(exc, context, method)
                finally:
                    job_id_var.reset(token)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            async def unary_stream(request, context):
                token = job_id_var.set(_job_id_from(request, context))
                try:
                    async for response in inner_stream(request, context):
                        yield response
                except passthrough:
                    raise
                except Exception as exc:
                    await _abort_for(exc, context, method)
                finally:
                    job_id_var.reset(token)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_unary:
            inner_su = handler.stream_unary

            async def stream_unary(request_iterator, context):
                try:
                    return await inner_su(request_iterator, context)
                except passthrough:
                    raise
                except Exception as exc:
                    await _abort_for(exc, context, method)

            return grpc.stream_unary_rpc_method_handler(
                stream_unary, handler.request_deserializer, handler.response_serializer
            )
        return handler


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service: Service

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.service.service_names):
            await self.health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        await self.set_serving(False)
        await self.service.drain()
        await self.server.stop(grace)
        await self.service.close()


async def create_server(settings: ServiceSettings, service: Service) -> RunningServer:
    """Build, bind and start the server; health stays NOT_SERVING until :meth:`load`.

    With ``settings.port == 0`` a free port is bound: handy for tests.
    """
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
    ]
    server = grpc.aio.server(
        interceptors=[ErrorInterceptor(), *service.interceptors()], options=options
    )
    service.add_to_server(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*service.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{settings.host}:{settings.port}"
    credentials = service.server_credentials()
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"could not bind {settings.host}:{settings.port}")
    await server.start()
    running = RunningServer(server, port, health_servicer, service)
    await running.set_serving(False)
    return running


async def start_and_load(settings: ServiceSettings, service: Service) -> RunningServer:
    """Start the server, load the model, then report SERVING (for in-process use)."""
    running = await create_server(settings, service)
    await service.load()
    await running.set_serving(True)
    return running


async def serve(settings: ServiceSettings, service: Service) -> int:
    """Run ``service`` until SIGTERM/SIGINT; returns the process exit code."""
    running = await create_server(settings, service)
    log.info("listening", extra={"host": settings.host, "port": running.port})
    if settings.port_file:
        tmp = settings.port_file.with_suffix(".tmp")
        tmp.write_text(str(running.port))
        tmp.replace(settings.port_file)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def load() -> None:
        await service.load()
        await running.set_serving(True)
        log.info("serving", extra={"services": list(service.service_names)})

    loader = asyncio.create_task(load())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({loader, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if loader.done() and loader.exception() is not None:
        log.error("start-up failed", exc_info=loader.exception())
        stopper.cancel()
        await running.stop(0)
        return 1
    await stopper
    log.info("draining", extra={"grace_s": settings.grace_period_s})
    loader.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await loader
    await running.stop(settings.grace_period_s)
    log.info("stopped")
    return 0
