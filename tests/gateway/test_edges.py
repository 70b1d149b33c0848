"""The gateway at its edges (issue 11, findings 5 and 6), over real gRPC.

Malformed messages, bounded echoes, the standard health and reflection services,
and a health status that waits for the upstream services.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from storyreel_gateway.service import GatewayService
from storyreel_gateway.settings import GatewaySettings
from support import health_status, reflection_answers, stored_uris, upload_requests

from storyreel.gateway.v1 import gateway_pb2 as pb
from storyreel.logs import JsonFormatter
from storyreel.serving import create_server

KEY = (("authorization", "Bearer edge-key"),)
SERVICE = "/storyreel.gateway.v1.StoryReelService/"
# Field 1 as a length-delimited value that runs past the end: no message decodes it.
GARBAGE = b"\x0a\xff\xff\xff\x0f" + b"x" * 10


@pytest.fixture
async def keyed(start_gateway):
    return await start_gateway(api_keys={"edge": ["edge-key"]})


def _raw(channel: grpc.aio.Channel, method: str, kind: str = "unary_unary"):
    return getattr(channel, kind)(SERVICE + method)


async def _code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code(), caught.value.details()


async def test_a_malformed_message_is_refused_after_the_key_is_checked(keyed):
    async def stream():
        yield GARBAGE

    async def watch(metadata):
        async for _ in _raw(keyed.channel, "WatchJob", "unary_stream")(GARBAGE, metadata=metadata):
            pass

    calls = {
        "GetJob": lambda metadata: _raw(keyed.channel, "GetJob")(GARBAGE, metadata=metadata),
        "CreateVideo": lambda metadata: _raw(keyed.channel, "CreateVideo")(
            GARBAGE, metadata=metadata
        ),
        "WatchJob": watch,
        "UploadAudio": lambda metadata: _raw(keyed.channel, "UploadAudio", "stream_unary")(
            stream(), metadata=metadata
        ),
        "UploadImage": lambda metadata: _raw(keyed.channel, "UploadImage", "stream_unary")(
            stream(), metadata=metadata
        ),
        **{
            method: (lambda m: lambda metadata: _raw(keyed.channel, m)(GARBAGE, metadata=metadata))(
                method
            )
            for method in ("UpdateStoryboard", "ApproveStoryboard")
        },
    }
    for name, call in calls.items():
        code, _ = await _code_of(call(()))
        assert code == grpc.StatusCode.UNAUTHENTICATED, name
        code, details = await _code_of(call(KEY))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, name
        assert "malformed request" in details, name


async def test_a_malformed_message_without_keys_configured_is_invalid_argument(start_gateway):
    under_test = await start_gateway()
    code, details = await _code_of(_raw(under_test.channel, "ListJobs")(GARBAGE))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "storyreel.gateway.v1.ListJobsRequest" in details


async def test_a_huge_job_id_is_answered_and_logged_in_bounded_size(keyed, caplog):
    job_id = "j" * (3 * 1024 * 1024)
    with caplog.at_level(logging.INFO):
        for method, request in (
            ("GetJob", pb.GetJobRequest(job_id=job_id)),
            ("CancelJob", pb.CancelJobRequest(job_id=job_id)),
            ("RegenerateScene", pb.RegenerateSceneRequest(job_id=job_id, index=1)),
            ("UpdateStoryboard", pb.UpdateStoryboardRequest(job_id=job_id, version=1)),
            ("ApproveStoryboard", pb.ApproveStoryboardRequest(job_id=job_id, version=1)),
        ):
            call = keyed.channel.unary_unary(SERVICE + method)
            code, details = await _code_of(call(request.SerializeToString(), metadata=KEY))
            assert code in {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT}, method
            assert len(details) <= 1100, method
    formatter = JsonFormatter("gateway")
    logged = sum(len(formatter.format(record)) for record in caplog.records)
    assert logged < 100_000


@pytest.mark.parametrize(
    "name",
    ["a" * (1024 * 1024), "n" * 5000 + ".wav", "x/audio.wav\n"],
    ids=["1 MiB", "5000-character name", "trailing newline"],
)
async def test_an_audio_uri_no_store_could_hold_is_invalid_argument(keyed, file_store, name):
    before = stored_uris(file_store)
    request = pb.CreateVideoRequest(prompt="x", audio_uri=f"{file_store.root_uri}uploads/{name}")
    code, details = await _code_of(keyed.stub.CreateVideo(request, metadata=KEY))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(details) <= 300
    assert stored_uris(file_store) == before


async def test_health_list_and_watch_answer_as_the_standard_service(keyed):
    stub = health_pb2_grpc.HealthStub(keyed.channel)
    listed = await stub.List(health_pb2.HealthListRequest())
    statuses = {name: s.status for name, s in listed.statuses.items()}
    assert statuses[""] == health_pb2.HealthCheckResponse.SERVING
    assert statuses["storyreel.gateway.v1.StoryReelService"] == (
        health_pb2.HealthCheckResponse.SERVING
    )
    watch = stub.Watch(health_pb2.HealthCheckRequest())
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_reflection_v1_and_v1alpha_describe_the_public_service(keyed, version):
    listed, described = await reflection_answers(
        keyed.channel, version, "storyreel.gateway.v1.StoryReelService"
    )
    names = {s.name for s in listed.list_services_response.service}
    assert "storyreel.gateway.v1.StoryReelService" in names
    assert "grpc.reflection.v1.ServerReflection" in names
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in described.file_descriptor_response.file_descriptor_proto
    ]
    assert any(service.name == "StoryReelService" for file in files for service in file.service)


async def test_the_gateway_is_not_serving_until_its_upstreams_are(
    upstream, file_store, gateway_database, tmp_path, caplog
):
    await upstream.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    settings = GatewaySettings(
        port=0,
        llm_address=upstream.address,
        diffusion_address=upstream.address,
        composer_address=upstream.address,
        database_url=gateway_database,
        upload_tmp_dir=tmp_path / "spool",
    )
    service = GatewayService(settings, file_store)
    running = await create_server(settings, service)
    address = f"127.0.0.1:{running.port}"

    async def load():
        await service.load()
        await running.set_serving(True)

    try:
        with caplog.at_level(logging.INFO, logger="storyreel_gateway"):
            loading = asyncio.create_task(load())

            async def waiting_logged():
                while not any("waiting for the upstream" in r.getMessage() for r in caplog.records):
                    assert not loading.done(), "the gateway did not wait for its upstreams"
                    await asyncio.sleep(0.05)

            await asyncio.wait_for(waiting_logged(), 30)
            assert await health_status(address) == "NOT_SERVING"
            assert not loading.done()
            await upstream.health.set("", health_pb2.HealthCheckResponse.SERVING)
            await asyncio.wait_for(loading, 30)
        assert await health_status(address) == "SERVING"
        record = next(r for r in caplog.records if "waiting for the upstream" in r.getMessage())
        assert record.not_ready == {
            f"{name} {upstream.address}": "NOT_SERVING" for name in ("story", "render", "compose")
        }
    finally:
        await running.stop(0)


# -- found by the fuzz suite (tests/gateway/test_fuzz.py) ---------------------------------------


def _everything_under(root) -> set[str]:
    """Every file and folder under ``root``: a refused request leaves not even a folder."""
    return {path.relative_to(root).as_posix() for path in root.rglob("*")}


async def test_an_upload_the_composer_refuses_leaves_no_empty_folder(keyed, file_store):
    before = _everything_under(file_store.root)

    upload = upload_requests(b"fLaC" + b"\x00" * 100, "track.flac")  # a header, then nothing
    code, details = await _code_of(keyed.stub.UploadAudio(upload, metadata=KEY))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "not usable audio" in details
    # The object was stored, probed and deleted: its folder (uploads/<tenant>/<id>/) too.
    assert _everything_under(file_store.root) == before


async def test_an_upload_whose_metadata_grpc_refuses_logs_no_crash(keyed, caplog):
    upload = upload_requests([], "track.wav")
    # Over gRPC's 16 KiB metadata limit: gRPC answers RESOURCE_EXHAUSTED itself, yet runs
    # the client-streaming handler, whose refusal then finds the call ended.
    too_big = (("authorization", "Bearer " + "k" * 20_000),)
    with caplog.at_level(logging.INFO):
        code, _ = await _code_of(keyed.stub.UploadAudio(upload, metadata=too_big))
        await asyncio.sleep(0.2)  # the handler's end is logged after the client's answer
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    errors = [r.getMessage()[:200] for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


async def test_a_nul_in_a_job_id_or_an_idempotency_key_is_refused_on_every_database(
    start_gateway, database_url
):
    # PostgreSQL text cannot hold a NUL: such a value must be refused before any query.
    under_test = await start_gateway(api_keys={"edge": ["edge-key"]}, database_url=database_url)
    stub = under_test.stub
    code, details = await _code_of(
        stub.CancelJob(pb.CancelJobRequest(job_id="a\x00b"), metadata=KEY)
    )
    assert code == grpc.StatusCode.NOT_FOUND
    assert "does not exist" in details
    request = pb.CreateVideoRequest(prompt="x", idempotency_key="key\x00")
    code, details = await _code_of(stub.CreateVideo(request, metadata=KEY))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "idempotency_key" in details
    assert (await stub.ListJobs(pb.ListJobsRequest(), metadata=KEY)).jobs == []
