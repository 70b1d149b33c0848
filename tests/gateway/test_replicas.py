"""Several gateway replicas over one database, in one process (upstream doubles).

Each replica is a real GatewayService on its own port; they share the job
database (SQLite and PostgreSQL, every test on both) and the artifact store, as
replicas behind one Kubernetes Service do. The doubles count every story,
render and compose call, which is how "exactly once" is checked.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from sqlalchemy import func, select
from storyreel_gateway.db import jobs
from support import (
    ALICE,
    API_KEYS,
    BOB,
    create_video,
    finished_job,
    listed_job_ids,
    wait_until,
    watch_events,
)

from storyreel.gateway.v1 import gateway_pb2 as pb


@pytest.fixture
def gateway_database(database_url):
    """Every test here runs on SQLite and on PostgreSQL."""
    return database_url


async def _row(replica, job_id: str):
    """The job's row as the database has it."""
    async with replica.running.service.database.read() as conn:
        return (await conn.execute(select(jobs).where(jobs.c.job_id == job_id))).one()


async def _owner(replica, job_id: str) -> str | None:
    return (await _row(replica, job_id)).owner


async def _claims_left(replica) -> int:
    """Claims still held on jobs (none once every job has ended)."""
    async with replica.running.service.database.read() as conn:
        return (
            await conn.execute(select(func.count()).where(jobs.c.lease_id.is_not(None)))
        ).scalar_one()


def _first_scene(event) -> bool:
    return event.kind == pb.EVENT_KIND_SCENE_RENDERED


def _render_started(event) -> bool:
    return event.kind == pb.EVENT_KIND_STAGE_STARTED and event.stage == pb.STAGE_RENDER


async def _crash(replica) -> None:
    """Stop a replica the way a killed process stops: nothing more is written."""
    await replica.running.server.stop(0)
    await replica.running.service.runner.close(release=False)


async def test_a_job_created_on_one_replica_is_read_and_watched_on_another(
    start_gateway, upstream, file_store
):
    upstream.render_delay_s = 0.3
    a = await start_gateway(instance_id="replica-a")
    b = await start_gateway(instance_id="replica-b", watch_poll_s=0.1)
    job_id = await create_video(a.stub, prompt="x", scene_count=3)

    seen = (await b.stub.GetJob(pb.GetJobRequest(job_id=job_id))).job
    assert seen.job_id == job_id
    assert seen.state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING)
    events = await watch_events(b.stub, job_id)

    kinds = [event.kind for event in events]
    assert kinds[0] == pb.EVENT_KIND_SNAPSHOT and kinds[-1] == pb.EVENT_KIND_JOB_FINISHED
    assert events[-1].job.state == pb.JOB_STATE_DONE
    snapshot_images = {image.index for image in events[0].job.images}
    rendered = [e.scene_index for e in events if e.kind == pb.EVENT_KIND_SCENE_RENDERED]
    assert sorted(rendered + list(snapshot_images)) == [1, 2, 3]
    finished = [e.stage for e in events if e.kind == pb.EVENT_KIND_STAGE_FINISHED]
    assert finished[-2:] == [pb.STAGE_RENDER, pb.STAGE_COMPOSE]
    progress = [event.job.progress for event in events]
    assert progress == sorted(progress) and progress[-1] == 100
    # B only read: A ran the job, once.
    assert await _owner(b, job_id) == "replica-a"
    assert (len(upstream.story_requests), len(upstream.compose_requests)) == (1, 1)
    assert await _claims_left(b) == 0


async def test_listing_on_any_replica_shows_every_replicas_jobs_newest_first(start_gateway):
    a = await start_gateway(instance_id="replica-a", api_keys=API_KEYS)
    b = await start_gateway(instance_id="replica-b", api_keys=API_KEYS)
    ids = []
    for i in range(5):
        stub = (a, b)[i % 2].stub
        ids.append(await create_video(stub, ALICE, prompt=f"job {i}", scene_count=1))
    bobs = await create_video(a.stub, BOB, prompt="bob")

    for replica in (a, b):
        seen = await listed_job_ids(replica.stub, ALICE, page_size=2)
        assert seen == list(reversed(ids))
    listed = await b.stub.ListJobs(pb.ListJobsRequest(), metadata=BOB)
    assert [job.job_id for job in listed.jobs] == [bobs]
    # The other tenant's job stays invisible on the replica that does not run it.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await b.stub.GetJob(pb.GetJobRequest(job_id=bobs), metadata=ALICE)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    for job_id in ids:
        await finished_job(b.stub, job_id, ALICE)


async def test_an_idempotency_key_holds_across_replicas(start_gateway, upstream):
    a = await start_gateway(instance_id="replica-a")
    b = await start_gateway(instance_id="replica-b")
    request = pb.CreateVideoRequest(prompt="a fox", scene_count=1, idempotency_key="order-9")
    first = await a.stub.CreateVideo(request)
    assert (await b.stub.CreateVideo(request)).job_id == first.job_id

    # The same request reaching both replicas at the same moment starts one job.
    racing = pb.CreateVideoRequest(prompt="a cat", scene_count=1, idempotency_key="order-10")
    on_a, on_b = await asyncio.gather(a.stub.CreateVideo(racing), b.stub.CreateVideo(racing))
    assert on_a.job_id == on_b.job_id != first.job_id

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await b.stub.CreateVideo(
            pb.CreateVideoRequest(prompt="another", scene_count=1, idempotency_key="order-9")
        )
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    for job_id in (first.job_id, on_a.job_id):
        assert (await finished_job(b.stub, job_id)).state == pb.JOB_STATE_DONE
    assert len(upstream.story_requests) == 2


async def test_cancel_on_another_replica_stops_the_job_within_seconds(
    start_gateway, upstream, file_store
):
    upstream.render_delay_s = 5.0
    a = await start_gateway(instance_id="replica-a")
    b = await start_gateway(instance_id="replica-b", watch_poll_s=0.1)
    job_id = await create_video(a.stub, prompt="x", scene_count=3)
    await watch_events(b.stub, job_id, _render_started)
    # The stage has started; wait until its call reaches the render double.
    await wait_until(lambda: upstream.render_requests)

    response = await b.stub.CancelJob(pb.CancelJobRequest(job_id=job_id), timeout=15)
    assert response.job.state == pb.JOB_STATE_CANCELLED
    assert response.job.stages[-1].state == pb.JOB_STATE_CANCELLED
    assert len(response.job.images) == 0
    await wait_until(lambda: upstream.render_cancelled)  # A's render call is cancelled too
    assert upstream.render_cancelled == 1
    assert await _owner(b, job_id) == "replica-a"
    assert await _claims_left(b) == 0
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await a.stub.CancelJob(pb.CancelJobRequest(job_id=job_id))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_regenerate_on_another_replica_runs_there(start_gateway, upstream, file_store):
    a = await start_gateway(instance_id="replica-a")
    b = await start_gateway(instance_id="replica-b")
    job_id = await create_video(a.stub, prompt="x", scene_count=3, seed=5)
    before = await finished_job(a.stub, job_id)

    response = await b.stub.RegenerateScene(
        pb.RegenerateSceneRequest(job_id=job_id, index=2, seed=1234)
    )
    assert response.job.state == pb.JOB_STATE_QUEUED
    after = await finished_job(a.stub, job_id)  # A follows the new run through the database
    assert after.state == pb.JOB_STATE_DONE
    assert upstream.render_requests[-1] == [2]
    seeds = {image.index: image.seed for image in after.images}
    assert seeds[2] == 1234 and seeds[1] == {i.index: i.seed for i in before.images}[1]
    row = await _row(a, job_id)
    assert row.generation == 1 and row.owner in {"replica-a", "replica-b"}
    assert len(upstream.compose_requests) == 2
    # The new run's artifacts have URIs of their own; the first run's stay listed.
    assert upstream.render_messages[-1].revision == 1
    assert upstream.compose_requests[-1].revision == 1
    videos = [v for v in after.versions if v.kind == pb.ARTIFACT_KIND_VIDEO]
    assert [v.generation for v in videos] == [0, 1]
    assert videos[0].uri == before.video_uri != videos[1].uri == after.video_uri
    scene_2 = [
        v.uri for v in after.versions if v.kind == pb.ARTIFACT_KIND_IMAGE and v.scene_index == 2
    ]
    assert len(scene_2) == 2 and scene_2[0] != scene_2[1]
    assert await _claims_left(a) == 0


async def test_a_live_owner_keeps_its_job_past_many_lease_periods(
    start_gateway, upstream, file_store
):
    upstream.render_delay_s = 0.5
    a = await start_gateway(instance_id="replica-a", lease_s=1.5)
    b = await start_gateway(instance_id="replica-b", lease_s=1.5)
    job_id = await create_video(a.stub, prompt="x", scene_count=8)
    job = await finished_job(b.stub, job_id)  # about 4 s: the lease is renewed, never lapses
    assert job.state == pb.JOB_STATE_DONE
    assert len(upstream.render_requests) == 1
    assert (len(upstream.story_requests), len(upstream.compose_requests)) == (1, 1)
    assert await _owner(b, job_id) == "replica-a"


async def test_a_replica_that_dies_mid_job_is_replaced_and_the_job_finishes_once(
    start_gateway, upstream, file_store
):
    upstream.render_delay_s = 0.3
    a = await start_gateway(instance_id="replica-a", lease_s=1.5)
    b = await start_gateway(instance_id="replica-b", lease_s=1.5, watch_poll_s=0.1)
    job_id = await create_video(a.stub, prompt="x", scene_count=6)
    await watch_events(a.stub, job_id, _first_scene)
    await _crash(a)
    calls_by_a = len(upstream.render_requests)
    recorded = {
        image.index for image in (await b.stub.GetJob(pb.GetJobRequest(job_id=job_id))).job.images
    }
    assert 1 <= len(recorded) < 6

    job = await finished_job(b.stub, job_id)
    assert job.state == pb.JOB_STATE_DONE
    assert [image.index for image in job.images] == [1, 2, 3, 4, 5, 6]
    # B drew exactly the scenes A had not recorded, each once, and reused the storyboard.
    drawn_by_b = [i for call in upstream.render_requests[calls_by_a:] for i in call]
    assert sorted(drawn_by_b) == sorted(set(range(1, 7)) - recorded)
    assert (len(upstream.story_requests), len(upstream.compose_requests)) == (1, 1)
    assert await _owner(b, job_id) == "replica-b"
    assert await _claims_left(b) == 0


async def test_two_replicas_starting_over_one_unfinished_job_run_it_once(
    start_gateway, upstream, file_store
):
    upstream.render_delay_s = 0.3
    a = await start_gateway(instance_id="replica-a")
    job_id = await create_video(a.stub, prompt="x", scene_count=4)
    await watch_events(a.stub, job_id, _first_scene)
    await a.stop()  # a graceful stop hands the job back at once
    calls_before = len(upstream.render_requests)

    _, c = await asyncio.gather(
        start_gateway(instance_id="replica-b"), start_gateway(instance_id="replica-c")
    )
    job = await finished_job(c.stub, job_id)
    assert job.state == pb.JOB_STATE_DONE
    assert len(upstream.render_requests) - calls_before == 1
    assert (len(upstream.story_requests), len(upstream.compose_requests)) == (1, 1)
    assert await _owner(c, job_id) in {"replica-b", "replica-c"}


async def test_a_restarted_replica_hands_back_its_jobs_without_waiting_for_the_lease(
    start_gateway, upstream, file_store
):
    upstream.render_delay_s = 0.3
    # The lease far outlasts the test: only the take-back can finish the job in time.
    first = await start_gateway(instance_id="pod-1", lease_s=600)
    other = await start_gateway(instance_id="pod-2", lease_s=600)
    job_id = await create_video(first.stub, prompt="x", scene_count=4)
    await watch_events(first.stub, job_id, _first_scene)
    await _crash(first)

    again = await start_gateway(instance_id="pod-1", lease_s=600)  # the container restarted
    job = await finished_job(other.stub, job_id)
    assert job.state == pb.JOB_STATE_DONE
    # The restarted pod-1 released what its earlier process held; a free replica ran it.
    assert await _owner(other, job_id) in {"pod-1", "pod-2"}
    assert (len(upstream.story_requests), len(upstream.compose_requests)) == (1, 1)
    assert again.running.service.runner.instance_id == "pod-1"


async def test_cancel_of_a_job_whose_replica_died_ends_it_at_once(
    start_gateway, upstream, file_store
):
    upstream.render_delay_s = 1.0
    a = await start_gateway(instance_id="replica-a", lease_s=1.0)
    # B has one slot and keeps it busy, so it never adopts A's job by itself.
    b = await start_gateway(instance_id="replica-b", lease_s=1.0, max_jobs_in_flight=1)
    busy = await create_video(b.stub, prompt="b", scene_count=20)
    orphan = await create_video(a.stub, prompt="a", scene_count=4)
    await watch_events(a.stub, orphan, _first_scene)
    await _crash(a)
    await asyncio.sleep(1.5)  # the lease lapses

    response = await b.stub.CancelJob(pb.CancelJobRequest(job_id=orphan), timeout=10)
    assert response.job.state == pb.JOB_STATE_CANCELLED
    await b.stub.CancelJob(pb.CancelJobRequest(job_id=busy))
    assert await _claims_left(b) == 0
    assert len(upstream.compose_requests) == 0


async def test_a_stopping_replica_adopts_no_more_jobs(start_gateway, upstream, file_store):
    upstream.render_delay_s = 0.3
    b = await start_gateway(instance_id="replica-b", lease_s=1.0)
    a = await start_gateway(instance_id="replica-a", lease_s=1.0)
    job_id = await create_video(a.stub, prompt="x", scene_count=4)
    await b.running.service.drain()  # B is being stopped: its calls drain, jobs run on
    await watch_events(a.stub, job_id, _first_scene)
    await _crash(a)
    await asyncio.sleep(1.5)  # A's lease lapses

    assert await b.running.service.runner.replica.claim_jobs() == 0
    assert await _owner(b, job_id) == "replica-a"
