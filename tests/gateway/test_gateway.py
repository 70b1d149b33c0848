"""The gateway over real gRPC, with upstream test doubles (see conftest.py).

Covers validation, job records, stage events, failures and audio uploads.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging

import grpc
import pytest
from storyreel_gateway.service import GatewayService
from storyreel_gateway.settings import GatewaySettings
from support import (
    create_video,
    health_status,
    stored_uris,
    upload_audio,
    upload_requests,
    watch_events,
    wav_bytes,
)

from storyreel.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from storyreel.logs import JsonFormatter
from storyreel.serving import start_and_load


async def _finish(stub, job_id: str) -> tuple[list, gateway_pb2.Job]:
    events = await watch_events(stub, job_id, timeout=30)
    return events, events[-1].job


async def _run(stub, **fields) -> tuple[list, gateway_pb2.Job]:
    """Create a job with the request ``fields`` and watch it to the end."""
    return await _finish(stub, await create_video(stub, **fields))


async def test_health_is_serving_once_started(gateway):
    assert await health_status(gateway.address) == "SERVING"
    assert (
        await health_status(gateway.address, "storyreel.gateway.v1.StoryReelService") == "SERVING"
    )


async def test_job_runs_every_stage_and_records_it(gateway, upstream, file_store):
    job_id = await create_video(
        gateway, prompt="a fox", scene_count=3, seed=7, width=320, height=240
    )
    events, job = await _finish(gateway, job_id)

    assert job.state == gateway_pb2.JOB_STATE_DONE
    assert job.progress == 100
    assert [s.stage for s in job.stages] == [
        gateway_pb2.STAGE_STORYBOARD,
        gateway_pb2.STAGE_RENDER,
        gateway_pb2.STAGE_COMPOSE,
    ]
    assert all(s.state == gateway_pb2.JOB_STATE_DONE and s.duration_s >= 0 for s in job.stages)
    assert [image.index for image in job.images] == [1, 2, 3]
    assert job.video_uri.endswith("video.mp4") and job.duration_s == 4.5
    assert list(job.scene_starts_s) == [0.0, 1.5, 3.0]
    assert file_store.exists(job.video_uri)
    assert job.video_url == str(file_store.path_of(job.video_uri))

    kinds = [e.kind for e in events]
    assert kinds[0] == gateway_pb2.EVENT_KIND_SNAPSHOT
    assert kinds.count(gateway_pb2.EVENT_KIND_SCENE_RENDERED) == 3
    assert kinds[-1] == gateway_pb2.EVENT_KIND_JOB_FINISHED
    progress = [e.job.progress for e in events]
    assert progress == sorted(progress)

    # The composer got each image with its scene's narration, in order, at the requested size.
    compose = upstream.compose_requests[0]
    assert [s.narration for s in compose.scenes] == ["line 1", "line 2", "line 3"]
    assert (compose.width, compose.height) == (320, 240)
    # The manifest in the store holds the final state.
    manifest = file_store.get_bytes(file_store.uri_for(f"jobs/{job_id}/manifest.json"))
    assert b'"state": "done"' in manifest


async def test_same_seed_gives_same_scene_seeds(gateway):
    seeds = []
    for _ in range(2):
        _, job = await _run(gateway, prompt="a fox", scene_count=2, seed=99)
        seeds.append([image.seed for image in job.images])
    assert seeds[0] == seeds[1]
    assert seeds[0][0] != seeds[0][1]


async def test_upstream_failure_marks_job_failed_with_stage_and_code(gateway, upstream):
    upstream.render_error = grpc.StatusCode.INVALID_ARGUMENT
    _, job = await _run(gateway, prompt="a fox", scene_count=2)
    assert job.state == gateway_pb2.JOB_STATE_FAILED
    assert job.error.stage == gateway_pb2.STAGE_RENDER
    assert job.error.code == "INVALID_ARGUMENT"
    assert "render double refuses" in job.error.message
    assert job.stages[-1].state == gateway_pb2.JOB_STATE_FAILED


async def test_transient_render_failures_are_retried_until_the_job_completes(gateway, upstream):
    # The channels retry nothing: every failed call is one retry of the stage, so six
    # calls in all (storyreel.channels, storyreel.retries).
    upstream.render_error = grpc.StatusCode.UNAVAILABLE
    upstream.render_failures = 5
    events, job = await _run(gateway, prompt="a fox", scene_count=2)
    assert job.state == gateway_pb2.JOB_STATE_DONE
    retries = [e for e in events if e.kind == gateway_pb2.EVENT_KIND_RETRYING]
    assert len(retries) >= 1 and "UNAVAILABLE" in retries[0].message
    assert upstream.render_calls == 6


async def test_a_transient_failure_that_persists_fails_the_job_in_the_end(gateway, upstream):
    upstream.render_error = grpc.StatusCode.RESOURCE_EXHAUSTED
    _, job = await _run(gateway, prompt="a fox", scene_count=1)
    assert job.state == gateway_pb2.JOB_STATE_FAILED
    assert (job.error.stage, job.error.code) == (gateway_pb2.STAGE_RENDER, "RESOURCE_EXHAUSTED")
    assert upstream.render_calls > 1


async def test_unreachable_upstream_fails_the_job_and_names_the_service(file_store):
    settings = GatewaySettings(
        port=0, llm_address="127.0.0.1:1", storyboard_timeout_s=5, retry_give_up_after_s=1
    )
    running = await start_and_load(settings, GatewayService(settings, file_store))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = gateway_pb2_grpc.StoryReelServiceStub(channel)
            _, job = await _run(stub, prompt="x")
    finally:
        await running.stop(0)
    assert job.state == gateway_pb2.JOB_STATE_FAILED
    assert job.error.stage == gateway_pb2.STAGE_STORYBOARD
    assert job.error.code in {"UNAVAILABLE", "DEADLINE_EXCEEDED"}
    assert "story" in job.error.message


async def test_the_composers_warnings_are_told_when_the_compose_stage_finishes(gateway, upstream):
    upstream.compose_warnings = ["captions: the narration needs 9.6 s", "second warning"]
    events, job = await _run(gateway, prompt="a fox", scene_count=2)
    assert job.state == gateway_pb2.JOB_STATE_DONE
    finished = {
        e.stage: e.message for e in events if e.kind == gateway_pb2.EVENT_KIND_STAGE_FINISHED
    }
    assert (
        finished[gateway_pb2.STAGE_COMPOSE] == "captions: the narration needs 9.6 s\nsecond warning"
    )
    assert finished[gateway_pb2.STAGE_RENDER] == ""


async def test_watch_of_a_finished_job_gets_its_snapshot_then_the_end(gateway):
    job_id = await create_video(gateway, prompt="x")
    await _finish(gateway, job_id)
    events, job = await _finish(gateway, job_id)
    assert [e.kind for e in events] == [
        gateway_pb2.EVENT_KIND_SNAPSHOT,
        gateway_pb2.EVENT_KIND_JOB_FINISHED,
    ]
    assert job.state == gateway_pb2.JOB_STATE_DONE


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"prompt": ""}, "prompt must not be empty"),
        ({"prompt": "   "}, "prompt must not be empty"),
        ({"prompt": "x" * 2001}, "limit is 2000"),
        ({"prompt": "x", "scene_count": 25}, "between 1 and 24"),
        ({"prompt": "x", "scene_count": -1}, "between 1 and 24"),
        ({"prompt": "x", "style": "s" * 201}, "style"),
        ({"prompt": "x", "width": 321}, "width must be a multiple of 8"),
        ({"prompt": "x", "height": 9000}, "height must be a multiple of 8"),
        ({"prompt": "x", "fps": 500}, "fps"),
        ({"prompt": "x", "audio_uri": "file:///etc/passwd"}, "not in the artifact store"),
    ],
)
async def test_bad_create_requests_are_invalid_and_store_nothing(
    gateway, file_store, request_fields, message
):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.CreateVideo(gateway_pb2.CreateVideoRequest(**request_fields))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()
    assert stored_uris(file_store) == []


async def test_unknown_job_is_not_found(gateway):
    for call in (
        gateway.GetJob(gateway_pb2.GetJobRequest(job_id="nope")),
        _finish(gateway, "nope"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_upload_audio_stores_the_file_and_returns_its_uri(gateway, file_store):
    data = wav_bytes(0.5, 16000)
    response = await gateway.UploadAudio(upload_requests([data[:1000], data[1000:]], "my song.WAV"))
    assert response.size_bytes == len(data)
    assert response.audio_uri.endswith("/audio.wav")
    assert "my song" not in response.audio_uri  # keys never come from user text
    assert file_store.get_bytes(response.audio_uri) == data


@pytest.mark.parametrize(
    ("chunks", "message"),
    [
        ([b"this is plain text, not audio at all"], "not audio"),
        ([], "empty"),
        ([wav_bytes(3.0, 16000)], "larger than"),
    ],
)
async def test_bad_uploads_are_invalid_and_store_nothing(gateway, file_store, chunks, message):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.UploadAudio(upload_requests(chunks, "track.wav"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()
    assert stored_uris(file_store) == []


async def test_uploaded_audio_is_passed_to_the_composer(gateway, upstream):
    audio_uri = (await upload_audio(gateway, wav_bytes(0.5, 16000), "track.wav")).audio_uri
    _, job = await _run(gateway, prompt="x", scene_count=1, audio_uri=audio_uri)
    assert job.state == gateway_pb2.JOB_STATE_DONE
    assert upstream.compose_requests[-1].audio_uri == audio_uri


async def test_many_jobs_at_once_all_complete_once(gateway, upstream):
    ids = await asyncio.gather(
        *(create_video(gateway, prompt=f"job {i}", scene_count=1) for i in range(10))
    )
    assert len(set(ids)) == 10
    results = await asyncio.gather(*(_finish(gateway, job_id) for job_id in ids))
    assert all(job.state == gateway_pb2.JOB_STATE_DONE for _, job in results)
    assert len(upstream.story_requests) == 10


async def test_job_logs_are_json_and_carry_the_job_id(gateway):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("gateway"))
    logger = logging.getLogger("storyreel_gateway")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.INFO)
    try:
        job_id = await create_video(gateway, prompt="x")
        await _finish(gateway, job_id)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    stage_logs = [r for r in records if r["msg"] in ("stage started", "stage finished")]
    assert len(stage_logs) == 6
    assert {r["job_id"] for r in stage_logs} == {job_id}
