"""A job's video options reach the render and composer services, and come back in the job."""

from __future__ import annotations

import asyncio

from support import finished_job, upload_audio

from storyreel.gateway.v1 import gateway_pb2 as pb
from storyreel.seeds import scene_seed
from storyreel.types.v1 import types_pb2


async def test_the_options_of_a_job_reach_the_services_and_come_back(gateway, upstream):
    audio_uri = (await upload_audio(gateway, filename="music.wav")).audio_uri
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
    assert (job.width, job.height) == (1080, 1920)  # as the composer reported it
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


async def test_a_regenerated_scene_keeps_its_own_seed_and_the_job_its_consistency(
    gateway, upstream
):
    request = pb.CreateVideoRequest(
        prompt="x", scene_count=2, seed=5, consistency=types_pb2.CONSISTENCY_MODE_SEED_LOCK
    )
    job_id = (await gateway.CreateVideo(request)).job_id
    first = await finished_job(gateway, job_id)
    # Every scene is sent with seed 0: the diffusion service derives it from the job seed
    # and applies its seed lock.
    render = upstream.render_messages[0]
    assert render.job_seed == 5
    assert [s.seed for s in render.scenes] == [0, 0]
    assert [i.seed for i in first.images] == [scene_seed(5, 1), scene_seed(5, 2)]

    def last_render():
        last = upstream.render_messages[-1]
        assert last.consistency == types_pb2.CONSISTENCY_MODE_SEED_LOCK
        assert last.job_seed == 5
        return [(s.index, s.seed, list(s.characters)) for s in last.scenes]

    await gateway.RegenerateScene(pb.RegenerateSceneRequest(job_id=job_id, index=1, seed=99))
    job = await finished_job(gateway, job_id)
    assert last_render() == [(1, 99, ["Ada"])]
    assert job.consistency == types_pb2.CONSISTENCY_MODE_SEED_LOCK
    assert {i.index: i.seed for i in job.images} == {1: 99, 2: scene_seed(5, 2)}

    # The other scene is still sent without a seed of its own; scene 1 keeps 99.
    await gateway.RegenerateScene(pb.RegenerateSceneRequest(job_id=job_id, index=2))
    await finished_job(gateway, job_id)
    assert last_render() == [(2, 0, [])]
    await gateway.RegenerateScene(pb.RegenerateSceneRequest(job_id=job_id, index=1))
    await finished_job(gateway, job_id)
    assert last_render() == [(1, 99, ["Ada"])]

    # Seed 0 removes the scene's own seed: it goes back to the derived one.
    await gateway.RegenerateScene(pb.RegenerateSceneRequest(job_id=job_id, index=1, seed=0))
    job = await finished_job(gateway, job_id)
    assert last_render() == [(1, 0, ["Ada"])]
    assert {i.index: i.seed for i in job.images} == {1: scene_seed(5, 1), 2: scene_seed(5, 2)}
    assert job.state == pb.JOB_STATE_DONE


async def test_the_feed_portrait_and_cinema_shapes_reach_both_services_and_come_back(
    gateway, upstream
):
    for aspect, size in (
        (types_pb2.ASPECT_4_5, (1080, 1350)),
        (types_pb2.ASPECT_21_9, (2520, 1080)),
    ):
        request = pb.CreateVideoRequest(
            prompt="a harbour", scene_count=1, aspect=aspect, resolution=types_pb2.RESOLUTION_1080P
        )
        job = await finished_job(gateway, (await gateway.CreateVideo(request)).job_id)
        assert job.state == pb.JOB_STATE_DONE, job.error
        render = upstream.render_messages[-1]
        compose = upstream.compose_requests[-1]
        assert render.aspect == compose.aspect == job.aspect == aspect
        assert (render.width, render.height, compose.width, compose.height) == (0, 0, 0, 0)
        assert (job.width, job.height) == size
