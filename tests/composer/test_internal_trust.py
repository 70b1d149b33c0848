"""The composer service answers only the gateway, and reads only the job's own objects.

Real ComposerService servers on real ports. Finding 2 of issue 11: a direct Compose
call from loopback replaced another tenant's video with one carrying a third tenant's
private upload. Now a call without the deployment's internal token is UNAUTHENTICATED,
and even with it a request naming another job's images, or audio outside the uploads,
is INVALID_ARGUMENT before anything is read or stored. No voice is loaded here.
"""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest
from storyreel_composer.composer import Scene
from storyreel_composer.service import ComposerService
from support import stored_uris

from storyreel.channels import open_channel
from storyreel.composer.v1 import composer_pb2, composer_pb2_grpc
from storyreel.errors import InvalidInput
from storyreel.serving import create_server
from storyreel.settings import InternalSettings
from storyreel.types.v1 import types_pb2

TOKEN = "compose-internal-token-0123456789"
VICTIM = "job-of-another-tenant"
ATTACKER = "job-the-caller-names"


@pytest.fixture
def reads(file_store, monkeypatch) -> list[str]:
    """Every object the store is asked about or read from, in order."""
    seen: list[str] = []
    for name in ("exists", "get_bytes", "download", "open_read"):
        original = getattr(file_store, name)

        def spy(uri, *args, _original=original, **kwargs):
            seen.append(uri)
            return _original(uri, *args, **kwargs)

        monkeypatch.setattr(file_store, name, spy)
    return seen


@pytest.fixture
async def server(composer_settings, file_store, monkeypatch):
    """A compose server that requires the token (from the environment, as deployed)."""
    monkeypatch.setenv("STORYREEL_INTERNAL_TOKEN", TOKEN)
    service = ComposerService(composer_settings, file_store)
    running = await create_server(composer_settings, service)
    await running.set_serving(True)
    yield running
    await running.stop(0)


@pytest.fixture
def victim(file_store, images, make_audio) -> dict[str, str]:
    """Another tenant's scene image and video, and a third tenant's private upload."""
    audio = make_audio("private.wav", "sine", 1.0)
    return {
        "image": file_store.put_bytes(
            f"jobs/{VICTIM}/images/scene-001.png", file_store.get_bytes(images[0])
        ),
        "video": file_store.put_bytes(f"jobs/{VICTIM}/video/video.mp4", b"the victim's video"),
        "third_image": file_store.put_bytes(
            "jobs/job-of-a-third-tenant/images/scene-001.png", file_store.get_bytes(images[1])
        ),
        "upload": file_store.put_file("uploads/third-tenant/abc/private.wav", audio),
    }


def hijack(victim: dict[str, str], job_id: str = VICTIM, **fields) -> composer_pb2.ComposeRequest:
    """What the attacker sent: the victim's job, its image and a third tenant's upload."""
    values = {
        "job_id": job_id,
        "scenes": [composer_pb2.Scene(image_uri=victim["image"])],
        "audio_uri": victim["upload"],
        "fps": 8,
        "width": 64,
        "height": 64,
        "captions": types_pb2.CAPTIONS_OFF,
    }
    return composer_pb2.ComposeRequest(**(values | fields))


async def test_direct_calls_without_the_token_are_unauthenticated(
    server, victim, file_store, reads
):
    before = {uri: file_store.get_bytes(uri) for uri in stored_uris(file_store)}
    reads.clear()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = composer_pb2_grpc.ComposerServiceStub(channel)
        calls = {
            "Compose": lambda: stub.Compose(hijack(victim), timeout=60),
            "ProbeAudio": lambda: stub.ProbeAudio(
                composer_pb2.ProbeAudioRequest(uri=victim["upload"]), timeout=60
            ),
            "ListVoices": lambda: stub.ListVoices(composer_pb2.ListVoicesRequest(), timeout=60),
        }
        for name, call in calls.items():
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call()
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
    # Nothing was read, the victim's video is untouched and nothing new is stored.
    assert reads == []
    assert {uri: file_store.get_bytes(uri) for uri in stored_uris(file_store)} == before


@pytest.mark.parametrize(
    ("name", "request_of", "message"),
    [
        (
            "another job's image",
            lambda v: hijack(v, ATTACKER, audio_uri=""),
            f"scene 1 image_uri {{image!r}} is not in this job's folder jobs/{ATTACKER}/",
        ),
        (
            "the victim's job_id, a third job's image",
            lambda v: hijack(v, scenes=[composer_pb2.Scene(image_uri=v["third_image"])]),
            f"scene 1 image_uri {{third_image!r}} is not in this job's folder jobs/{VICTIM}/",
        ),
        (
            "audio that is no upload",
            lambda v: hijack(v, audio_uri=v["video"]),
            "audio_uri {video!r} is not an upload: only uploads/ is read",
        ),
    ],
)
async def test_with_the_token_only_the_jobs_own_images_and_uploads_are_read(
    server, victim, file_store, reads, name, request_of, message
):
    before = {uri: file_store.get_bytes(uri) for uri in stored_uris(file_store)}
    reads.clear()
    internal = InternalSettings(token=TOKEN)
    address = f"127.0.0.1:{server.port}"
    async with open_channel(address, internal=internal) as channel:
        stub = composer_pb2_grpc.ComposerServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Compose(request_of(victim), timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
    assert message.format(**victim) in caught.value.details()
    assert reads == [], f"{name}: read {reads}"
    assert {uri: file_store.get_bytes(uri) for uri in stored_uris(file_store)} == before


def test_what_the_gateway_sends_passes_the_check(unvoiced_composer, file_store):
    job = "job-own"
    own = [
        file_store.uri_for(f"jobs/{job}/images/scene-001.png"),
        file_store.uri_for(f"jobs/{job}/r3/images/scene-002.png"),  # a regenerated scene
    ]
    upload = file_store.uri_for("uploads/0123abcd/x/song.mp3")
    unvoiced_composer.check_job_inputs(job, [Scene(uri) for uri in own], upload)
    unvoiced_composer.check_job_inputs(job, [Scene(uri) for uri in own], None)
    # A folder whose name starts like the job's is another job's.
    other = file_store.uri_for(f"jobs/{job}-2/images/scene-001.png")
    with pytest.raises(InvalidInput, match="is not in this job's folder"):
        unvoiced_composer.check_job_inputs(job, [Scene(other)], None)
    escaped = file_store.root_uri + f"jobs/{job}/..%2F{job}-2/images/scene-001.png"
    with pytest.raises(InvalidInput):
        unvoiced_composer.check_request(job, [Scene(escaped)], None)


def test_the_service_refuses_to_start_beyond_the_loopback_without_a_token(tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith("STORYREEL_")} | {
        "STORYREEL_COMPOSER_HOST": "0.0.0.0",
        "STORYREEL_COMPOSER_PORT": "0",
        "STORYREEL_STORAGE_URL": (tmp_path / "artifacts").as_uri(),
    }
    result = subprocess.run(
        [sys.executable, "-m", "storyreel_composer"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "refusing to listen on 0.0.0.0" in result.stderr
    assert "STORYREEL_INTERNAL_TOKEN_FILE" in result.stderr
