"""The gateway's web port: gRPC-Web for browsers, and the studio page's files.

A real gateway (its upstream services are the doubles of conftest.py) with its web port
on a free port. The gRPC-Web client here is written from the protocol itself (plain
HTTP/1.1 with http.client: 5-byte frames, a trailers frame flagged 0x80), not from the
server's library, so it checks the wire format a browser sees. Each answer is compared
with the same call over native gRPC: same codes, same messages.
"""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from PIL import Image
from storyreel_gateway import web as web_module
from storyreel_gateway.settings import GatewaySettings
from storyreel_gateway.web import API_PREFIX, STUDIO_DIR
from support import finished_job, watch_events

from storyreel.gateway.v1 import gateway_pb2 as pb

REPO = Path(__file__).resolve().parents[2]

KEY = "web-key"
AUTH = {"authorization": f"Bearer {KEY}"}


@dataclass
class WebReply:
    """One HTTP answer of the web port, its gRPC-Web frames split out."""

    status: int
    headers: dict[str, str]
    body: bytes
    messages: list[bytes] = field(default_factory=list)
    trailers: dict[str, str] = field(default_factory=dict)

    @property
    def grpc_status(self) -> int | None:
        value = self.trailers.get("grpc-status", self.headers.get("grpc-status"))
        return None if value is None else int(value)

    @property
    def grpc_message(self) -> str:
        value = self.trailers.get("grpc-message", self.headers.get("grpc-message", ""))
        return urllib.parse.unquote(value)


def _frames(body: bytes) -> tuple[list[bytes], dict[str, str]]:
    """gRPC-Web's response body: message frames (flag 0), then one trailers frame (0x80)."""
    messages, trailers, at = [], {}, 0
    while at < len(body):
        flag, length = struct.unpack(">BI", body[at : at + 5])
        payload = body[at + 5 : at + 5 + length]
        assert len(payload) == length, "a frame cut short"
        at += 5 + length
        if flag & 0x80:
            for line in payload.decode("ascii").split("\r\n"):
                if line:
                    key, _, value = line.partition(":")
                    trailers[key.strip().lower()] = value.strip()
        else:
            assert flag == 0, f"a compressed frame ({flag})"
            assert not trailers, "a message after the trailers"
            messages.append(payload)
    return messages, trailers


def _request(base: str, method: str, path: str, body: bytes | None, headers: dict) -> WebReply:
    url = urllib.parse.urlsplit(base)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        # The path goes out exactly as written (no client-side normalising of "..").
        connection.putrequest(method, path, skip_host="host" in headers, skip_accept_encoding=True)
        for key, value in headers.items():
            connection.putheader(key, value)
        if body is not None:
            connection.putheader("content-length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        data = response.read()
        return WebReply(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
    finally:
        connection.close()


def frame(message: bytes) -> bytes:
    return struct.pack(">BI", 0, len(message)) + message


def grpc_web_sync(base: str, method: str, *messages, headers=None) -> WebReply:
    """One gRPC-Web call (binary): every request message framed into one POST body."""
    body = b"".join(frame(m if isinstance(m, bytes) else m.SerializeToString()) for m in messages)
    all_headers = {
        "content-type": "application/grpc-web+proto",
        "x-grpc-web": "1",
        "accept": "application/grpc-web+proto",
        **(headers or {}),
    }
    reply = _request(base, "POST", f"{API_PREFIX}{method}", body, all_headers)
    assert reply.status == 200, (reply.status, reply.body[:200])
    assert reply.headers["content-type"].startswith("application/grpc-web")
    reply.messages, reply.trailers = _frames(reply.body)
    return reply


async def grpc_web(base: str, method: str, *messages, headers=None) -> WebReply:
    """:func:`grpc_web_sync` in a thread: the gateway under test runs in this event loop."""
    return await asyncio.to_thread(grpc_web_sync, base, method, *messages, headers=headers)


async def http_get(base: str, path: str, headers=None, method: str = "GET") -> WebReply:
    return await asyncio.to_thread(_request, base, method, path, None, headers or {})


async def native_error(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


@pytest.fixture
async def web(start_gateway):
    """A gateway with no API keys (the single-machine default) and its web port."""
    under_test = await start_gateway(web_port=0)
    under_test.url = under_test.running.service.web_url
    return under_test


@pytest.fixture
async def keyed(start_gateway):
    """A gateway whose one tenant has the key KEY, and its web port."""
    under_test = await start_gateway(web_port=0, api_keys={"acme": [KEY]})
    under_test.url = under_test.running.service.web_url
    return under_test


def _png(width: int = 8, height: int = 6) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


# -- settings -----------------------------------------------------------------------------------


def test_the_web_port_follows_the_grpc_port_unless_set(monkeypatch):
    for name in ("PORT", "WEB_PORT", "WEB_HOST", "HOST", "API_KEYS"):
        monkeypatch.delenv(f"STORYREEL_GATEWAY_{name}", raising=False)
    assert GatewaySettings().web_bind == ("127.0.0.1", 50054)
    assert GatewaySettings(port=6000).web_bind == ("127.0.0.1", 6004)
    assert GatewaySettings(port=0).web_bind is None  # a free gRPC port: no web port unasked
    assert GatewaySettings(port=0, web_port=0).web_bind == ("127.0.0.1", 0)
    assert GatewaySettings(web_port=-1).web_bind is None
    assert GatewaySettings(web_port=8080, web_host="::1").web_bind == ("::1", 8080)
    with pytest.raises(ValueError, match="web_port"):
        GatewaySettings(port=65533)
    assert GatewaySettings(port=65533, web_port=-1).web_bind is None
    # With no API keys, the web port too listens on a loopback address only.
    with pytest.raises(ValueError, match=r"loopback address; web_host='0\.0\.0\.0'"):
        GatewaySettings(web_host="0.0.0.0")
    keyed = GatewaySettings(web_host="0.0.0.0", api_keys={"t": ["k"]})
    assert keyed.web_bind == ("0.0.0.0", 50054)


# -- the API through gRPC-Web -----------------------------------------------------------------


async def test_the_web_port_is_a_free_port_beside_the_grpc_port(web):
    assert web.url == f"http://127.0.0.1:{web.running.service.web.port}/"
    assert web.running.service.web.port not in (0, web.running.port)


async def test_a_web_port_in_use_stops_the_gateway_naming_it(start_gateway):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            await start_gateway(web_port=port)


async def test_create_video_and_get_job_are_the_native_answers(keyed):
    request = pb.CreateVideoRequest(prompt="a lighthouse", scene_count=2)
    created = await grpc_web(keyed.url, "CreateVideo", request, headers=AUTH)
    assert (created.grpc_status, created.grpc_message) == (0, "")
    job_id = pb.CreateVideoResponse.FromString(created.messages[0]).job_id
    assert len(created.messages) == 1 and job_id

    metadata = (("authorization", f"Bearer {KEY}"),)
    await finished_job(keyed.stub, job_id, metadata=metadata)
    got = await grpc_web(keyed.url, "GetJob", pb.GetJobRequest(job_id=job_id), headers=AUTH)
    assert got.grpc_status == 0 and len(got.messages) == 1
    job = pb.GetJobResponse.FromString(got.messages[0]).job
    native = await keyed.stub.GetJob(pb.GetJobRequest(job_id=job_id), metadata=metadata)
    assert job == native.job
    assert (job.job_id, job.prompt, job.state) == (job_id, "a lighthouse", pb.JOB_STATE_DONE)


async def test_watch_job_streams_every_event_then_ends(web):
    created = await grpc_web(web.url, "CreateVideo", pb.CreateVideoRequest(prompt="x"))
    job_id = pb.CreateVideoResponse.FromString(created.messages[0]).job_id

    # Watched from the start, while the job runs: its events as they come, to the end.
    watched = await grpc_web(web.url, "WatchJob", pb.WatchJobRequest(job_id=job_id))
    assert (watched.grpc_status, watched.grpc_message) == (0, "")
    events = [pb.WatchJobResponse.FromString(m) for m in watched.messages]
    assert len(events) > 2
    assert events[-1].job.state == pb.JOB_STATE_DONE
    # A watch of the finished job: the same replay as natively.
    again = await grpc_web(web.url, "WatchJob", pb.WatchJobRequest(job_id=job_id))
    replayed = [pb.WatchJobResponse.FromString(m) for m in again.messages]
    assert replayed == await watch_events(web.stub, job_id)


async def test_read_artifact_streams_the_stored_bytes(web, file_store):
    job_id = (await web.stub.CreateVideo(pb.CreateVideoRequest(prompt="x"))).job_id
    job = await finished_job(web.stub, job_id)
    for uri in (job.video_uri, job.poster.uri):
        request = pb.ReadArtifactRequest(job_id=job_id, uri=uri)
        read = await grpc_web(web.url, "ReadArtifact", request)
        assert read.grpc_status == 0
        head, *chunks = [pb.ReadArtifactResponse.FromString(m) for m in read.messages]
        data = b"".join(c.chunk for c in chunks)
        assert data == file_store.get_bytes(uri) and head.size_bytes == len(data) > 0
    assert head.content_type == "image/png"


@pytest.mark.parametrize(
    "headers",
    [{}, {"authorization": "Bearer wrong"}, {"authorization": "Basic a2V5"}],
    ids=["missing", "wrong", "not-bearer"],
)
async def test_a_call_without_the_right_key_is_unauthenticated_as_natively(keyed, headers):
    request = pb.GetJobRequest(job_id="j" * 8)
    reply = await grpc_web(keyed.url, "GetJob", request, headers=headers)
    assert reply.messages == []
    native = await native_error(keyed.stub.GetJob(request, metadata=tuple(headers.items()) or None))
    assert native.code() == grpc.StatusCode.UNAUTHENTICATED
    assert reply.grpc_status == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert reply.grpc_message == native.details()
    # A streaming call is refused alike, before any event.
    watch = await grpc_web(keyed.url, "WatchJob", pb.WatchJobRequest(job_id="j"), headers=headers)
    assert (watch.grpc_status, watch.messages) == (reply.grpc_status, [])


async def test_a_loopback_gateway_without_keys_asks_for_none(web):
    for headers in ({}, {"authorization": "Bearer anything"}):
        listed = await grpc_web(web.url, "ListJobs", pb.ListJobsRequest(), headers=headers)
        assert listed.grpc_status == 0 and len(listed.messages) == 1


@pytest.mark.parametrize(
    "request_message",
    [
        pb.CreateVideoRequest(prompt=""),
        pb.CreateVideoRequest(prompt="x", scene_count=1000),
        pb.CreateVideoRequest(prompt="x" * 2001),
    ],
    ids=["no-prompt", "too-many-scenes", "prompt-too-long"],
)
async def test_a_bad_request_is_invalid_argument_with_the_native_message(keyed, request_message):
    reply = await grpc_web(keyed.url, "CreateVideo", request_message, headers=AUTH)
    native = await native_error(
        keyed.stub.CreateVideo(request_message, metadata=tuple(AUTH.items()))
    )
    assert native.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (reply.grpc_status, reply.grpc_message) == (native.code().value[0], native.details())
    assert reply.grpc_message  # the gateway's own words, not an empty status


async def test_an_undecodable_message_is_refused_after_authentication_as_natively(keyed):
    garbage = b"\xff\xff\xff"
    wrong_key = await grpc_web(
        keyed.url, "CreateVideo", garbage, headers={"authorization": "Bearer no"}
    )
    assert wrong_key.grpc_status == grpc.StatusCode.UNAUTHENTICATED.value[0]
    reply = await grpc_web(keyed.url, "CreateVideo", garbage, headers=AUTH)
    assert reply.grpc_status == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "malformed request" in reply.grpc_message


async def test_a_message_over_the_size_limit_is_resource_exhausted(start_gateway):
    gateway = await start_gateway(web_port=0, max_message_bytes=4096, max_prompt_chars=100_000)
    request = pb.CreateVideoRequest(prompt="x" * 10_000)
    reply = await grpc_web(gateway.running.service.web_url, "CreateVideo", request)
    native = await native_error(gateway.stub.CreateVideo(request))
    assert native.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reply.grpc_status == native.code().value[0]


async def test_an_upload_sent_whole_in_one_body_is_stored(web, file_store):
    """A client-streaming call works when all its messages come in one request body: what
    a page can send with fetch (browsers cannot stream a request as it is written)."""
    png = _png()
    messages = [
        pb.UploadImageRequest(filename="ada.png"),
        pb.UploadImageRequest(chunk=png[:50]),
        pb.UploadImageRequest(chunk=png[50:]),
    ]
    reply = await grpc_web(web.url, "UploadImage", *messages)
    assert (reply.grpc_status, reply.grpc_message) == (0, "")
    stored = pb.UploadImageResponse.FromString(reply.messages[0])
    assert (stored.width, stored.height, stored.size_bytes) == (8, 6, len(png))
    assert file_store.get_bytes(stored.image_uri) == png

    refused = await grpc_web(web.url, "UploadImage", pb.UploadImageRequest(chunk=png))
    native = await native_error(web.stub.UploadImage(iter([pb.UploadImageRequest(chunk=png)])))
    assert (refused.grpc_status, refused.grpc_message) == (
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
        native.details(),
    )


async def test_calls_from_another_origin_or_host_are_refused(web):
    request = pb.ListJobsRequest()
    port = web.running.service.web.port
    same = await grpc_web(web.url, "ListJobs", request, headers={"origin": web.url.rstrip("/")})
    assert same.grpc_status == 0
    for headers in (
        {"origin": "http://evil.example"},
        {"origin": f"http://localhost:{port + 1}"},
        {"host": f"evil.example:{port}"},  # a name rebound to 127.0.0.1
    ):
        body = frame(request.SerializeToString())
        reply = await asyncio.to_thread(
            _request,
            web.url,
            "POST",
            f"{API_PREFIX}ListJobs",
            body,
            {"content-type": "application/grpc-web+proto", **headers},
        )
        assert reply.status == 403, headers
        assert "access-control-allow-origin" not in reply.headers
    # Behind a proxy that terminates TLS the page is https://name and this port hears
    # plain HTTP for Host: name (the gpu overlay's Ingress).
    proxied = await grpc_web(
        web.url, "ListJobs", request, headers={"origin": f"https://127.0.0.1:{port}"}
    )
    assert proxied.grpc_status == 0
    preflight = await http_get(
        web.url,
        f"{API_PREFIX}ListJobs",
        {"origin": "http://evil.example", "access-control-request-method": "POST"},
        method="OPTIONS",
    )
    assert preflight.status in (403, 405)
    assert "access-control-allow-origin" not in preflight.headers


@pytest.mark.parametrize(
    ("origin", "host", "same"),
    [
        ("https://studio.example", "studio.example", True),  # TLS ended at the Ingress
        ("http://studio.example", "studio.example", True),
        ("https://studio.example:8443", "studio.example:8443", True),
        ("http://127.0.0.1:50054", "127.0.0.1:50054", True),
        ("https://studio.example:8443", "studio.example", False),
        ("https://evil.example", "studio.example", False),
        ("https://studio.example.evil.example", "studio.example", False),
        ("null", "studio.example", False),
        ("file://", "studio.example", False),
        ("https://studio.example/path", "studio.example", False),
        ("http://[::1]:50054", "[::1]:50054", True),
        ("http://127.0.0.1:99999", "127.0.0.1:50054", False),
    ],
)
def test_an_origin_is_the_same_by_name_and_port_whatever_the_scheme(origin, host, same):
    assert web_module._same_origin(origin, host) is same


async def test_an_api_path_answers_post_only(web):
    reply = await http_get(web.url, f"{API_PREFIX}ListJobs")
    assert reply.status == 405


async def test_the_connect_protocol_in_binary_reaches_the_same_servicer(keyed):
    """Connect's unary form (connect-web's createConnectTransport, useBinaryFormat)."""
    request = pb.GetJobRequest(job_id="j" * 8)
    path = f"{API_PREFIX}GetJob"
    headers = {"content-type": "application/proto", "connect-protocol-version": "1"}
    body = request.SerializeToString()
    refused = await asyncio.to_thread(_request, keyed.url, "POST", path, body, headers)
    native = await native_error(keyed.stub.GetJob(request))
    assert refused.status == 401
    assert json.loads(refused.body) == {"code": "unauthenticated", "message": native.details()}

    listed = await asyncio.to_thread(
        _request, keyed.url, "POST", f"{API_PREFIX}ListJobs", b"", {**headers, **AUTH}
    )
    assert listed.status == 200 and listed.headers["content-type"] == "application/proto"
    assert pb.ListJobsResponse.FromString(listed.body) == pb.ListJobsResponse()


async def test_native_grpc_and_other_formats_are_refused_on_the_web_port(web):
    path = f"{API_PREFIX}ListJobs"
    for content_type, status in (
        ("application/grpc", 415),
        ("application/grpc+proto", 415),
        ("application/json", 415),
        ("application/grpc-web-text", 415),
    ):
        reply = await asyncio.to_thread(
            _request, web.url, "POST", path, b"", {"content-type": content_type}
        )
        assert reply.status == status, content_type


# -- the studio page ----------------------------------------------------------------------------


async def test_the_page_is_served_with_its_security_headers(web):
    page = await http_get(web.url, "/")
    assert page.status == 200
    assert page.body == (STUDIO_DIR / "index.html").read_bytes()
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["x-content-type-options"] == "nosniff"
    policy = page.headers["content-security-policy"]
    for rule in (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "img-src 'self' blob: data:",
        "media-src 'self' blob: data:",
        "frame-ancestors 'none'",
    ):
        assert rule in policy
    assert "*" not in policy and "unsafe" not in policy
    same = await http_get(web.url, "/index.html")
    assert same.body == page.body
    head = await http_get(web.url, "/", method="HEAD")
    assert head.status == 200 and head.body == b""


async def test_every_file_of_the_studio_folder_has_its_content_type(web):
    types = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
    for path in sorted(STUDIO_DIR.rglob("*")):
        relative = path.relative_to(STUDIO_DIR)
        if not path.is_file() or any(part.startswith(".") for part in relative.parts):
            continue
        reply = await http_get(web.url, "/" + relative.as_posix())
        assert reply.status == 200 and reply.body == path.read_bytes(), path
        if path.suffix in types:
            assert reply.headers["content-type"].startswith(types[path.suffix]), path


@pytest.mark.parametrize(
    "path",
    [
        "/../settings.py",
        "/%2e%2e/settings.py",
        "/%2e%2e/",
        "/..%2fsettings.py",
        "/%2E%2E%2Fweb.py",
        "/./index.html/../../web.py",
        "/..\\web.py",
        "/%5c..%5cweb.py",
        "//etc/passwd",
        "/studio/../../web.py",
        "/index.html%00.css",
    ],
)
async def test_a_path_outside_the_studio_folder_is_not_found(web, path):
    reply = await http_get(web.url, path)
    assert reply.status == 404, path
    assert b"import" not in reply.body and b"root:" not in reply.body


async def test_an_unknown_path_or_a_folder_is_not_found_and_nothing_is_listed(web):
    for path in ("/nothing-here.html", "/index.html/", "/.git/config", "/studio/"):
        reply = await http_get(web.url, path)
        assert reply.status == 404, path
    refused = await http_get(web.url, "/", method="DELETE")
    assert refused.status == 405


# -- the gateway process -------------------------------------------------------------------------


def test_the_gateway_process_serves_the_page_and_stops_on_sigterm(tmp_path):
    """``python -m storyreel_gateway``: the web port beside the gRPC port, its file, and the
    process's own SIGTERM handling (uvicorn, in the same loop, takes no signal)."""
    port_file, web_port_file = tmp_path / "gateway.port", tmp_path / "gateway.web.port"
    nowhere = "127.0.0.1:1"  # no upstream: the gateway waits for them, serving its ports
    env = dict(
        os.environ,
        STORYREEL_STORAGE_URL=(tmp_path / "artifacts").as_uri(),
        STORYREEL_GATEWAY_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}",
        STORYREEL_GATEWAY_UPLOAD_TMP_DIR=str(tmp_path / "spool"),
        STORYREEL_GATEWAY_PORT="0",
        STORYREEL_GATEWAY_PORT_FILE=str(port_file),
        STORYREEL_GATEWAY_WEB_PORT="0",
        STORYREEL_GATEWAY_WEB_PORT_FILE=str(web_port_file),
        STORYREEL_GATEWAY_LLM_ADDRESS=nowhere,
        STORYREEL_GATEWAY_DIFFUSION_ADDRESS=nowhere,
        STORYREEL_GATEWAY_COMPOSER_ADDRESS=nowhere,
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "storyreel_gateway"],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.05)
        # The web port's file is written before the gRPC port's.
        base = f"http://127.0.0.1:{int(web_port_file.read_text())}/"
        page = _request(base, "GET", "/", None, {})
        assert page.status == 200 and page.headers["x-content-type-options"] == "nosniff"
        process.send_signal(signal.SIGTERM)  # the gateway's own handler, not uvicorn's
        assert process.wait(timeout=30) == 0, process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


FAKE_SERVICE = """
import asyncio
import sys

from pydantic_settings import SettingsConfigDict

from storyreel.serving import Service, serve
from storyreel.settings import ServiceSettings


class Empty(Service):
    def add_to_server(self, server):
        pass


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix={prefix!r}, extra="ignore")


sys.exit(asyncio.run(serve(Settings(), Empty())))
"""


def test_a_local_stack_shows_its_gateways_web_url_and_keeps_it_on_restart(tmp_path):
    """The real gateway in a LocalStack on free ports (its upstreams empty stand-ins)."""
    from storyreel.stack import DEFAULT_SERVICES, LocalStack, ServiceSpec

    folder = tmp_path / "fakes"
    folder.mkdir()
    specs = []
    for spec in DEFAULT_SERVICES:
        if spec.name == "gateway":
            specs.append(spec)
            continue
        module = f"fake_{spec.name}"
        (folder / f"{module}.py").write_text(FAKE_SERVICE.format(prefix=spec.env_prefix))
        specs.append(ServiceSpec(spec.name, module, spec.env_prefix, spec.port))
    env = {"PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])}
    with LocalStack(tmp_path / "data", fixed_ports=False, services=tuple(specs), env=env) as stack:
        stack.start(timeout_s=120)
        url = stack.web_url
        gateway = stack.processes["gateway"]
        assert url == f"http://127.0.0.1:{gateway.web_port}/"
        assert gateway.web_port not in (None, 0, gateway.port)
        assert _request(url, "GET", "/", None, {}).status == 200
        assert grpc_web_sync(url, "ListJobs", pb.ListJobsRequest()).grpc_status == 0
        stack.restart("gateway")
        assert stack.web_url == url
        assert grpc_web_sync(url, "ListJobs", pb.ListJobsRequest()).grpc_status == 0


def test_a_base_port_puts_the_web_port_on_n_plus_4(tmp_path):
    from storyreel.stack import BASE_PORT_SPAN, LocalStack

    assert BASE_PORT_SPAN == 4
    assert LocalStack(tmp_path, base_port=6000)._web_port_for(6000) == 6004
    assert LocalStack(tmp_path)._web_port_for(50050) is None  # the gateway's own: port + 4
    assert LocalStack(tmp_path, fixed_ports=False)._web_port_for(0) == 0
