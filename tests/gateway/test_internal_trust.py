"""The gateway presents the deployment's internal token (and, with mutual TLS, its client
certificate) to the story, render and composer services; and its secrets may be files.

The upstreams are the gateway's test doubles served by storyreel.serving as internal
services (``internal_upstream``), so they want the token as the real ones do.
"""

from __future__ import annotations

import grpc
import pytest
from storyreel_gateway.settings import GatewaySettings
from support import finished_job, make_internal_tls

from storyreel.gateway.v1 import gateway_pb2 as pb
from storyreel.settings import InternalSettings, StorageSettings

TOKEN = "gateway-internal-token-0123456789"


def upstream_at(state) -> dict[str, str]:
    return {f"{name}_address": state.address for name in ("llm", "diffusion", "composer")}


async def run_job(gateway, voice: str = "joe") -> pb.Job:
    # A named voice makes admission ask the composer for its voices (ListVoices).
    request = pb.CreateVideoRequest(prompt="a lighthouse keeper", scene_count=2, voice=voice)
    return await finished_job(gateway.stub, (await gateway.stub.CreateVideo(request)).job_id)


async def test_the_gateway_gets_through_services_that_want_the_token(
    internal_upstream, start_gateway
):
    internal = InternalSettings(token=TOKEN)
    upstream = await internal_upstream(internal)
    gateway = await start_gateway(internal=internal, **upstream_at(upstream))
    job = await run_job(gateway)
    assert job.state == pb.JOB_STATE_DONE, job.error
    assert len(upstream.story_requests) == 1
    assert len(upstream.compose_requests) == 1


async def test_a_gateway_with_another_token_is_refused_and_its_job_fails_saying_so(
    internal_upstream, start_gateway
):
    upstream = await internal_upstream(InternalSettings(token=TOKEN))
    stranger = InternalSettings(token="not-this-deployments-token-0123")
    gateway = await start_gateway(
        internal=stranger, retry_give_up_after_s=1.0, **upstream_at(upstream)
    )
    # Admission cannot list the voices: the caller is told to try again later.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await run_job(gateway)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "UNAUTHENTICATED" in caught.value.details()
    # A job that needs no voice list runs, is refused by the LLM service (retried
    # while a new token might still be rolling out), and fails naming the cause.
    job = await run_job(gateway, voice="")
    assert job.state == pb.JOB_STATE_FAILED
    assert job.error.code == "UNAUTHENTICATED", job.error
    assert "wrong internal token" in job.error.message
    assert upstream.story_requests == []


async def test_the_gateway_gets_through_services_that_want_mutual_tls(
    internal_upstream, start_gateway, tmp_path
):
    tls = make_internal_tls(tmp_path / "tls")
    internal = InternalSettings(
        token=TOKEN, tls_ca_file=tls.ca, tls_cert_file=tls.cert, tls_key_file=tls.key
    )
    upstream = await internal_upstream(internal)
    # Health over mutual TLS too: the gateway reports SERVING only once its upstreams do.
    gateway = await start_gateway(internal=internal, **upstream_at(upstream))
    job = await run_job(gateway)
    assert job.state == pb.JOB_STATE_DONE, job.error
    assert len(upstream.compose_requests) == 1


# --- secrets as files -----------------------------------------------------------------------


def test_the_database_url_may_come_from_a_file(tmp_path, monkeypatch):
    url = "postgresql+asyncpg://storyreel:pa55word@postgres:5432/storyreel"
    path = tmp_path / "url"
    path.write_text(url + "\n")
    monkeypatch.delenv("STORYREEL_GATEWAY_DATABASE_URL", raising=False)
    monkeypatch.setenv("STORYREEL_GATEWAY_DATABASE_URL_FILE", str(path))
    assert GatewaySettings().database_url == url
    # The variable itself still works; both at once is an error that shows neither.
    monkeypatch.delenv("STORYREEL_GATEWAY_DATABASE_URL_FILE")
    monkeypatch.setenv("STORYREEL_GATEWAY_DATABASE_URL", url)
    assert GatewaySettings().database_url == url
    monkeypatch.setenv("STORYREEL_GATEWAY_DATABASE_URL_FILE", str(path))
    with pytest.raises(ValueError, match="not both") as caught:
        GatewaySettings()
    assert "pa55word" not in str(caught.value)


def test_the_s3_keys_may_come_from_files(tmp_path, monkeypatch):
    (tmp_path / "access").write_text("storyreel-access\n")
    (tmp_path / "secret").write_text("  s3-secret-value\n")
    for name in ("ACCESS_KEY", "SECRET_KEY"):
        monkeypatch.delenv(f"STORYREEL_STORAGE_S3_{name}", raising=False)
    monkeypatch.setenv("STORYREEL_STORAGE_S3_ACCESS_KEY_FILE", str(tmp_path / "access"))
    monkeypatch.setenv("STORYREEL_STORAGE_S3_SECRET_KEY_FILE", str(tmp_path / "secret"))
    settings = StorageSettings()
    assert settings.s3_access_key == "storyreel-access"
    assert settings.s3_secret_key.get_secret_value() == "s3-secret-value"
    monkeypatch.setenv("STORYREEL_STORAGE_S3_SECRET_KEY", "s3-secret-value")
    with pytest.raises(ValueError, match=r"STORYREEL_STORAGE_S3_SECRET_KEY or .*_FILE, not both"):
        StorageSettings()
    monkeypatch.delenv("STORYREEL_STORAGE_S3_SECRET_KEY")
    (tmp_path / "secret").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        StorageSettings()
