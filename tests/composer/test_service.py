"""ComposeService through a real gRPC server on a real port, driven by the generated stub."""

from __future__ import annotations

import grpc
import pytest
from storyreel_composer.service import ComposerService
from storyreel_composer.settings import ComposerSettings
from support import health_status, probe_media, stored_uris

from storyreel.channels import open_channel
from storyreel.compose.v1 import compose_pb2, compose_pb2_grpc
from storyreel.serving import create_server

SERVICE_NAME = "storyreel.compose.v1.ComposeService"

pytestmark = pytest.mark.model


@pytest.fixture
async def server(composer_settings: ComposerSettings, file_store):
    """A composer server whose health is checked before and after its voice loads."""
    service = ComposerService(composer_settings, file_store)
    running = await create_server(composer_settings, service)
    try:
        yield running
    finally:
        await running.stop(0)


async def load(server) -> None:
    """What storyreel.serving.start_and_load does after the server starts."""
    await server.service.load()
    await server.set_serving(True)


@pytest.fixture
async def stub(server):
    await load(server)
    async with open_channel(f"127.0.0.1:{server.port}", retries=False) as channel:
        yield compose_pb2_grpc.ComposeServiceStub(channel)


async def test_health_is_not_serving_until_the_voice_is_loaded(server):
    address = f"127.0.0.1:{server.port}"
    assert await health_status(address) == "NOT_SERVING"
    assert await health_status(address, SERVICE_NAME) == "NOT_SERVING"
    await load(server)
    assert server.service.synthesizer.loaded
    assert await health_status(address) == "SERVING"
    assert await health_status(address, SERVICE_NAME) == "SERVING"


async def test_compose_through_the_stub_stores_a_narrated_h264_aac_mp4(stub, images, file_store):
    request = compose_pb2.ComposeRequest(
        job_id="job-grpc",
        scenes=[
            compose_pb2.SceneClip(image_uri=images[0], narration="The sea was calm."),
            compose_pb2.SceneClip(image_uri=images[1], narration="Then the whale came."),
        ],
        fps=12,
        width=160,
        height=96,
    )
    response = await stub.Compose(request, timeout=120)

    assert response.video_uri == file_store.uri_for("jobs/job-grpc/video/video.mp4")
    assert len(response.scene_starts_s) == 2 and response.scene_starts_s[0] == 0.0
    assert 0 < response.scene_starts_s[1] < response.duration_s
    media = probe_media(file_store.path_of(response.video_uri))
    assert (media.video_codec, media.pix_fmt, media.audio_codec) == ("h264", "yuv420p", "aac")
    assert (media.width, media.height, media.fps) == (160, 96, 12)
    assert media.duration_s == pytest.approx(response.duration_s, abs=1 / 12)


async def test_missing_image_uri_is_invalid_argument_and_nothing_is_stored(
    stub, images, file_store
):
    request = compose_pb2.ComposeRequest(
        job_id="job-grpc-bad",
        scenes=[
            compose_pb2.SceneClip(image_uri=images[0], narration="Hello."),
            compose_pb2.SceneClip(narration="This scene has no picture."),
        ],
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Compose(request, timeout=60)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == "scene 2 has no image_uri"
    assert sorted(stored_uris(file_store)) == sorted(images)


async def test_bad_audio_is_invalid_argument_and_nothing_is_stored(stub, images, file_store):
    audio_uri = file_store.put_bytes("jobs/inputs/audio/voice.mp3", b"ID3 but no frames at all")
    request = compose_pb2.ComposeRequest(
        job_id="job-grpc-audio",
        scenes=[compose_pb2.SceneClip(image_uri=images[0], narration="Hello.")],
        audio_uri=audio_uri,
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Compose(request, timeout=60)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"audio_uri {audio_uri} is not usable audio" in raised.value.details()
    assert sorted(stored_uris(file_store)) == sorted([*images, audio_uri])
