"""API keys and tenant isolation, over real gRPC."""

from __future__ import annotations

import grpc
import pytest
from storyreel_gateway.settings import GatewaySettings

from storyreel.gateway.v1 import gateway_pb2 as pb

ALICE = (("authorization", "Bearer alice-key"),)
BOB = (("authorization", "Bearer bob-key"),)


@pytest.fixture
async def shared_gateway(start_gateway, tmp_path):
    keys_file = tmp_path / "keys.json"
    keys_file.write_text('{"bob": ["bob-key"]}')
    return (await start_gateway(api_keys={"alice": ["alice-key"]}, api_keys_file=keys_file)).stub


async def _finish(stub, job_id, metadata):
    job = None
    async for event in stub.WatchJob(pb.WatchJobRequest(job_id=job_id), metadata=metadata):
        job = event.job
    return job


async def test_each_tenant_sees_only_its_own_jobs(shared_gateway):
    gw = shared_gateway
    job_id = (await gw.CreateVideo(pb.CreateVideoRequest(prompt="alice's"), metadata=ALICE)).job_id
    assert (await _finish(gw, job_id, ALICE)).state == pb.JOB_STATE_DONE

    calls = {
        "get": gw.GetJob(pb.GetJobRequest(job_id=job_id), metadata=BOB),
        "cancel": gw.CancelJob(pb.CancelJobRequest(job_id=job_id), metadata=BOB),
        "regenerate": gw.RegenerateScene(
            pb.RegenerateSceneRequest(job_id=job_id, index=1), metadata=BOB
        ),
        "watch": _finish(gw, job_id, BOB),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND, name
    assert (await gw.ListJobs(pb.ListJobsRequest(), metadata=BOB)).jobs == []
    listed = await gw.ListJobs(pb.ListJobsRequest(), metadata=ALICE)
    assert [job.job_id for job in listed.jobs] == [job_id]


async def test_a_tenant_cannot_use_another_tenants_upload(shared_gateway):
    gw = shared_gateway

    async def upload():
        yield pb.UploadAudioRequest(filename="a.wav")
        yield pb.UploadAudioRequest(chunk=b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 32)

    uri = (await gw.UploadAudio(upload(), metadata=ALICE)).audio_uri
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw.CreateVideo(pb.CreateVideoRequest(prompt="x", audio_uri=uri), metadata=BOB)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await gw.CreateVideo(pb.CreateVideoRequest(prompt="x", audio_uri=uri), metadata=ALICE)


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ((), "missing API key"),
        ((("authorization", "Bearer nope"),), "unknown API key"),
        ((("authorization", "Basic YWxpY2U6eA=="),), "malformed"),
        ((("authorization", "Bearer "),), "malformed"),
    ],
)
async def test_calls_without_a_valid_key_are_unauthenticated(shared_gateway, metadata, message):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await shared_gateway.ListJobs(pb.ListJobsRequest(), metadata=metadata)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert message in caught.value.details()


def test_without_keys_the_gateway_refuses_a_public_address():
    with pytest.raises(ValueError, match="loopback"):
        GatewaySettings(host="0.0.0.0")
    GatewaySettings(host="0.0.0.0", api_keys={"t": ["k"]})
    GatewaySettings(host="127.0.0.1")
    GatewaySettings(host="::1")


async def test_health_needs_no_key(start_gateway):
    from support import health_status

    under_test = await start_gateway(api_keys={"alice": ["alice-key"]})
    assert await health_status(under_test.address) == "SERVING"


async def test_tls_on_the_public_port(start_gateway, tmp_path):
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    under_test = await start_gateway(tls_cert_file=cert, tls_key_file=key)
    port = under_test.address.rsplit(":", 1)[1]
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    async with grpc.aio.secure_channel(f"localhost:{port}", credentials) as channel:
        from storyreel.gateway.v1 import gateway_pb2_grpc

        stub = gateway_pb2_grpc.StoryReelServiceStub(channel)
        assert (await stub.ListJobs(pb.ListJobsRequest(), timeout=10)).jobs == []
    async with grpc.aio.insecure_channel(f"localhost:{port}") as plain:
        from storyreel.gateway.v1 import gateway_pb2_grpc

        with pytest.raises(grpc.aio.AioRpcError):
            await gateway_pb2_grpc.StoryReelServiceStub(plain).ListJobs(
                pb.ListJobsRequest(), timeout=5
            )
