"""Service bootstrap shared by every storyreel gRPC server.

A service provides a :class:`Service`: it adds its servicer to the server and
loads its model. :func:`create_server` builds a ``grpc.aio`` server with the
error-mapping interceptor, the standard health service (NOT_SERVING until the
model is loaded; Check, Watch and List) and reflection (v1 and v1alpha), and
binds the port (a port in use is an error, never shared). :func:`serve` runs it
as a process: it loads the model, flips health to SERVING and, on SIGTERM or
SIGINT, reports NOT_SERVING, drains in-flight calls and unloads.

Every server behaves alike at the edges: a message that cannot be decoded is
INVALID_ARGUMENT (after any authentication the service adds), and whatever a
caller sent is cut to a bounded size before it is logged or echoed back.

Internal services (every :class:`Service` but the public gateway) trust only the
deployment (:class:`~storyreel.settings.InternalSettings`): a call without the
internal token is UNAUTHENTICATED (:class:`InternalAuthInterceptor`), and with
mutual TLS configured the port wants a client certificate signed by the
deployment's CA. Health and reflection stay open to probes. With neither a token
nor mTLS a service listens on a loopback address only (one machine, ``storyreel
serve``); anywhere else it refuses to start (:class:`ConfigurationError`).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import hashlib
import hmac
import inspect
import logging
import signal
import traceback
import uuid
from dataclasses import dataclass

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as reflection_v1alpha_pb2

from storyreel.errors import InvalidInput, StoryreelError
from storyreel.ids import is_job_id, shown
from storyreel.logs import job_id_var
from storyreel.settings import InternalSettings, ServiceSettings, is_loopback_host

log = logging.getLogger(__name__)


class Service(abc.ABC):
    """One gRPC service: its servicers plus the model it needs loaded."""

    #: Full protobuf names of the services added by :meth:`add_to_server`.
    service_names: tuple[str, ...] = ()

    #: An internal service answers only callers inside the deployment (the internal
    #: token, or a client certificate with mutual TLS). Only the public gateway, which
    #: authenticates its callers with API keys, sets this False.
    internal: bool = True

    @abc.abstractmethod
    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Add the servicer(s) to ``server``."""

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """Extra interceptors, run after the error interceptor (e.g. authentication)."""
        return []

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS credentials for the port; None serves plaintext."""
        return None

    async def serve_beside(self, running: RunningServer) -> None:  # noqa: B027 - optional hook
        """The gRPC port listens: start what the service serves beside it (the gateway's web
        port). An OSError stops the server: the service cannot start."""

    async def load(self) -> None:  # noqa: B027 - optional hook
        """Load models and check dependencies. Health is SERVING once this returns."""

    async def drain(self) -> None:  # noqa: B027 - optional hook
        """The server is stopping: health says NOT_SERVING and calls in flight drain."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release models and connections after the server stopped."""


#: Longest error message a caller gets or a log line carries; the middle of a longer
#: one is cut (its start says what failed, its end often why).
MAX_MESSAGE_CHARS = 1000
#: Longest traceback logged for a crash (each line is cut to MAX_MESSAGE_CHARS too).
MAX_TRACEBACK_CHARS = 20_000


def bounded(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text``, with its middle cut out when it is longer than ``limit``."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}...({len(text) - 2 * half} characters cut)...{text[-half:]}"


def _bounded_traceback(exc: BaseException) -> str:
    lines = traceback.format_exception(exc)
    text = "".join(bounded(line) for line in lines)
    return bounded(text, MAX_TRACEBACK_CHARS)


def _job_id_from(request: object, context: grpc.aio.ServicerContext) -> str | None:
    """The job id a request names, for the logs: cut to a bounded size if it is no id."""
    job_id = getattr(request, "job_id", None)
    if not job_id or not isinstance(job_id, str):
        for key, value in context.invocation_metadata() or ():
            if key == "x-job-id":
                job_id = value
                break
    if not job_id or not isinstance(job_id, str):
        return None
    return job_id if is_job_id(job_id) else shown(job_id)


async def _abort_for(exc: BaseException, context: grpc.aio.ServicerContext, method: str) -> None:
    if isinstance(exc, StoryreelError):
        message = bounded(exc.message)
        log.info("%s failed: %s: %s", method, exc.status, message)
        await context.abort(grpc.StatusCode[exc.status], message)
    ref = uuid.uuid4().hex[:12]
    # The traceback is logged cut to a bounded size: an exception's message may carry
    # whatever the caller sent.
    log.error(
        "%s crashed (ref %s): %s",
        method,
        ref,
        bounded(f"{type(exc).__name__}: {exc}"),
        extra={"traceback": _bounded_traceback(exc)},
    )
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (ref {ref}); see server logs")


#: The four kinds of gRPC method: the handler's attribute, whether the client streams its
#: requests, whether the server streams its answers, and what makes a handler of the kind.
_METHOD_KINDS = (
    ("unary_unary", False, False, grpc.unary_unary_rpc_method_handler),
    ("unary_stream", False, True, grpc.unary_stream_rpc_method_handler),
    ("stream_unary", True, False, grpc.stream_unary_rpc_method_handler),
    ("stream_stream", True, True, grpc.stream_stream_rpc_method_handler),
)


def rewrapped_handler(handler: grpc.RpcMethodHandler, wrap, request_deserializer=None):
    """A handler of ``handler``'s kind whose behaviour is ``wrap(behaviour, takes_stream,
    gives_stream)``: the one place that tells the four kinds of method apart.

    It keeps ``handler``'s serializers, its request deserializer replaced by
    ``request_deserializer`` when that is given. A handler of no kind comes back as it is.
    """
    deserializer = request_deserializer or handler.request_deserializer
    for kind, takes_stream, gives_stream, make in _METHOD_KINDS:
        behaviour = getattr(handler, kind)
        if behaviour:
            return make(
                wrap(behaviour, takes_stream, gives_stream),
                deserializer,
                handler.response_serializer,
            )
    return handler


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps domain errors to status codes and tags logs with the job id.

    Servicers never set status codes by hand: they raise a
    :class:`~storyreel.errors.StoryreelError`. Any other exception becomes
    INTERNAL with a reference to the server log, never a traceback. Messages are
    cut to :data:`MAX_MESSAGE_CHARS`.
    """

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        passthrough = (grpc.aio.AbortError, asyncio.CancelledError)

        @contextlib.asynccontextmanager
        async def guarded(job_id: str | None, context):
            token = job_id_var.set(job_id)
            try:
                yield
            except passthrough:
                raise
            except Exception as exc:
                await _abort_for(exc, context, method)
            finally:
                job_id_var.reset(token)

        def wrap(inner, takes_stream: bool, gives_stream: bool):
            def job_id(request, context) -> str | None:
                return None if takes_stream else _job_id_from(request, context)

            if gives_stream and inspect.isasyncgenfunction(inner):

                async def generated(request, context):
                    async with guarded(job_id(request, context), context):
                        async for response in inner(request, context):
                            yield response

                return generated

            # One answer, or a stream written with context.write (health Watch, say).
            async def awaited(request, context):
                async with guarded(job_id(request, context), context):
                    return await inner(request, context)

            return awaited

        return rewrapped_handler(handler, wrap)


class ConfigurationError(ValueError):
    """The service cannot start as configured (the message says why and what to set)."""


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    await context.abort(code, message)


def refusing_handler(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str, *, abort=_abort
):
    """A handler of the same kind as ``handler`` that answers every call with ``code``.

    It keeps ``handler``'s deserializer (an inner :class:`DecodingInterceptor`'s tolerant
    one), so a refused call is refused for what it is, whatever its message holds.
    ``abort(context, code, message)`` ends each call (``context.abort`` unless given).
    """

    async def refuse(request, context):
        await abort(context, code, message)

    async def refuse_stream(request, context):
        await abort(context, code, message)
        yield  # pragma: no cover - makes this an async generator

    return rewrapped_handler(
        handler,
        lambda _behaviour, _takes_stream, gives_stream: refuse_stream if gives_stream else refuse,
    )


#: Services an internal server answers without the token: probes (Kubernetes, Docker)
#: cannot send it, and reflection describes only the contracts, which are public.
OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }
)


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


class InternalAuthInterceptor(grpc.aio.ServerInterceptor):
    """Lets through only calls that carry the deployment's internal token.

    The token travels as ``authorization: Bearer <token>`` (the gateway's channels add it,
    :mod:`storyreel.channels`). It is compared in constant time (as SHA-256 digests, so
    not even its length leaks) and never logged. A call with no token, a wrong one or two
    ``authorization`` headers is UNAUTHENTICATED before its message is decoded or any
    work starts. :data:`OPEN_SERVICES` (health, reflection) need no token.
    """

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the internal token must not be empty")
        self._expected = _digest(token)

    def _problem(self, metadata) -> str | None:
        values = [value for key, value in metadata or () if key == "authorization"]
        if not values:
            return "no internal token"
        if len(values) > 1:
            return "more than one authorization header"
        value = values[0]
        if not isinstance(value, str):
            return "a malformed authorization header"
        scheme, _, presented = value.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return "an authorization header that is not a bearer token"
        if not hmac.compare_digest(_digest(presented.strip()), self._expected):
            return "a wrong internal token"
        return None

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.lstrip("/").split("/", 1)[0] in OPEN_SERVICES:
            return handler
        problem = self._problem(handler_call_details.invocation_metadata)
        if problem is None:
            return handler
        log.warning("refused a call with %s", problem, extra={"method": bounded(method, 200)})
        return refusing_handler(
            handler,
            grpc.StatusCode.UNAUTHENTICATED,
            f"this internal service answers only the storyreel gateway: the call carries "
            f"{problem} (STORYREEL_INTERNAL_TOKEN)",
        )


def internal_trust(settings: ServiceSettings, internal: InternalSettings | None):
    """The interceptors and port credentials an internal service needs.

    Raises :class:`ConfigurationError` when the settings cannot be read, or when the
    service would listen beyond the loopback with neither a token nor mutual TLS.
    """
    if internal is None:
        try:
            internal = InternalSettings()
        except ValueError as exc:  # pydantic's ValidationError; it never shows the token
            raise ConfigurationError(f"internal settings: {exc}") from None
    if not internal.authenticates and not is_loopback_host(settings.host):
        raise ConfigurationError(
            f"refusing to listen on {settings.host}: this internal service would answer "
            "anyone who reaches it. Set STORYREEL_INTERNAL_TOKEN_FILE (or "
            "STORYREEL_INTERNAL_TOKEN) to the deployment's internal token, as on the "
            "gateway (and optionally mutual TLS with STORYREEL_INTERNAL_TLS_CA_FILE, "
            "..._CERT_FILE and ..._KEY_FILE), or listen on 127.0.0.1 only"
        )
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if internal.token_value:
        interceptors.append(InternalAuthInterceptor(internal.token_value))
    credentials = None
    if internal.tls:
        try:
            ca, cert, key = internal.tls_files()
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        credentials = grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=True
        )
    return interceptors, credentials


class _Undecodable:
    """Stands in for a request message that could not be decoded."""

    __slots__ = ("type_name",)

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name

    def error(self) -> InvalidInput:
        return InvalidInput(f"malformed request: the bytes are not a valid {self.type_name}")


def _tolerant(deserializer):
    """``deserializer``, returning an :class:`_Undecodable` instead of raising."""
    if deserializer is None:
        return None
    message_class = getattr(deserializer, "__self__", None)
    descriptor = getattr(message_class, "DESCRIPTOR", None)
    type_name = getattr(descriptor, "full_name", "request message")

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception:  # DecodeError, or anything else a parser may raise
            return _Undecodable(type_name)

    return deserialize


async def _checked_stream(request_iterator):
    async for message in request_iterator:
        if isinstance(message, _Undecodable):
            raise message.error()
        yield message


class DecodingInterceptor(grpc.aio.ServerInterceptor):
    """The innermost interceptor: an undecodable message answers INVALID_ARGUMENT.

    gRPC itself answers UNKNOWN ("Unexpected <class DecodeError>") before any
    interceptor's behaviour runs, so before authentication. Here the handler's
    deserializer is wrapped so that a message it cannot decode becomes a
    stand-in, and the behaviour, which runs only once the outer interceptors
    (authentication included) let the call through, refuses it.
    """

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None

        def checked(inner, takes_stream: bool, gives_stream: bool):
            def call(request, context):
                if takes_stream:
                    return inner(_checked_stream(request), context)
                if isinstance(request, _Undecodable):
                    raise request.error()
                return inner(request, context)

            if gives_stream and inspect.isasyncgenfunction(inner):

                async def generated(request, context):
                    async for response in call(request, context):
                        yield response

                return generated

            async def awaited(request, context):
                return await call(request, context)

            return awaited

        return rewrapped_handler(handler, checked, _tolerant(handler.request_deserializer))


class HealthServicer(health.aio.HealthServicer):
    """The standard health service, with the List method the aio servicer lacks."""

    #: The most services List reports; more answers RESOURCE_EXHAUSTED (as grpc-go does).
    MAX_LISTED = 100

    async def List(self, request, context):
        statuses = dict(self._server_status)
        if len(statuses) > self.MAX_LISTED:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server health list exceeds maximum capacity: {self.MAX_LISTED}",
            )
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in statuses.items()
            }
        )


#: The standard name of server reflection, beside the older v1alpha one.
REFLECTION_V1_SERVICE = "grpc.reflection.v1.ServerReflection"
_REFLECTION_V1_FILE = "grpc/reflection/v1/reflection.proto"


def _add_reflection_v1_descriptor() -> None:
    """Put grpc.reflection.v1 in the default descriptor pool, so reflection describes it.

    grpcio-reflection ships only v1alpha. v1 is the same file under another package:
    the same messages with the same field numbers, so the same bytes on the wire.
    """
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_REFLECTION_V1_FILE)
        return
    except KeyError:
        pass
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    file = descriptor_pb2.FileDescriptorProto()
    reflection_v1alpha_pb2.DESCRIPTOR.CopyToProto(file)
    file.name = _REFLECTION_V1_FILE
    file.package = "grpc.reflection.v1"
    file.ClearField("options")

    def rename(messages) -> None:
        for message in messages:
            for field in message.field:
                if field.type_name.startswith(old):
                    field.type_name = new + field.type_name[len(old) :]
            rename(message.nested_type)

    rename(file.message_type)
    for service in file.service:
        for method in service.method:
            method.input_type = new + method.input_type[len(old) :]
            method.output_type = new + method.output_type[len(old) :]
    pool.AddSerializedFile(file.SerializeToString())


def _enable_reflection(server: grpc.aio.Server, service_names: tuple[str, ...]) -> None:
    """Serve reflection under v1 and v1alpha, with one servicer."""
    _add_reflection_v1_descriptor()
    names = (*service_names, REFLECTION_V1_SERVICE, reflection.SERVICE_NAME)
    servicer = reflection.aio.ReflectionServicer(names)
    from grpc_reflection.v1alpha import reflection_pb2_grpc

    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                REFLECTION_V1_SERVICE,
                {
                    "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                        servicer.ServerReflectionInfo,
                        request_deserializer=(
                            reflection_v1alpha_pb2.ServerReflectionRequest.FromString
                        ),
                        response_serializer=(
                            reflection_v1alpha_pb2.ServerReflectionResponse.SerializeToString
                        ),
                    )
                },
            ),
        )
    )


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: HealthServicer
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


async def create_server(
    settings: ServiceSettings, service: Service, *, internal: InternalSettings | None = None
) -> RunningServer:
    """Build, bind and start the server; health stays NOT_SERVING until :meth:`load`.

    With ``settings.port == 0`` a free port is bound: handy for tests. A port that
    another server holds is an OSError saying so (the port is never shared). An
    internal service (:attr:`Service.internal`) trusts ``internal``, or the
    ``STORYREEL_INTERNAL_*`` settings when it is None; :class:`ConfigurationError`
    when they leave it open beyond the loopback.
    """
    trust: list[grpc.aio.ServerInterceptor] = []
    credentials = service.server_credentials()
    if service.internal:
        trust, internal_credentials = internal_trust(settings, internal)
        credentials = internal_credentials or credentials
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # gRPC sets SO_REUSEPORT by default, so a second server could bind a port in
        # use and take half its connections. Binding a port in use must fail instead.
        ("grpc.so_reuseport", 0),
        ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
        ("grpc.max_connection_idle_ms", int(settings.max_connection_idle_s * 1000)),
        # Ping idle connections to find dead peers; let clients ping as often as every
        # min_client_ping_interval_s, with or without calls in flight.
        ("grpc.keepalive_time_ms", int(settings.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        (
            "grpc.http2.min_recv_ping_interval_without_data_ms",
            int(settings.min_client_ping_interval_s * 1000),
        ),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    server = grpc.aio.server(
        # Outermost first: errors mapped, then the internal token, the service's own
        # interceptors, and innermost the decoding (so a malformed message is refused
        # only once the caller is known).
        interceptors=[
            ErrorInterceptor(),
            *trust,
            *service.interceptors(),
            DecodingInterceptor(),
        ],
        options=options,
    )
    service.add_to_server(server)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    _enable_reflection(server, (*service.service_names, health.SERVICE_NAME))
    address = f"{settings.host}:{settings.port}"
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError:  # grpc's "Failed to bind to address ..."
        port = 0
    if port == 0:
        raise OSError(
            f"cannot listen on {address}: the port is in use by another process, "
            "or the address is not one of this machine's"
        )
    await server.start()
    running = RunningServer(server, port, health_servicer, service)
    await running.set_serving(False)
    try:
        await service.serve_beside(running)
    except BaseException:
        await server.stop(0)
        raise
    return running


async def start_and_load(
    settings: ServiceSettings, service: Service, *, internal: InternalSettings | None = None
) -> RunningServer:
    """Start the server, load the model, then report SERVING (for in-process use)."""
    running = await create_server(settings, service, internal=internal)
    await service.load()
    await running.set_serving(True)
    return running


async def serve(settings: ServiceSettings, service: Service) -> int:
    """Run ``service`` until SIGTERM/SIGINT; returns the process exit code."""
    try:
        running = await create_server(settings, service)
    except (OSError, ConfigurationError) as exc:
        log.error("%s", exc, extra={"host": settings.host, "port": settings.port})
        return 1
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
