"""The job database: its schema, damaged state, fair admission and moving old manifests.

Every test runs on SQLite and on a real PostgreSQL server (pgserver), through
real gateways on real ports with the upstream test doubles.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import grpc
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import select, update
from storyreel_gateway.db import Database, job_events, jobs, metadata
from storyreel_gateway.imports import import_manifests
from storyreel_gateway.jobs import JobRecord, JobSpec, JobState, SceneImage, Stage, StageRecord, now
from storyreel_gateway.store import JobStore
from support import ALICE, API_KEYS, BOB, finished_job, watch_events

from storyreel.gateway.v1 import gateway_pb2 as pb


@pytest.fixture
def gateway_database(database_url):
    return database_url


async def test_the_migrations_build_exactly_the_schema_the_code_uses(database_url):
    database = Database(database_url)
    try:
        await database.migrate()
        await database.migrate()  # a second start finds nothing to do

        def diff(connection):
            return compare_metadata(MigrationContext.configure(connection), metadata)

        async with database.write() as conn:
            assert await conn.run_sync(diff) == []
    finally:
        await database.close()


async def _corrupt(replica, job_id: str, record: str) -> None:
    async with replica.running.service.database.write() as conn:
        await conn.execute(update(jobs).where(jobs.c.job_id == job_id).values(record=record))


async def test_a_job_whose_row_is_damaged_shows_failed_and_the_rest_is_served(start_gateway):
    gateway = await start_gateway()
    stub = gateway.stub
    damaged = (await stub.CreateVideo(pb.CreateVideoRequest(prompt="a", scene_count=1))).job_id
    healthy = (await stub.CreateVideo(pb.CreateVideoRequest(prompt="b", scene_count=1))).job_id
    await finished_job(stub, damaged)
    await finished_job(stub, healthy)
    await _corrupt(gateway, damaged, '{"job_id": "' + damaged + '", "spec": {"prompt": ')

    job = (await stub.GetJob(pb.GetJobRequest(job_id=damaged))).job
    assert job.state == pb.JOB_STATE_FAILED
    assert job.error.code == "DATA_LOSS"
    assert "cannot be read" in job.error.message and "json_invalid" in job.error.message
    listed = {j.job_id: j for j in (await stub.ListJobs(pb.ListJobsRequest())).jobs}
    assert set(listed) == {damaged, healthy}
    assert listed[damaged].state == pb.JOB_STATE_FAILED
    assert listed[healthy].state == pb.JOB_STATE_DONE
    events = await watch_events(stub, damaged)
    assert [(e.kind, e.job.state) for e in events] == [
        (pb.EVENT_KIND_SNAPSHOT, pb.JOB_STATE_FAILED),
        (pb.EVENT_KIND_JOB_FINISHED, pb.JOB_STATE_FAILED),
    ]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RegenerateScene(pb.RegenerateSceneRequest(job_id=damaged, index=1))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_an_unfinished_job_whose_row_is_damaged_ends_failed(start_gateway, upstream):
    upstream.render_delay_s = 0.2
    first = await start_gateway(instance_id="replica-a")
    job_id = (await first.stub.CreateVideo(pb.CreateVideoRequest(prompt="a", scene_count=4))).job_id
    await first.stop()  # handed back, unfinished
    await _corrupt(first, job_id, "not json at all")

    again = await start_gateway(instance_id="replica-b")
    for _ in range(100):
        async with again.running.service.database.read() as conn:
            state = (
                await conn.execute(select(jobs.c.state).where(jobs.c.job_id == job_id))
            ).scalar_one()
        if state == "failed":
            break
        await asyncio.sleep(0.05)
    assert state == "failed"  # nobody can run it; it no longer waits in the queue
    job = (await again.stub.GetJob(pb.GetJobRequest(job_id=job_id))).job
    assert (job.state, job.error.code) == (pb.JOB_STATE_FAILED, "DATA_LOSS")
    # The queue goes on: a new job still runs.
    other = (await again.stub.CreateVideo(pb.CreateVideoRequest(prompt="b", scene_count=1))).job_id
    assert (await finished_job(again.stub, other)).state == pb.JOB_STATE_DONE


async def test_a_done_job_whose_video_is_gone_shows_failed_saying_so(start_gateway, file_store):
    gateway = await start_gateway()
    stub = gateway.stub
    job_id = (await stub.CreateVideo(pb.CreateVideoRequest(prompt="a", scene_count=1))).job_id
    done = await finished_job(stub, job_id)
    assert done.state == pb.JOB_STATE_DONE
    # The manifest is an export: damaging it changes nothing.
    file_store.put_bytes(f"jobs/{job_id}/manifest.json", b"{broken")
    assert (await stub.GetJob(pb.GetJobRequest(job_id=job_id))).job.state == pb.JOB_STATE_DONE

    file_store.delete(done.video_uri)
    job = (await stub.GetJob(pb.GetJobRequest(job_id=job_id))).job
    assert (job.state, job.error.code) == (pb.JOB_STATE_FAILED, "DATA_LOSS")
    assert done.video_uri in job.error.message
    listed = (await stub.ListJobs(pb.ListJobsRequest())).jobs
    assert [(j.job_id, j.state) for j in listed] == [(job_id, pb.JOB_STATE_FAILED)]
    # Regenerating a scene makes the video again.
    await stub.RegenerateScene(pb.RegenerateSceneRequest(job_id=job_id, index=1))
    again = await finished_job(stub, job_id)
    assert again.state == pb.JOB_STATE_DONE and file_store.exists(again.video_uri)


async def test_one_tenants_burst_never_refuses_or_delays_anothers_first_job(
    start_gateway, upstream
):
    upstream.render_delay_s = 0.3
    gateway = await start_gateway(
        api_keys=API_KEYS, max_jobs_in_flight=2, max_jobs_queued=10, max_jobs_queued_per_tenant=3
    )
    stub = gateway.stub
    alices = []
    for i in range(5):  # 2 run at once, 3 wait: Alice's share of the queue is full
        request = pb.CreateVideoRequest(prompt=f"a{i}", scene_count=2)
        alices.append((await stub.CreateVideo(request, metadata=ALICE)).job_id)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateVideo(pb.CreateVideoRequest(prompt="a5"), metadata=ALICE)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "you have 3 jobs waiting" in caught.value.details()

    bobs = await stub.CreateVideo(pb.CreateVideoRequest(prompt="b", scene_count=2), metadata=BOB)
    bob_created = datetime.now(UTC).replace(tzinfo=None)  # Bob's job is queued by now
    bob = await finished_job(stub, bobs.job_id, BOB)
    assert bob.state == pb.JOB_STATE_DONE
    bob_started = bob.stages[0].started_at.ToDatetime()
    # Bob's first job waits at most one job's turn: of Alice's jobs still waiting once
    # Bob's was queued, at most one starts before it (when two slots free at once and
    # neither tenant runs anything, the older job goes first).
    ahead = 0
    for job_id in alices:
        job = await finished_job(stub, job_id, ALICE)
        assert job.state == pb.JOB_STATE_DONE
        started = job.stages[0].started_at.ToDatetime()
        ahead += bob_created < started < bob_started
    assert ahead <= 1, f"{ahead} of Alice's queued jobs started before Bob's first"


async def test_the_queue_limit_counts_every_tenant(start_gateway, upstream):
    upstream.render_delay_s = 0.5
    gateway = await start_gateway(
        api_keys=API_KEYS, max_jobs_in_flight=1, max_jobs_queued=2, max_jobs_queued_per_tenant=0
    )
    stub = gateway.stub
    for i in range(3):
        await stub.CreateVideo(pb.CreateVideoRequest(prompt=f"a{i}", scene_count=1), metadata=ALICE)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateVideo(pb.CreateVideoRequest(prompt="b"), metadata=BOB)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "the gateway's limit" in caught.value.details()


async def test_events_are_replayed_from_the_table_in_order(start_gateway):
    gateway = await start_gateway()
    stub = gateway.stub
    job_id = (await stub.CreateVideo(pb.CreateVideoRequest(prompt="a", scene_count=3))).job_id
    await finished_job(stub, job_id)
    async with gateway.running.service.database.read() as conn:
        rows = (
            await conn.execute(
                select(job_events.c.seq, job_events.c.kind, job_events.c.scene_index)
                .where(job_events.c.job_id == job_id)
                .order_by(job_events.c.seq)
            )
        ).all()
    assert [r.seq for r in rows] == list(range(1, len(rows) + 1))
    kinds = [r.kind for r in rows]
    assert kinds[0] == "stage_started" and kinds[-1] == "job_finished"
    assert sorted(r.scene_index for r in rows if r.kind == "scene_rendered") == [1, 2, 3]


async def test_jobs_kept_as_manifests_are_imported_once_and_resumed(
    start_gateway, upstream, file_store, gateway_database
):
    spec = JobSpec(prompt="old", scene_count=2, seed=3, width=128, height=96, fps=8)
    done = JobRecord(job_id="olddone", spec=spec, tenant="local", state=JobState.DONE)
    done.video_uri = file_store.put_bytes("jobs/olddone/video/video.mp4", b"mp4")
    running = JobRecord(
        job_id="oldrunning",
        spec=spec,
        tenant="local",
        state=JobState.RUNNING,
        stage=Stage.RENDER,
        stages=[StageRecord(stage=Stage.RENDER, state=JobState.RUNNING, started_at=now())],
    )
    from storyreel.storyboard import storyboard_from_proto
    from storyreel.types.v1 import types_pb2

    running.storyboard = storyboard_from_proto(
        types_pb2.Storyboard(
            title="t",
            scenes=[
                types_pb2.Scene(index=i, narration=f"n{i}", image_prompt=f"p{i}") for i in (1, 2)
            ],
        )
    )
    running.images = [SceneImage(index=1, uri=file_store.put_bytes("jobs/x/1.png", b"p"), seed=1)]
    for record in (done, running):
        data = json.loads(record.model_dump_json())
        data.update(owner="gone-replica", lease_id="abc")  # fields of the old format
        file_store.put_bytes(f"jobs/{record.job_id}/manifest.json", json.dumps(data).encode())
    file_store.put_bytes("jobs/unreadable/manifest.json", b"{nope")

    database = Database(gateway_database)
    try:
        await database.migrate()
        report = await import_manifests(file_store, JobStore(database))
        assert sorted(report.imported) == ["olddone", "oldrunning"]
        assert report.unreadable == ["jobs/unreadable/manifest.json"]
        again = await import_manifests(file_store, JobStore(database))
        assert again.imported == [] and sorted(again.already_there) == ["olddone", "oldrunning"]
    finally:
        await database.close()

    gateway = await start_gateway()
    assert (await gateway.stub.GetJob(pb.GetJobRequest(job_id="olddone"))).job.state == (
        pb.JOB_STATE_DONE
    )
    resumed = await finished_job(gateway.stub, "oldrunning")
    assert resumed.state == pb.JOB_STATE_DONE
    assert upstream.render_requests == [[2]]  # only the scene it lacked
    assert len(upstream.story_requests) == 0
