"""API keys and tenant isolation, over real gRPC."""

from __future__ import annotations

import grpc
import pytest
from storyreel_gateway.settings import GatewaySettings
from support import ALICE, BOB, finished_job, upload_audio

from storyreel.gateway.v1 import gateway_pb2 as pb


@pytest.fixture
async def shared_gateway(start_gateway, tmp_path):
    keys_file = tmp_path / "keys.json"
    keys_file.write_text('{"bob": ["bob-key"]}')
    return (await start_gateway(api_keys={"alice": ["alice-key"]}, api_keys_file=keys_file)).stub


async def test_each_tenant_sees_only_its_own_jobs(shared_gateway):
    gw = shared_gateway
    job_id = (await gw.CreateVideo(pb.CreateVideoRequest(prompt="alice's"), metadata=ALICE)).job_id
    assert (await finished_job(gw, job_id, ALICE)).state == pb.JOB_STATE_DONE

    calls = {
        "get": gw.GetJob(pb.GetJobRequest(job_id=job_id), metadata=BOB),
        "cancel": gw.CancelJob(pb.CancelJobRequest(job_id=job_id), metadata=BOB),
        "regenerate": gw.RegenerateScene(
            pb.RegenerateSceneRequest(job_id=job_id, index=1), metadata=BOB
        ),
        "watch": finished_job(gw, job_id, BOB),
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

    uri = (await upload_audio(gw, metadata=ALICE)).audio_uri
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


# --- Authentication fails closed (issue 11, finding 1) -------------------------------

SECRET = "s3cr3t-k3y-never-printed"


@pytest.mark.parametrize(
    "api_keys",
    [{"alice": []}, {"alice": [""]}, {"alice": ["   "]}],
    ids=["no key", "empty key", "blank key"],
)
def test_a_tenant_without_a_real_key_does_not_start_the_gateway(api_keys):
    with pytest.raises(ValueError):
        GatewaySettings(host="0.0.0.0", api_keys=api_keys)


def test_an_empty_keys_file_leaves_no_public_address(tmp_path):
    keys_file = tmp_path / "keys.json"
    keys_file.write_text("{}")
    with pytest.raises(ValueError, match="loopback"):
        GatewaySettings(host="0.0.0.0", api_keys_file=keys_file)
    GatewaySettings(host="127.0.0.1", api_keys_file=keys_file)  # no auth, loopback only


@pytest.mark.parametrize(
    "value",
    [
        {"alice": {SECRET: True}},
        {"alice": [{SECRET: 1}]},
        {"alice": [SECRET, 1234]},
        {"alice": 5, "bob": [SECRET]},
        [SECRET],
        {"alice": ["sha256:" + SECRET]},
    ],
    ids=["dict", "list of dicts", "a number beside a key", "a number", "a list", "bad digest"],
)
@pytest.mark.parametrize("source", ["env", "file"])
def test_a_malformed_keys_setting_is_refused_without_printing_a_key(
    value, source, tmp_path, monkeypatch
):
    import json

    if source == "env":
        monkeypatch.setenv("STORYREEL_GATEWAY_API_KEYS", json.dumps(value))
        fields = {}
    else:
        keys_file = tmp_path / "keys.json"
        keys_file.write_text(json.dumps(value))
        fields = {"api_keys_file": keys_file}
    with pytest.raises(ValueError) as caught:
        GatewaySettings(**fields)
    assert SECRET not in str(caught.value)
    assert "s3cr3t" not in repr(caught.value)


async def test_two_authorization_headers_are_refused(shared_gateway):
    for metadata in (
        (("authorization", "Bearer nope"), ("authorization", "Bearer alice-key")),
        (("authorization", "Bearer alice-key"), ("authorization", "Bearer alice-key")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await shared_gateway.ListJobs(pb.ListJobsRequest(), metadata=metadata)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "more than one authorization header" in caught.value.details()


async def test_the_keys_file_may_hold_sha256_digests(start_gateway, tmp_path):
    import hashlib
    import json

    digest = "sha256:" + hashlib.sha256(b"carol-key").hexdigest()
    keys_file = tmp_path / "keys.json"
    # Hex digits in either case.
    keys_file.write_text(
        json.dumps({"carol": ["sha256:" + digest.removeprefix("sha256:").upper()]})
    )
    gw = (await start_gateway(host="0.0.0.0", api_keys_file=keys_file)).stub
    carol = (("authorization", "Bearer carol-key"),)
    assert (await gw.ListJobs(pb.ListJobsRequest(), metadata=carol)).jobs == []
    # The digest is not a key: knowing the file's content does not let anyone in.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gw.ListJobs(pb.ListJobsRequest(), metadata=(("authorization", f"Bearer {digest}"),))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
