"""The gateway's web port: the studio page and the public API for browsers (gRPC-Web).

One HTTP port beside the gRPC port serves two things:

* ``POST /storyreel.gateway.v1.StoryReelService/<Method>``: the public API in the gRPC-Web
  protocol (and the Connect protocol), binary protobuf, as browsers speak it. The
  protocols are handled by ``connectrpc``; every call is then *forwarded* to the gateway's
  own gRPC server, over a private Unix socket of this process, with the caller's
  ``authorization`` header as its metadata. So a call through the bridge meets exactly
  the interceptors and servicer of a native call: the same API keys, validation, status
  codes and messages, the same message size limits. Nothing of the API is implemented
  here.
* ``GET /`` and ``GET /<file>``: the files of the ``studio/`` folder beside this module
  (``/`` is ``index.html``), with a Content-Security-Policy that allows only same-origin
  scripts, styles and connections. No listing; a path outside the folder is 404.

Browsers: same origin only. No CORS header is ever sent, and an API call whose ``Origin``
is not this page's own origin is refused (403) before it is forwarded. On a loopback
address, only a loopback ``Host`` is answered (a page from elsewhere cannot reach the
port by rebinding its own name to 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import ssl
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import uvicorn
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.method import IdempotencyLevel, MethodInfo, StreamType
from connectrpc.request import RequestContext
from connectrpc.server import ConnectASGIApplication, Endpoint

from storyreel.gateway.v1 import gateway_pb2
from storyreel.settings import is_loopback_host

log = logging.getLogger(__name__)

#: The public service, as its descriptor names it.
SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["StoryReelService"]
#: Where the API answers on the web port: ``/<package>.<Service>/<Method>``, as gRPC-Web and
#: Connect clients call it with the page's origin as their base URL.
API_PREFIX = f"/{SERVICE.full_name}/"
#: The folder whose files the web port serves.
STUDIO_DIR = Path(__file__).parent / "studio"

#: Request headers that reach the gateway's gRPC server as metadata. The browser's other
#: headers (cookies, user agent, fetch metadata) mean nothing to the API and stay here.
FORWARDED_HEADERS = ("authorization", "x-job-id")

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "img-src 'self' blob: data:",
        "media-src 'self' blob: data:",
        "font-src 'self'",
        "manifest-src 'self'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)
#: Headers of every answer of the web port.
SECURITY_HEADERS = (
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("cross-origin-opener-policy", "same-origin"),
    ("cross-origin-resource-policy", "same-origin"),
)
#: Headers of the studio's files besides SECURITY_HEADERS.
PAGE_HEADERS = (
    ("content-security-policy", CONTENT_SECURITY_POLICY),
    ("x-frame-options", "DENY"),
    # Always revalidated: a new version of the page is seen at the next load.
    ("cache-control", "no-cache"),
)

#: Content types by file suffix; any other file is sent as application/octet-stream.
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".webmanifest": "application/manifest+json",
    ".txt": "text/plain; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".ico": "image/x-icon",
    ".woff": "font/woff",
    ".woff2": "font/woff2",
    ".wasm": "application/wasm",
}

#: gRPC status -> Connect code (the same numbers; the names differ in one spelling).
_CODES = {
    status: Code.CANCELED if status == grpc.StatusCode.CANCELLED else Code[status.name]
    for status in grpc.StatusCode
    if status != grpc.StatusCode.OK
}

_STREAM_TYPES = {
    (False, False): StreamType.UNARY,
    (False, True): StreamType.SERVER_STREAM,
    (True, False): StreamType.CLIENT_STREAM,
    (True, True): StreamType.BIDI_STREAM,
}


class _Passthrough:
    """The ``proto`` codec, leaving messages as the bytes they are.

    The bridge never decodes a message: the gateway's server does, so a malformed one is
    refused there, with its status and message (after authentication, as natively).
    """

    def name(self) -> str:
        return "proto"

    def encode(self, message: bytes) -> bytes:
        return bytes(message)

    def decode(self, data: bytes | bytearray, message_class: type) -> bytes:
        return bytes(data)


def _metadata(ctx: RequestContext) -> tuple[tuple[str, str], ...]:
    """The call's metadata: every value of each forwarded header, in order."""
    return tuple(
        (key.lower(), value)
        for key, value in ctx.request_headers.allitems()
        if key.lower() in FORWARDED_HEADERS
    )


def _timeout(ctx: RequestContext) -> float | None:
    remaining = ctx.timeout_ms
    return None if remaining is None else max(remaining, 0.0) / 1000


def _error(error: grpc.aio.AioRpcError) -> ConnectError:
    code = error.code()
    return ConnectError(_CODES.get(code, Code.UNKNOWN), error.details() or "")


class _Forwarder:
    """Calls each method on the gateway's gRPC server, bytes in, bytes out."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel

    def endpoint(self, method) -> Endpoint:
        path = f"/{SERVICE.full_name}/{method.name}"
        info = MethodInfo(
            name=method.name,
            service_name=SERVICE.full_name,
            input=bytes,
            output=bytes,
            idempotency_level=IdempotencyLevel.UNKNOWN,
            stream_type=_STREAM_TYPES[(method.client_streaming, method.server_streaming)],
        )
        channel = self.channel

        async def unary(request: bytes, ctx: RequestContext) -> bytes:
            call = channel.unary_unary(path)
            try:
                return await call(request, metadata=_metadata(ctx), timeout=_timeout(ctx))
            except grpc.aio.AioRpcError as exc:
                raise _error(exc) from None

        async def server_stream(request: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
            call = channel.unary_stream(path)(
                request, metadata=_metadata(ctx), timeout=_timeout(ctx)
            )
            try:
                async for response in call:
                    yield response
            except grpc.aio.AioRpcError as exc:
                raise _error(exc) from None
            finally:
                call.cancel()  # the browser went away: the gateway's call ends too

        async def client_stream(requests: AsyncIterator[bytes], ctx: RequestContext) -> bytes:
            call = channel.stream_unary(path)
            try:
                return await call(requests, metadata=_metadata(ctx), timeout=_timeout(ctx))
            except grpc.aio.AioRpcError as exc:
                raise _error(exc) from None

        async def bidi_stream(
            requests: AsyncIterator[bytes], ctx: RequestContext
        ) -> AsyncIterator[bytes]:
            call = channel.stream_stream(path)(
                requests, metadata=_metadata(ctx), timeout=_timeout(ctx)
            )
            try:
                async for response in call:
                    yield response
            except grpc.aio.AioRpcError as exc:
                raise _error(exc) from None
            finally:
                call.cancel()

        match info.stream_type:
            case StreamType.UNARY:
                return Endpoint.unary(info, unary)
            case StreamType.SERVER_STREAM:
                return Endpoint.server_stream(info, server_stream)
            case StreamType.CLIENT_STREAM:
                return Endpoint.client_stream(info, client_stream)
            case _:
                return Endpoint.bidi_stream(info, bidi_stream)

    def endpoints(self) -> dict[str, Endpoint]:
        return {f"{API_PREFIX}{m.name}": self.endpoint(m) for m in SERVICE.methods}


class GatewayBridge(ConnectASGIApplication):
    """gRPC-Web and Connect (binary) for every method of StoryReelService, forwarded."""

    def __init__(self, channel: grpc.aio.Channel, max_message_bytes: int) -> None:
        endpoints = _Forwarder(channel).endpoints()
        super().__init__(
            service=channel,
            endpoints=lambda _service: endpoints,
            # The gateway's own limit, checked before a larger message is buffered.
            read_max_bytes=max_message_bytes,
            codecs=[_Passthrough()],
        )

    @property
    def path(self) -> str:
        return f"/{SERVICE.full_name}"


def _header(scope: Mapping, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def _answer(send, status: int, headers=(), body: bytes = b"", *, head: bool = False):
    all_headers = [
        *SECURITY_HEADERS,
        *headers,
        ("content-length", str(len(body))),
    ]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(k.encode(), v.encode()) for k, v in all_headers],
        }
    )
    await send({"type": "http.response.body", "body": b"" if head else body})


async def _refuse(send, status: int, text: str, extra=()) -> None:
    await _answer(
        send,
        status,
        (("content-type", "text/plain; charset=utf-8"), ("cache-control", "no-store"), *extra),
        text.encode() + b"\n",
    )


def studio_file(root: Path, path: str) -> Path | None:
    """The file of ``root`` that the URL path ``path`` (already %-decoded) names, or None.

    ``/`` is ``index.html``. Only regular files inside ``root`` (after following links)
    are given; no segment may be empty, ``.``, ``..`` or start with a dot, and a path with
    a backslash or a NUL names nothing.
    """
    if path == "/":
        path = "/index.html"
    if not path.startswith("/") or "\\" in path or "\x00" in path:
        return None
    parts = path[1:].split("/")
    if any(not part or part.startswith(".") for part in parts):
        return None
    base = root.resolve()
    try:
        candidate = base.joinpath(*parts).resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    if not candidate.is_relative_to(base) or not candidate.is_file():
        return None
    return candidate


@dataclass
class WebApp:
    """The ASGI application of the web port: the API bridge and the studio's files."""

    bridge: GatewayBridge
    root: Path = STUDIO_DIR
    #: Only these host names are answered (``Host`` header); empty: any.
    allowed_hosts: frozenset[str] = frozenset()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return
        if scope["type"] != "http":
            return  # websockets: nothing here speaks them
        send = _with_headers(send)
        host = _header(scope, b"host") or ""
        if self.allowed_hosts and _host_name(host) not in self.allowed_hosts:
            await _refuse(send, 403, "unexpected Host: this port answers only on loopback")
            return
        path = scope["path"]
        method = scope["method"]
        if path.startswith(API_PREFIX):
            if method != "POST":
                await _refuse(send, 405, "API calls are POST", (("allow", "POST"),))
                return
            content_type = (_header(scope, b"content-type") or "").lower()
            if content_type.startswith("application/grpc") and not content_type.startswith(
                "application/grpc-web"
            ):
                # Native gRPC needs HTTP/2 and trailers: it has the gRPC port.
                await _refuse(send, 415, "native gRPC is served on the gateway's gRPC port")
                return
            origin = _header(scope, b"origin")
            if origin is not None and not _same_origin(origin, host):
                await _refuse(send, 403, "cross-origin API calls are not allowed")
                return
            await self.bridge(scope, receive, send)
            return
        if method not in ("GET", "HEAD"):
            await _refuse(send, 405, "method not allowed", (("allow", "GET, HEAD"),))
            return
        found = studio_file(self.root, path)
        if found is None:
            await _refuse(send, 404, "not found")
            return
        try:
            body = await asyncio.to_thread(found.read_bytes)
        except OSError:
            await _refuse(send, 404, "not found")
            return
        content_type = CONTENT_TYPES.get(found.suffix.lower(), "application/octet-stream")
        await _answer(
            send,
            200,
            (("content-type", content_type), *PAGE_HEADERS),
            body,
            head=method == "HEAD",
        )


def _with_headers(send):
    """``send``, adding SECURITY_HEADERS to a response that lacks them (the bridge's)."""

    async def sending(message) -> None:
        if message["type"] == "http.response.start":
            present = {k.lower() for k, _ in message.get("headers", ())}
            extra = [
                (k.encode(), v.encode()) for k, v in SECURITY_HEADERS if k.encode() not in present
            ]
            if extra:
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
        await send(message)

    return sending


def _same_origin(origin: str, host: str) -> bool:
    """Whether a page at ``origin`` is the one this ``Host`` serves.

    The scheme is not compared: behind a proxy that terminates TLS (an Ingress), the page
    is ``https://name`` while this port hears plain HTTP for ``Host: name``. The name and
    port are: the scheme's default port when the origin names none.
    """
    try:
        parts = urlsplit(origin)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
        served = urlsplit(f"//{host}")
        served_port = served.port
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path:
        return False
    if served_port is None:  # a Host without a port: the proxy's default for the scheme
        served_port = port if port in (80, 443) else None
    return parts.hostname == served.hostname and port == served_port


def _host_name(host: str) -> str:
    """The name of a Host header, without its port ("[::1]:80" -> "[::1]")."""
    try:
        name = urlsplit(f"//{host}").hostname or ""
    except ValueError:
        return ""
    return f"[{name}]" if ":" in name else name


#: Names a loopback web port answers to.
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})


class _Server(uvicorn.Server):
    """uvicorn, inside the gateway's event loop: the process's signals stay the gateway's."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class WebPort:
    """The web port of one gateway: a uvicorn server in the gateway's event loop, and the
    private socket its calls reach the gateway's gRPC server through."""

    def __init__(self) -> None:
        self._dir: Path | None = None
        self.port = 0
        self.scheme = "http"
        self.host = ""
        self._server: _Server | None = None
        self._task: asyncio.Task | None = None
        self._channel: grpc.aio.Channel | None = None

    @property
    def grpc_address(self) -> str:
        """The address the gateway's gRPC server also listens on, for the bridge only: a
        Unix socket in a folder only this user can enter (mkdtemp makes it 0700)."""
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="storyreel-web-"))
        return f"unix:{self._dir / 'grpc.sock'}"

    @property
    def url(self) -> str:
        host = self.host
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{self.scheme}://{host}:{self.port}/"

    async def start(
        self,
        host: str,
        port: int,
        *,
        max_message_bytes: int,
        tls: tuple[Path, Path] | None = None,
        grace_s: float = 10.0,
        root: Path = STUDIO_DIR,
    ) -> None:
        """Bind ``host:port`` (0: a free port) and serve; OSError when it cannot bind."""
        self._channel = grpc.aio.insecure_channel(
            self.grpc_address,
            options=[
                # The gateway's server enforces its limits; the bridge passes answers on.
                ("grpc.max_receive_message_length", -1),
                ("grpc.max_send_message_length", -1),
                ("grpc.enable_retries", 0),
            ],
        )
        bridge = GatewayBridge(self._channel, max_message_bytes)
        allowed = LOOPBACK_NAMES if is_loopback_host(host) else frozenset()
        app = WebApp(bridge, root, allowed)
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host.strip("[]"), port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            await self.stop()
            raise OSError(
                f"cannot listen on {host}:{port} (STORYREEL_GATEWAY_WEB_PORT): "
                f"{exc.strerror or exc}; the port is in use by another process, or the "
                "address is not one of this machine's"
            ) from None
        sock.setblocking(False)
        self.host = host
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            # Callers are whoever connects: no X-Forwarded-* header is believed.
            proxy_headers=False,
            timeout_graceful_shutdown=max(1, int(grace_s + 0.999)),
            ssl_certfile=str(tls[0]) if tls else None,
            ssl_keyfile=str(tls[1]) if tls else None,
        )
        if tls:
            self.scheme = "https"
        try:
            config.load()
        except (OSError, ssl.SSLError) as exc:
            sock.close()
            await self.stop()
            raise OSError(f"cannot serve TLS on the web port: {exc}") from None
        # uvicorn's own start and stop lines say nothing the gateway's log does not (and
        # carry terminal colours); its warnings and errors still come through.
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise OSError("the web port stopped while starting")
            await asyncio.sleep(0.01)

    def begin_stop(self) -> None:
        """Accept no more connections; answers in flight go on."""
        if self._server is not None:
            self._server.should_exit = True

    async def stop(self) -> None:
        """Stop serving (after the gRPC server stopped, so forwarded calls have ended)."""
        self.begin_stop()
        if self._task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._task
            self._task = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
