"""Trust between the services: the internal token, mutual TLS, and where a service may listen.

Real servers on real ports, built by storyreel.serving like every service; the one
here (``Echo``) stands in for the story, render and composer services, whose own
tests (tests/llm, tests/diffusion, tests/composer) call them the same way.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from support import make_internal_tls

from storyreel.channels import open_channel
from storyreel.serving import ConfigurationError, Service, create_server, serve
from storyreel.settings import InternalSettings, ServiceSettings

TOKEN = "internal-token-for-tests-0123456789"
ECHO = "storyreel.test.v1.Echo"
Request = health_pb2.HealthCheckRequest
Response = health_pb2.HealthCheckResponse


class Echo(Service):
    """An internal service with a unary and a server-streaming method, and nothing to load."""

    service_names = (ECHO,)

    def __init__(self) -> None:
        self.calls = 0

    def add_to_server(self, server: grpc.aio.Server) -> None:
        async def say(request, context):
            self.calls += 1
            return Response(status=Response.SERVING)

        async def stream(request, context):
            self.calls += 1
            for _ in range(2):
                yield Response(status=Response.SERVING)

        handlers = {
            "Say": grpc.unary_unary_rpc_method_handler(
                say, Request.FromString, Response.SerializeToString
            ),
            "Stream": grpc.unary_stream_rpc_method_handler(
                stream, Request.FromString, Response.SerializeToString
            ),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ECHO, handlers),))


def settings(host: str = "127.0.0.1") -> ServiceSettings:
    return ServiceSettings(host=host, port=0)


@pytest.fixture(autouse=True)
def no_internal_settings_from_the_environment(monkeypatch):
    for name in ("TOKEN", "TOKEN_FILE", "TLS_CA_FILE", "TLS_CERT_FILE", "TLS_KEY_FILE"):
        monkeypatch.delenv(f"STORYREEL_INTERNAL_{name}", raising=False)


@pytest.fixture
async def start():
    """``start(service, host=..., internal=...)``: a started server, stopped at the end."""
    started = []

    async def start_(service=None, host="127.0.0.1", **kwargs):
        running = await create_server(settings(host), service or Echo(), **kwargs)
        started.append(running)
        return running

    yield start_
    for running in started:
        await running.stop(0)


def address(running) -> str:
    return f"127.0.0.1:{running.port}"


async def say(channel: grpc.aio.Channel, metadata=(), data: bytes | None = None) -> Response:
    if data is not None:
        call = channel.unary_unary(f"/{ECHO}/Say")
        return await call(data, metadata=metadata, timeout=10)
    call = channel.unary_unary(
        f"/{ECHO}/Say",
        request_serializer=Request.SerializeToString,
        response_deserializer=Response.FromString,
    )
    return await call(Request(), metadata=metadata, timeout=10)


async def stream(channel: grpc.aio.Channel, metadata=()) -> list[Response]:
    call = channel.unary_stream(
        f"/{ECHO}/Stream",
        request_serializer=Request.SerializeToString,
        response_deserializer=Response.FromString,
    )
    return [r async for r in call(Request(), metadata=metadata, timeout=10)]


async def refused(make_call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await make_call()
    return caught.value


# --- the token -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "metadata", "problem"),
    [
        ("none", (), "no internal token"),
        ("wrong", (("authorization", "Bearer not-the-internal-token-at-all"),), "wrong"),
        ("not bearer", (("authorization", f"Basic {TOKEN}"),), "not a bearer token"),
        (
            "two headers",
            (("authorization", f"Bearer {TOKEN}"), ("authorization", f"Bearer {TOKEN}")),
            "more than one authorization header",
        ),
    ],
)
async def test_a_call_without_the_token_is_unauthenticated(
    start, monkeypatch, caplog, name, metadata, problem
):
    # The token comes from the environment, as in a deployment (STORYREEL_INTERNAL_TOKEN).
    monkeypatch.setenv("STORYREEL_INTERNAL_TOKEN", TOKEN)
    service = Echo()
    running = await start(service)
    caplog.set_level(logging.INFO)
    async with grpc.aio.insecure_channel(address(running)) as channel:
        for make_call in (lambda: say(channel, metadata), lambda: stream(channel, metadata)):
            error = await refused(make_call)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, name
            assert problem in error.details()
            assert "answers only the storyreel gateway" in error.details()
    assert service.calls == 0
    # Neither the token nor what the caller presented reaches the log.
    assert TOKEN not in caplog.text
    assert "not-the-internal-token-at-all" not in caplog.text
    assert "refused a call" in caplog.text


async def test_the_token_from_a_file_gets_calls_of_every_kind_through(start, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(f"  {TOKEN}\n")  # as `kubectl create secret --from-file` leaves it
    internal = InternalSettings(token_file=token_file)
    assert internal.token_value == TOKEN
    service = Echo()
    running = await start(service, internal=internal)
    async with open_channel(address(running), internal=internal) as channel:
        assert (await say(channel)).status == Response.SERVING
        assert len(await stream(channel)) == 2
        # A call's own authorization header never travels beside the channel's.
        assert (await say(channel, (("authorization", "Bearer x"),))).status == Response.SERVING
    assert service.calls == 3


async def test_a_malformed_message_is_refused_for_the_missing_token_first(start):
    running = await start(internal=InternalSettings(token=TOKEN))
    async with grpc.aio.insecure_channel(address(running)) as channel:
        error = await refused(lambda: say(channel, data=b"\xff\xff\xff"))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        error = await refused(
            lambda: say(channel, (("authorization", f"Bearer {TOKEN}"),), data=b"\xff\xff\xff")
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed request" in error.details()


async def test_health_and_reflection_stay_open_without_the_token(start):
    running = await start(internal=InternalSettings(token=TOKEN))
    async with grpc.aio.insecure_channel(address(running)) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING
        await running.set_serving(True)
        answer = await health.Check(health_pb2.HealthCheckRequest(service=ECHO), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        listed = await health.List(health_pb2.HealthListRequest(), timeout=10)
        assert ECHO in listed.statuses
        for version in ("v1", "v1alpha"):
            reflect = channel.stream_stream(
                f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            responses = [r async for r in reflect(iter([request]), timeout=10)]
            names = {s.name for s in responses[0].list_services_response.service}
            assert ECHO in names, version


async def test_a_loopback_service_without_a_token_is_the_single_machine_default(start):
    # `storyreel serve` on one machine before LocalStack made up a token: open.
    running = await start()
    async with grpc.aio.insecure_channel(address(running)) as channel:
        assert (await say(channel)).status == Response.SERVING


# --- where a service may listen ----------------------------------------------------------


async def test_a_service_beyond_the_loopback_without_a_token_refuses_to_start(start, caplog):
    for host in ("0.0.0.0", "::"):
        with pytest.raises(ConfigurationError) as caught:
            await start(host=host)
        message = str(caught.value)
        assert f"refusing to listen on {host}" in message
        assert "STORYREEL_INTERNAL_TOKEN_FILE" in message
    # As a process: serve() says so and exits with 1 before binding anything (instead of
    # serving until SIGTERM).
    caplog.set_level(logging.ERROR)
    assert await asyncio.wait_for(serve(settings("0.0.0.0"), Echo()), timeout=30) == 1
    assert "refusing to listen on 0.0.0.0" in caplog.text


async def test_a_service_beyond_the_loopback_starts_with_a_token(start):
    running = await start(host="0.0.0.0", internal=InternalSettings(token=TOKEN))
    async with grpc.aio.insecure_channel(address(running)) as channel:
        error = await refused(lambda: say(channel))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_the_public_gateway_is_no_internal_service(start):
    # The gateway authenticates its callers with API keys: no internal token on its port.
    class Public(Echo):
        internal = False

    running = await start(Public(), internal=InternalSettings(token=TOKEN))
    async with grpc.aio.insecure_channel(address(running)) as channel:
        assert (await say(channel)).status == Response.SERVING


# --- mutual TLS ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return make_internal_tls(tmp_path_factory.mktemp("internal-tls"))


@pytest.fixture(scope="module")
def foreign_tls(tmp_path_factory):
    """A certificate from another CA: not the deployment's."""
    return make_internal_tls(tmp_path_factory.mktemp("foreign-tls"), "someone-else")


def mtls(tls, token: str = TOKEN) -> InternalSettings:
    return InternalSettings(
        token=token, tls_ca_file=tls.ca, tls_cert_file=tls.cert, tls_key_file=tls.key
    )


async def test_with_mutual_tls_only_clients_with_the_deployments_certificate_get_in(
    start, tls, foreign_tls
):
    service = Echo()
    running = await start(service, host="0.0.0.0", internal=mtls(tls))
    target = f"localhost:{running.port}"
    ca = tls.ca.read_bytes()

    async def outcome(channel: grpc.aio.Channel, metadata=()) -> grpc.StatusCode:
        try:
            await say(channel, metadata)
        except grpc.aio.AioRpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    token = (("authorization", f"Bearer {TOKEN}"),)
    # Plaintext, TLS without a client certificate, a certificate of another CA: the
    # handshake fails, whatever the call carries.
    async with grpc.aio.insecure_channel(target) as channel:
        assert await outcome(channel, token) == grpc.StatusCode.UNAVAILABLE
    no_cert = grpc.ssl_channel_credentials(root_certificates=ca)
    async with grpc.aio.secure_channel(target, no_cert) as channel:
        assert await outcome(channel, token) == grpc.StatusCode.UNAVAILABLE
    foreign = grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=foreign_tls.key.read_bytes(),
        certificate_chain=foreign_tls.cert.read_bytes(),
    )
    async with grpc.aio.secure_channel(target, foreign) as channel:
        assert await outcome(channel, token) == grpc.StatusCode.UNAVAILABLE
    assert service.calls == 0

    # The deployment's certificate without the token: the token is still required.
    async with open_channel(target, internal=mtls(tls, token="")) as channel:
        assert await outcome(channel) == grpc.StatusCode.UNAUTHENTICATED
        # ... while health answers (over TLS) without it.
        answer = await health_pb2_grpc.HealthStub(channel).Check(Request(), timeout=10)
        assert answer.status == Response.NOT_SERVING
    # Both: through, on every kind of call (the server is checked against the CA too).
    async with open_channel(target, internal=mtls(tls)) as channel:
        assert await outcome(channel) == grpc.StatusCode.OK
        assert len(await stream(channel)) == 2
    assert service.calls == 2


async def test_mutual_tls_alone_lets_a_service_listen_beyond_the_loopback(start, tls):
    running = await start(host="0.0.0.0", internal=mtls(tls, token=""))
    target = f"127.0.0.1:{running.port}"
    async with open_channel(target, internal=mtls(tls, token="")) as channel:
        assert (await say(channel)).status == Response.SERVING


# --- the settings --------------------------------------------------------------------------


def test_internal_settings_come_from_the_environment(monkeypatch, tmp_path, tls):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    monkeypatch.setenv("STORYREEL_INTERNAL_TOKEN_FILE", str(token_file))
    monkeypatch.setenv("STORYREEL_INTERNAL_TLS_CA_FILE", str(tls.ca))
    monkeypatch.setenv("STORYREEL_INTERNAL_TLS_CERT_FILE", str(tls.cert))
    monkeypatch.setenv("STORYREEL_INTERNAL_TLS_KEY_FILE", str(tls.key))
    internal = InternalSettings()
    assert internal.token_value == TOKEN and internal.tls and internal.authenticates
    assert TOKEN not in repr(internal)
    monkeypatch.delenv("STORYREEL_INTERNAL_TOKEN_FILE")
    monkeypatch.setenv("STORYREEL_INTERNAL_TOKEN", TOKEN)
    assert InternalSettings().token_value == TOKEN


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"token": TOKEN, "token_file": "FILE"}, "not both"),
        ({"token_file": "EMPTY"}, "is empty"),
        ({"token_file": "MISSING"}, "cannot read"),
        ({"token": "short-secret"}, "at least 16"),
        ({"token": TOKEN + " and more"}, "printable ASCII"),
        ({"tls_ca_file": "FILE"}, "all three"),
        ({"tls_cert_file": "FILE", "tls_key_file": "FILE"}, "all three"),
    ],
)
def test_wrong_internal_settings_are_refused_without_showing_the_token(tmp_path, fields, message):
    files = {"FILE": tmp_path / "token", "EMPTY": tmp_path / "empty", "MISSING": tmp_path / "no"}
    files["FILE"].write_text(TOKEN)
    files["EMPTY"].write_text(" \n")
    values = {key: files.get(value, value) for key, value in fields.items()}
    with pytest.raises(ValueError, match=message) as caught:
        InternalSettings(**values)
    assert TOKEN not in str(caught.value)
    assert "short-secret" not in str(caught.value)


async def test_a_service_with_wrong_internal_settings_refuses_to_start(monkeypatch, caplog):
    monkeypatch.setenv("STORYREEL_INTERNAL_TOKEN", "short-secret")
    caplog.set_level(logging.ERROR)
    assert await asyncio.wait_for(serve(settings(), Echo()), timeout=30) == 1
    assert "at least 16" in caplog.text
    assert "short-secret" not in caplog.text
