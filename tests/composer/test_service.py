"""ComposerService through a real gRPC server on a real port, driven by the generated stub."""

from __future__ import annotations

import grpc
import pytest
from storyreel_composer.service import ComposerService
from storyreel_composer.settings import ComposerSettings
from support import health_status, lavfi_media, probe_media, stored_uris

from storyreel.channels import open_channel
from storyreel.composer.v1 import composer_pb2, composer_pb2_grpc
from storyreel.serving import create_server
from storyreel.types.v1 import types_pb2

SERVICE_NAME = "storyreel.composer.v1.ComposerService"

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
    async with open_channel(f"127.0.0.1:{server.port}") as channel:
        yield composer_pb2_grpc.ComposerServiceStub(channel)


@pytest.fixture
def job_images(images, file_store):
    """``job_images(job)``: the three scene images, copied into the job's own folder.

    The service reads only the images of the job it composes (jobs/<job_id>/), as the
    gateway lays them out.
    """

    def copy(job: str) -> list[str]:
        return [
            file_store.put_bytes(
                f"jobs/{job}/images/scene-{n:03d}.png", file_store.get_bytes(uri), "image/png"
            )
            for n, uri in enumerate(images, start=1)
        ]

    return copy


async def refused(stub, request, file_store) -> str:
    """Compose ``request``, which must fail INVALID_ARGUMENT and store nothing: the details."""
    before = set(stored_uris(file_store))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Compose(request, timeout=60)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(stored_uris(file_store)) == before
    return raised.value.details()


async def test_health_is_not_serving_until_the_voice_is_loaded(server):
    address = f"127.0.0.1:{server.port}"
    assert await health_status(address) == "NOT_SERVING"
    assert await health_status(address, SERVICE_NAME) == "NOT_SERVING"
    await load(server)
    assert server.service.synthesizer.loaded
    assert await health_status(address) == "SERVING"
    assert await health_status(address, SERVICE_NAME) == "SERVING"


async def test_compose_through_the_stub_stores_a_narrated_h264_aac_mp4(
    stub, job_images, file_store
):
    images = job_images("job-grpc")
    request = composer_pb2.ComposeRequest(
        job_id="job-grpc",
        scenes=[
            composer_pb2.Scene(image_uri=images[0], narration="The sea was calm."),
            composer_pb2.Scene(image_uri=images[1], narration="Then the whale came."),
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
    assert (response.narration_synthesized, response.narration_cached) == (2, 0)
    # Composed again, both scenes' speech comes from the narration cache.
    request.revision = 1
    again = await stub.Compose(request, timeout=120)
    assert (again.narration_synthesized, again.narration_cached) == (0, 2)
    assert list(again.scene_starts_s) == list(response.scene_starts_s)


async def test_missing_image_uri_is_invalid_argument_and_nothing_is_stored(
    stub, job_images, file_store
):
    images = job_images("job-grpc-bad")
    request = composer_pb2.ComposeRequest(
        job_id="job-grpc-bad",
        scenes=[
            composer_pb2.Scene(image_uri=images[0], narration="Hello."),
            composer_pb2.Scene(narration="This scene has no picture."),
        ],
    )
    assert await refused(stub, request, file_store) == "scene 2 has no image_uri"


async def test_bad_audio_is_invalid_argument_and_nothing_is_stored(stub, job_images, file_store):
    images = job_images("job-grpc-audio")
    audio_uri = file_store.put_bytes("uploads/tenant/x/voice.mp3", b"ID3 but no frames at all")
    request = composer_pb2.ComposeRequest(
        job_id="job-grpc-audio",
        scenes=[composer_pb2.Scene(image_uri=images[0], narration="Hello.")],
        audio_uri=audio_uri,
    )
    assert f"audio_uri {audio_uri} is not usable audio" in await refused(stub, request, file_store)


async def test_look_and_sound_options_travel_through_the_stub(
    stub, job_images, file_store, tmp_path
):
    images = job_images("job-grpc-options")
    audio = lavfi_media(tmp_path / "music.flac", "sine", 1.5)
    audio_uri = file_store.put_file("uploads/tenant/x/music.flac", audio)
    request = composer_pb2.ComposeRequest(
        job_id="job-grpc-options",
        scenes=[
            composer_pb2.Scene(image_uri=images[0], narration="The sea was calm."),
            composer_pb2.Scene(image_uri=images[1], narration="Then the whale came."),
        ],
        audio_uri=audio_uri,
        fps=12,
        aspect=types_pb2.ASPECT_9_16,
        resolution=types_pb2.RESOLUTION_480P,
        fit=composer_pb2.FIT_BLUR,
        transition=composer_pb2.TRANSITION_CUT,
        motion=composer_pb2.MOTION_NONE,
        captions=types_pb2.CAPTIONS_SIDECAR,
        audio_mode=types_pb2.AUDIO_MODE_MUSIC,
        speaking_rate=1.25,
        seed=7,
    )
    response = await stub.Compose(request, timeout=120)

    assert (response.width, response.height, response.fps) == (480, 854, 12)
    media = probe_media(file_store.path_of(response.video_uri))
    assert (media.width, media.height, media.video_codec, media.pix_fmt) == (
        480,
        854,
        "h264",
        "yuv420p",
    )
    # Music mode: the narration sets the length, not the 1.5 s track.
    assert response.duration_s > 2.0
    prefix = "jobs/job-grpc-options/video/"
    assert response.captions_srt_uri == file_store.uri_for(prefix + "captions.srt")
    assert response.captions_vtt_uri == file_store.uri_for(prefix + "captions.vtt")
    assert response.poster_uri == file_store.uri_for(prefix + "poster.png")
    assert response.contact_sheet_uri == file_store.uri_for(prefix + "contact-sheet.png")


async def test_unknown_voice_is_invalid_argument_and_nothing_is_stored(
    stub, job_images, file_store
):
    images = job_images("job-grpc-voice")
    request = composer_pb2.ComposeRequest(
        job_id="job-grpc-voice",
        scenes=[composer_pb2.Scene(image_uri=images[0], narration="Hello.")],
        voice="amy",
    )
    assert await refused(stub, request, file_store) == "voice 'amy' is not one of joe"


ARTIFACTS = ("video.mp4", "captions.srt", "captions.vtt", "poster.png", "contact-sheet.png")


def artifact_uris(response: composer_pb2.ComposeResponse) -> list[str]:
    """URIs of everything a composition stored, in ARTIFACTS order."""
    return [
        response.video_uri,
        response.captions_srt_uri,
        response.captions_vtt_uri,
        response.poster_uri,
        response.contact_sheet_uri,
    ]


async def test_a_later_revision_stores_every_artifact_under_its_own_folder(
    stub, job_images, file_store
):
    job = "job-grpc-revisions"
    images = job_images(job)

    def run(revision: int, clips: list[tuple[str, str]]) -> composer_pb2.ComposeRequest:
        return composer_pb2.ComposeRequest(
            job_id=job,
            scenes=[composer_pb2.Scene(image_uri=u, narration=n) for u, n in clips],
            fps=12,
            width=160,
            height=96,
            captions=types_pb2.CAPTIONS_SIDECAR,
            revision=revision,
        )

    first = await stub.Compose(
        run(0, [(images[0], "The sea was calm."), (images[1], "Then the whale came.")]),
        timeout=120,
    )
    assert artifact_uris(first) == [file_store.uri_for(f"jobs/{job}/video/{a}") for a in ARTIFACTS]
    before = {uri: file_store.get_bytes(uri) for uri in artifact_uris(first)}

    # The second run swaps the scenes and changes a line: every artifact differs.
    second = await stub.Compose(
        run(2, [(images[1], "The whale came first."), (images[0], "Then the sea was calm.")]),
        timeout=120,
    )
    assert artifact_uris(second) == [
        file_store.uri_for(f"jobs/{job}/r2/video/{a}") for a in ARTIFACTS
    ]
    for old, new in zip(artifact_uris(first), artifact_uris(second), strict=True):
        assert file_store.get_bytes(new) != before[old], new
    # The first run's artifacts are all still there, byte for byte.
    assert {uri: file_store.get_bytes(uri) for uri in before} == before
    assert sorted(file_store.list(f"jobs/{job}/")) == sorted(
        images + artifact_uris(first) + artifact_uris(second)
    )


@pytest.mark.parametrize("revision", [2**31, 2**32 - 1])
async def test_a_revision_of_2_31_or_more_is_invalid_argument_and_nothing_is_stored(
    stub, job_images, file_store, revision
):
    images = job_images("job-grpc-revision")
    request = composer_pb2.ComposeRequest(
        job_id="job-grpc-revision",
        scenes=[composer_pb2.Scene(image_uri=images[0], narration="Hello.")],
        revision=revision,
    )
    assert await refused(stub, request, file_store) == (
        f"revision must be a whole number from 0 to 2**31-1, got {revision}"
    )
