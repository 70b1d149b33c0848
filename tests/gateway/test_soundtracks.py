"""Soundtracks through the gateway, read by the real composer (issue 17, items 1 and 5).

The same formats are accepted everywhere (``storyreel.limits.AUDIO_FORMATS``): a WebM/Opus
soundtrack is uploaded, probed and used by a whole job. Damaged audio is refused at upload,
named by the caller's own file name, never by our object's URI. And a scene image far smaller
than the frame is warned of in the job's events.
"""

from __future__ import annotations

import io
import math

import grpc
import pytest
from PIL import Image
from storyreel_composer.service import ComposerService
from storyreel_composer.settings import ComposerSettings
from storyreel_gateway.audio import SNIFF_BYTES, sniff_audio
from support import lavfi_media, probe_media, upload_requests, watch_events

from storyreel.gateway.v1 import gateway_pb2 as pb
from storyreel.limits import AUDIO_FORMATS
from storyreel.serving import create_server
from storyreel.types.v1 import types_pb2

#: ffmpeg output options of a short tone in each soundtrack format.
ENCODINGS = {
    "wav": (),
    "mp3": ("-c:a", "libmp3lame"),
    "ogg": ("-c:a", "libopus"),
    "flac": (),
    "m4a": ("-c:a", "aac"),
    "aac": ("-c:a", "aac", "-f", "adts"),
    "webm": ("-c:a", "libopus"),
}


@pytest.fixture
async def real_composer(file_store, tmp_path):
    """The real composer's gRPC server (voice not loaded: soundtracks need none)."""
    settings = ComposerSettings(port=0, work_dir=tmp_path / "composer-work")
    running = await create_server(settings, ComposerService(settings, file_store))
    await running.set_serving(True)
    yield f"127.0.0.1:{running.port}"
    await running.stop(0)


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (40, 120, 200)).save(buffer, "PNG")
    return buffer.getvalue()


async def _soundtrack_job(stub, audio_uri: str) -> list:
    request = pb.CreateVideoRequest(
        prompt="a fox",
        scene_count=2,
        audio_uri=audio_uri,
        audio_mode=types_pb2.AUDIO_MODE_SOUNDTRACK,
        captions=types_pb2.CAPTIONS_OFF,
        width=160,
        height=96,
        fps=8,
    )
    job_id = (await stub.CreateVideo(request)).job_id
    return await watch_events(stub, job_id, timeout=120)


async def _refused(call) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    return caught.value.details()


def test_the_gateway_recognises_every_soundtrack_format(tmp_path):
    assert set(ENCODINGS) == set(AUDIO_FORMATS)
    for extension, options in ENCODINGS.items():
        path = lavfi_media(tmp_path / f"tone.{extension}", "sine", 0.5, *options)
        assert sniff_audio(path.read_bytes()[:SNIFF_BYTES]) == extension


async def test_a_webm_soundtrack_is_uploaded_and_a_job_is_composed_over_it(
    real_composer, start_gateway, upstream, file_store, tmp_path
):
    upstream.scene_image = lambda seed: _png(320, 192)
    gateway = await start_gateway(composer_address=real_composer, max_upload_bytes=1 << 20)
    webm = lavfi_media(tmp_path / "theme.webm", "sine=frequency=440", 2.0, "-c:a", "libopus")

    upload = await gateway.stub.UploadAudio(upload_requests(webm.read_bytes(), "theme.webm"))
    assert upload.audio_uri.endswith("/audio.webm")
    assert (upload.codec, upload.format) == ("opus", "matroska,webm")
    assert math.isclose(upload.duration_s, 2.0, abs_tol=0.03)

    events = await _soundtrack_job(gateway.stub, upload.audio_uri)
    job = events[-1].job
    assert job.state == pb.JOB_STATE_DONE, job.error.message
    # The video lasts as long as the soundtrack (to the frame) and carries it as AAC.
    video = probe_media(file_store.path_of(job.video_uri))
    assert video.audio_codec == "aac"
    assert math.isclose(job.duration_s, 2.0, abs_tol=1 / 8)
    assert math.isclose(video.duration_s, job.duration_s, abs_tol=0.1)
    # Images of a fair size: the compose stage has nothing to warn of.
    finished = {e.stage: e.message for e in events if e.kind == pb.EVENT_KIND_STAGE_FINISHED}
    assert finished[pb.STAGE_COMPOSE] == ""


async def test_a_tiny_scene_image_is_warned_of_in_the_jobs_events(
    real_composer, start_gateway, upstream, tmp_path
):
    upstream.scene_image = lambda seed: _png(16, 12)
    gateway = await start_gateway(composer_address=real_composer)
    wav = lavfi_media(tmp_path / "a.wav", "sine", 1.0, "-ar", "8000")
    upload = await gateway.stub.UploadAudio(upload_requests(wav.read_bytes(), "a.wav"))

    events = await _soundtrack_job(gateway.stub, upload.audio_uri)
    assert events[-1].job.state == pb.JOB_STATE_DONE, events[-1].job.error.message
    finished = {e.stage: e.message for e in events if e.kind == pb.EVENT_KIND_STAGE_FINISHED}
    said = finished[pb.STAGE_COMPOSE].splitlines()
    # 16x12 covering 160x96: enlarged 10 times. Each scene by its number, no object key.
    assert [line.split(" is only ")[0] for line in said] == ["scene 1 image", "scene 2 image"]
    assert all("16x12 pixels" in line and "10.0 times" in line for line in said), said
    assert not any("jobs/" in line or "://" in line for line in said), said
    # And in the job itself (Job.warnings), as GetJob gives it.
    assert list(events[-1].job.warnings) == said


@pytest.mark.parametrize("xing", [True, False], ids=["with-xing-header", "without"])
async def test_a_truncated_mp3_is_refused_at_upload_naming_the_users_file(
    real_composer, start_gateway, file_store, tmp_path, xing
):
    gateway = await start_gateway(composer_address=real_composer)
    options = ("-c:a", "libmp3lame") + (() if xing else ("-write_xing", "0"))
    mp3 = lavfi_media(tmp_path / "song.mp3", "sine", 5.0, *options).read_bytes()

    details = await _refused(gateway.stub.UploadAudio(upload_requests(mp3[:1000], "My Song.mp3")))
    assert details.startswith("the upload 'My Song.mp3' is not usable audio: "), details
    assert "uploads/" not in details and "://" not in details, details
    assert list(file_store.list()) == []  # nothing kept


async def test_a_hostile_file_name_is_quoted_and_cut_in_the_refusal(
    real_composer, start_gateway, tmp_path
):
    gateway = await start_gateway(composer_address=real_composer)
    mp3 = lavfi_media(tmp_path / "song.mp3", "sine", 5.0, "-c:a", "libmp3lame").read_bytes()
    name = "evil\n\x1b[31m" + "x" * 50_000 + ".mp3"

    details = await _refused(gateway.stub.UploadAudio(upload_requests(mp3[:1000], name)))
    assert len(details) < 1000, len(details)
    assert "\n" not in details and "\x1b" not in details
    assert "is not usable audio" in details
