"""A job's video options reach the render and composer services, and come back in the job."""

from __future__ import annotations

import asyncio
import io
import wave

from support import finished_job

from storyreel.gateway.v1 import gateway_pb2 as pb
from storyreel.types.v1 import types_pb2


async def _upload(stub) -> str:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:  # a real WAV: the composer probes every upload
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(8000)
        out.writeframes(b"\x00\x00" * 8000)
    wav = buffer.getvalue()

    async def chunks():
        yield pb.UploadAudioRequest(filename="music.wav")
        yield pb.UploadAudioRequest(chunk=wav)

    return (await stub.UploadAudio(chunks())).audio_uri


async def test_the_options_of_a_job_reach_the_services_and_come_back(gateway, upstream):
    audio_uri = await _upload(gateway)
    request = pb.CreateVideoRequest(
        prompt="a lighthouse",
        scene_count=3,
        seed=42,
        audio_uri=audio_uri,
        aspect=types_pb2.ASPECT_9_16,
        resolution=types_pb2.RESOLUTION_1080P,
        consistency=types_pb2.CONSISTENCY_MODE_CONSISTENT_SELF_ATTENTION,
        captions=types_pb2.CAPTIONS_SIDECAR,
        audio_mode=types_pb2.AUDIO_MODE_MUSIC,
        voice="joe",
    )
    job = await finished_job(gateway, (await gateway.CreateVideo(request)).job_id)
    assert job.state == pb.JOB_STATE_DONE, job.error

    (render,) = upstream.render_messages
    assert render.job_seed == 42
    assert render.consistency == types_pb2.CONSISTENCY_MODE_CONSISTENT_SELF_ATTENTION
    assert render.aspect == types_pb2.ASPECT_9_16
    assert (render.width, render.height) == (0, 0)
    # Only the cast's characters travel, each with its fixed appearance; a name the
    # storyboard never cast ("Ghost") is not sent.
    assert [(c.name, c.appearance) for c in render.characters] == [("Ada", "red coat")]
    assert {s.index: list(s.characters) for s in render.scenes} == {1: ["Ada"], 2: [], 3: ["Ada"]}

    (compose,) = upstream.compose_requests
    assert compose.aspect == types_pb2.ASPECT_9_16
    assert compose.resolution == types_pb2.RESOLUTION_1080P
    assert (compose.width, compose.height) == (0, 0)
    assert compose.captions == types_pb2.CAPTIONS_SIDECAR
    assert compose.audio_mode == types_pb2.AUDIO_MODE_MUSIC
    assert compose.audio_uri == audio_uri
    assert compose.voice == "joe"
    assert compose.seed == 42

    assert job.aspect == types_pb2.ASPECT_9_16
    assert job.consistency == types_pb2.CONSISTENCY_MODE_CONSISTENT_SELF_ATTENTION
    assert (job.width, job.height) == (720, 1280)  # as the composer reported it
    for artifact, name in (
        (job.captions_srt, "captions.srt"),
        (job.captions_vtt, "captions.vtt"),
        (job.poster, "poster.png"),
        (job.contact_sheet, "contact-sheet.png"),
    ):
        assert artifact.uri.endswith(f"/video/{name}")
        assert artifact.url.endswith(name)  # file storage: a local path


async def test_images_take_the_video_shape_unless_the_gateway_fixes_a_size(start_gateway, upstream):
    free = (await start_gateway()).stub
    fixed = (await start_gateway(render_width=512, render_height=512)).stub
    jobs = await asyncio.gather(
        free.CreateVideo(pb.CreateVideoRequest(prompt="x", scene_count=1, width=480, height=848)),
        fixed.CreateVideo(pb.CreateVideoRequest(prompt="y", scene_count=1)),
    )
    await finished_job(free, jobs[0].job_id)
    await finished_job(fixed, jobs[1].job_id)
    shapes = {r.job_id: (r.aspect, r.width, r.height) for r in upstream.render_messages}
    assert shapes[jobs[0].job_id] == (types_pb2.ASPECT_9_16, 0, 0)
    assert shapes[jobs[1].job_id] == (types_pb2.ASPECT_UNSPECIFIED, 512, 512)


async def test_a_scene_regenerated_with_a_new_seed_is_drawn_from_it_not_the_seed_lock(
    gateway, upstream
):
    job_id = (
        await gateway.CreateVideo(pb.CreateVideoRequest(prompt="x", scene_count=2, seed=5))
    ).job_id
    await finished_job(gateway, job_id)
    assert upstream.render_messages[0].consistency == types_pb2.CONSISTENCY_MODE_UNSPECIFIED

    await gateway.RegenerateScene(pb.RegenerateSceneRequest(job_id=job_id, index=1))
    await finished_job(gateway, job_id)
    assert upstream.render_messages[1].consistency == types_pb2.CONSISTENCY_MODE_UNSPECIFIED

    await gateway.RegenerateScene(pb.RegenerateSceneRequest(job_id=job_id, index=1, seed=99))
    job = await finished_job(gateway, job_id)
    last = upstream.render_messages[2]
    assert last.consistency == types_pb2.CONSISTENCY_MODE_NONE
    assert [(s.index, s.seed, list(s.characters)) for s in last.scenes] == [(1, 99, ["Ada"])]
    assert job.state == pb.JOB_STATE_DONE
