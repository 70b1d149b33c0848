"""Client channels to storyreel services.

A channel to an internal service (story, render, compose) carries the deployment's
trust (:class:`~storyreel.settings.InternalSettings`): the internal token on every
call, as ``authorization: Bearer <token>`` metadata, and with mutual TLS this
process's client certificate, the server checked against the deployment's CA.

Retries: these channels have no retry policy. Their caller is the gateway
(:mod:`storyreel_gateway.clients`), and it retries a failed call in one place, its
pipeline (:meth:`storyreel_gateway.pipeline.JobPipeline.run`, bounded by time:
:class:`storyreel.retries.RetryPolicy`), which also covers the streaming calls gRPC
cannot retry once a response has arrived, stops at once when a job is cancelled and
records every retry. A retry policy here as well would multiply the attempts behind
each of the pipeline's. The calls the gateway makes while answering a client (the
composer's voice list and audio probe at admission) are not retried either: the
client is told the service is unavailable or busy and may send again. gRPC's
transparent retries (of a call that never reached the server) stay on.

The command line's channel to the gateway is not made here (:mod:`storyreel.cli`):
it is another caller, a person who sees each failure, and it retries nothing
either, but ``watch`` reconnects to a gateway that restarts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import grpc

from storyreel.settings import InternalSettings

#: Spread calls over every address a name resolves to (dns:///name:port: each replica).
#: No retryPolicy: calls are retried by their caller (see the module's docstring).
SERVICE_CONFIG = {"loadBalancingConfig": [{"round_robin": {}}]}


#: The metadata key that carries the internal token (as ``Bearer <token>``).
INTERNAL_TOKEN_HEADER = "authorization"


def internal_metadata(internal: InternalSettings | None) -> tuple[tuple[str, str], ...]:
    """The metadata that proves a call comes from inside the deployment (may be empty)."""
    token = internal.token_value if internal is not None else None
    return ((INTERNAL_TOKEN_HEADER, f"Bearer {token}"),) if token else ()


def internal_channel_credentials(
    internal: InternalSettings | None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials with this process's client certificate; None without mutual TLS."""
    if internal is None or not internal.tls:
        return None
    ca, cert, key = internal.tls_files()
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


def _with_metadata(details: grpc.aio.ClientCallDetails, extra: Sequence[tuple[str, str]]):
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    for key, value in extra:
        # The call's own value of the header never travels beside ours.
        metadata.set_all(key, [value])
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _MetadataUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, extra: Sequence[tuple[str, str]]) -> None:
        self._extra = extra

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_with_metadata(client_call_details, self._extra), request)


class _MetadataUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, extra: Sequence[tuple[str, str]]) -> None:
        self._extra = extra

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(_with_metadata(client_call_details, self._extra), request)


class _MetadataStreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, extra: Sequence[tuple[str, str]]) -> None:
        self._extra = extra

    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(
            _with_metadata(client_call_details, self._extra), request_iterator
        )


class _MetadataStreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, extra: Sequence[tuple[str, str]]) -> None:
        self._extra = extra

    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(
            _with_metadata(client_call_details, self._extra), request_iterator
        )


def metadata_interceptors(
    extra: Sequence[tuple[str, str]],
) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that add ``extra`` to the metadata of every call, of all four
    kinds (grpc.aio files an interceptor under one kind only, so there is one per kind).

    Interceptors rather than call credentials: gRPC sends call credentials over TLS only,
    and the token must travel on plaintext channels too (inside a cluster without mTLS).
    """
    extra = tuple(extra)
    if not extra:
        return []
    return [
        _MetadataUnaryUnary(extra),
        _MetadataUnaryStream(extra),
        _MetadataStreamUnary(extra),
        _MetadataStreamStream(extra),
    ]


def open_channel(
    address: str,
    *,
    max_message_bytes: int = 4 * 1024 * 1024,
    internal: InternalSettings | None = None,
) -> grpc.aio.Channel:
    """An aio channel to ``address`` (host:port, or dns:///name:port for every replica).

    With ``internal``, every call carries its token and, when it configures mutual TLS,
    the channel speaks TLS with this process's client certificate. A failed call is
    not retried (see the module's docstring).
    """
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
    ]
    interceptors = metadata_interceptors(internal_metadata(internal)) or None
    credentials = internal_channel_credentials(internal)
    if credentials is not None:
        return grpc.aio.secure_channel(
            address, credentials, options=options, interceptors=interceptors
        )
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
