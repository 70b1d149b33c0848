"""Job control over real gRPC: idempotency, listing, cancel, regenerate, resume, admission."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from support import finished_job, listed_job_ids, wait_until, watch_events

from storyreel.gateway.v1 import gateway_pb2 as pb


async def test_same_idempotency_key_and_request_returns_the_same_job(gateway, upstream):
    request = pb.CreateVideoRequest(prompt="a fox", scene_count=2, idempotency_key="order-17")
    first, second = await asyncio.gather(gateway.CreateVideo(request), gateway.CreateVideo(request))
    third = await gateway.CreateVideo(request)
    assert first.job_id == second.job_id == third.job_id
    await finished_job(gateway, first.job_id)
    assert len(upstream.story_requests) == 1


async def test_same_idempotency_key_with_another_request_is_already_exists(gateway):
    await gateway.CreateVideo(pb.CreateVideoRequest(prompt="a fox", idempotency_key="k1"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.CreateVideo(pb.CreateVideoRequest(prompt="a cat", idempotency_key="k1"))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "k1" in caught.value.details()


async def test_list_jobs_pages_newest_first(gateway):
    ids = []
    for i in range(5):
        ids.append((await gateway.CreateVideo(pb.CreateVideoRequest(prompt=f"job {i}"))).job_id)
    assert await listed_job_ids(gateway, page_size=2) == list(reversed(ids))


async def test_cancel_stops_a_running_render_within_seconds(gateway, upstream):
    upstream.render_delay_s = 5.0
    job_id = (await gateway.CreateVideo(pb.CreateVideoRequest(prompt="x", scene_count=3))).job_id
    await watch_events(
        gateway,
        job_id,
        lambda e: e.kind == pb.EVENT_KIND_STAGE_STARTED and e.stage == pb.STAGE_RENDER,
    )
    # The stage has started; wait until its call reaches the render double.
    await wait_until(lambda: upstream.render_requests)
    response = await gateway.CancelJob(pb.CancelJobRequest(job_id=job_id), timeout=5)
    assert response.job.state == pb.JOB_STATE_CANCELLED
    assert response.job.stages[-1].state == pb.JOB_STATE_CANCELLED
    job = await finished_job(gateway, job_id)
    assert job.state == pb.JOB_STATE_CANCELLED and len(job.images) == 0
    await wait_until(lambda: upstream.render_cancelled)  # the render call sees it too
    assert upstream.render_cancelled == 1
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.CancelJob(pb.CancelJobRequest(job_id=job_id))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_cancel_a_queued_job(start_gateway, upstream):
    upstream.render_delay_s = 2.0
    gateway = (await start_gateway(max_jobs_in_flight=1)).stub
    running = (await gateway.CreateVideo(pb.CreateVideoRequest(prompt="a", scene_count=1))).job_id
    queued = (await gateway.CreateVideo(pb.CreateVideoRequest(prompt="b", scene_count=1))).job_id
    assert (await gateway.GetJob(pb.GetJobRequest(job_id=queued))).job.state == pb.JOB_STATE_QUEUED
    await gateway.CancelJob(pb.CancelJobRequest(job_id=queued))
    assert (await finished_job(gateway, queued)).state == pb.JOB_STATE_CANCELLED
    assert (await finished_job(gateway, running)).state == pb.JOB_STATE_DONE
    assert len(upstream.story_requests) == 1


async def test_regenerate_redraws_one_scene_and_composes_again(gateway, upstream, file_store):
    job_id = (
        await gateway.CreateVideo(pb.CreateVideoRequest(prompt="x", scene_count=3, seed=5))
    ).job_id
    before = await finished_job(gateway, job_id)
    response = await gateway.RegenerateScene(
        pb.RegenerateSceneRequest(job_id=job_id, index=2, prompt="a brighter sky", seed=1234)
    )
    assert response.job.state == pb.JOB_STATE_QUEUED
    after = await finished_job(gateway, job_id)
    assert after.state == pb.JOB_STATE_DONE
    assert upstream.render_requests[-1] == [2]  # only that scene was drawn again
    seeds = {image.index: image.seed for image in after.images}
    assert seeds[2] == 1234
    assert seeds[1] == {i.index: i.seed for i in before.images}[1]
    assert after.storyboard.scenes[1].image_prompt == "a brighter sky"
    assert len(upstream.compose_requests) == 2
    assert [s.stage for s in after.stages][-2:] == [pb.STAGE_RENDER, pb.STAGE_COMPOSE]


async def test_regenerate_while_running_is_failed_precondition(gateway, upstream):
    upstream.render_delay_s = 1.0
    job_id = (await gateway.CreateVideo(pb.CreateVideoRequest(prompt="x", scene_count=2))).job_id
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.RegenerateScene(pb.RegenerateSceneRequest(job_id=job_id, index=1))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await gateway.CancelJob(pb.CancelJobRequest(job_id=job_id))


async def test_a_restarted_gateway_resumes_the_job_where_it_stopped(start_gateway, upstream):
    upstream.render_delay_s = 0.3
    first = await start_gateway()
    job_id = (await first.stub.CreateVideo(pb.CreateVideoRequest(prompt="x", scene_count=4))).job_id
    await watch_events(first.stub, job_id, lambda e: e.kind == pb.EVENT_KIND_SCENE_RENDERED)
    await first.stop()  # stops mid-render, as on SIGTERM; the manifest stays RUNNING

    second = await start_gateway()
    job = await finished_job(second.stub, job_id)
    assert job.state == pb.JOB_STATE_DONE
    assert [image.index for image in job.images] == [1, 2, 3, 4]
    assert len(upstream.story_requests) == 1  # the stored storyboard was reused
    assert 1 not in upstream.render_requests[-1]  # the stored image was not drawn again
    stages = [(s.stage, s.state) for s in job.stages]
    assert stages[0] == (pb.STAGE_STORYBOARD, pb.JOB_STATE_DONE)
    assert (pb.STAGE_RENDER, pb.JOB_STATE_FAILED) in stages  # the interrupted attempt
    assert stages[-2:] == [
        (pb.STAGE_RENDER, pb.JOB_STATE_DONE),
        (pb.STAGE_COMPOSE, pb.JOB_STATE_DONE),
    ]


async def test_admission_limit_rejects_the_overflow(start_gateway, upstream):
    upstream.render_delay_s = 1.0
    gateway = (await start_gateway(max_jobs_in_flight=1, max_jobs_queued=1)).stub
    accepted = [
        (await gateway.CreateVideo(pb.CreateVideoRequest(prompt=f"{i}", scene_count=1))).job_id
        for i in range(2)
    ]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.CreateVideo(pb.CreateVideoRequest(prompt="overflow", scene_count=1))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "try again later" in caught.value.details()
    for job_id in accepted:
        assert (await finished_job(gateway, job_id)).state == pb.JOB_STATE_DONE
    # Once the queue drained, new jobs are admitted again.
    await gateway.CreateVideo(pb.CreateVideoRequest(prompt="later", scene_count=1))


async def test_scenes_are_split_across_render_calls(start_gateway, upstream):
    gateway = (await start_gateway(render_parallelism=3)).stub
    job_id = (await gateway.CreateVideo(pb.CreateVideoRequest(prompt="x", scene_count=6))).job_id
    job = await finished_job(gateway, job_id)
    assert job.state == pb.JOB_STATE_DONE
    calls = upstream.render_requests
    assert len(calls) == 3
    assert sorted(i for call in calls for i in call) == [1, 2, 3, 4, 5, 6]
