"""Two gateway replicas over one PostgreSQL database and one S3 store, with the real
services as separate processes.

The replicas share the database and the bucket, as behind a Kubernetes Service. The
LLM service runs its TGI backend against a TGI test double (TGI needs a GPU); render
and compose are the real services with the tiny offline diffusion model.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import time

import grpc
import pytest
from sqlalchemy import func, select
from storyreel_gateway.db import job_events, jobs
from support import query_database

from storyreel.gateway.v1 import gateway_pb2 as pb
from storyreel.gateway.v1 import gateway_pb2_grpc

pytestmark = pytest.mark.e2e

KEY = (("authorization", "Bearer replica-key"),)
LEASE_S = 3


@pytest.fixture(scope="module")
def stack(start_stack):
    local = start_stack(
        "replicas",
        {
            "STORYREEL_GATEWAY_API_KEYS": '{"replicas": ["replica-key"]}',
            "STORYREEL_GATEWAY_INSTANCE_ID": "replica-a",
            "STORYREEL_GATEWAY_LEASE_S": str(LEASE_S),
            "STORYREEL_GATEWAY_WATCH_POLL_S": "0.2",
            # Polls long enough that only the database's notifications explain a fast cancel.
            "STORYREEL_GATEWAY_CANCEL_POLL_S": "5",
        },
    )
    local.add_gateway("gateway-b", env={"STORYREEL_GATEWAY_INSTANCE_ID": "replica-b"})
    return local


@contextlib.contextmanager
def replica_stubs(stack):
    """Stubs of replica A (the stack's gateway) and replica B (gateway-b)."""
    with (
        grpc.insecure_channel(stack.gateway_address) as to_a,
        grpc.insecure_channel(stack.processes["gateway-b"].address) as to_b,
    ):
        yield (
            gateway_pb2_grpc.StoryReelServiceStub(to_a),
            gateway_pb2_grpc.StoryReelServiceStub(to_b),
        )


def _owner(stack, job_id: str) -> str | None:
    return query_database(stack.database_url, select(jobs.c.owner).where(jobs.c.job_id == job_id))[
        0
    ][0]


def test_a_cancel_sent_to_the_replica_that_does_not_run_the_job_lands_at_once(stack):
    with replica_stubs(stack) as (a, b):
        request = pb.CreateVideoRequest(prompt="a long voyage", scene_count=12, seed=5)
        job_id = a.CreateVideo(request, metadata=KEY, timeout=30).job_id
        _watch_to_the_end(a, job_id, until=lambda e: e.kind == pb.EVENT_KIND_SCENE_RENDERED)
        owner = _owner(stack, job_id)
        other = b if owner == "replica-a" else a
        started = time.monotonic()
        response = other.CancelJob(pb.CancelJobRequest(job_id=job_id), metadata=KEY, timeout=30)
        latency_s = time.monotonic() - started
    # CancelJob answers once the job has ended (or after CANCEL_WAIT_S, 10 s): the owner
    # heard of it through a notification, not its 5 s poll.
    print(f"cross-replica cancel landed in {latency_s:.3f} s")
    assert response.job.state == pb.JOB_STATE_CANCELLED
    assert latency_s < 5, f"the cancel took {latency_s:.1f} s: the owner only polled"
    assert len(response.job.images) < 12


def test_twenty_jobs_over_two_replicas_each_run_once(stack):
    with replica_stubs(stack) as replicas:

        def create(i: int) -> str:
            request = pb.CreateVideoRequest(prompt=f"tale {i}", scene_count=1, seed=i + 1)
            return replicas[i % 2].CreateVideo(request, metadata=KEY, timeout=30).job_id

        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            ids = list(pool.map(create, range(20)))
            done = list(
                pool.map(
                    lambda pair: _watch_to_the_end(replicas[pair[0] % 2], pair[1], timeout_s=600),
                    enumerate(ids),
                )
            )
    assert len(set(ids)) == 20
    assert [job.state for job in done] == [pb.JOB_STATE_DONE] * 20, [j.error for j in done]
    owners = {_owner(stack, job_id) for job_id in ids}
    assert owners <= {"replica-a", "replica-b"}
    for job in done:
        # One run each: one storyboard, one compose, one end.
        assert [s.stage for s in job.stages] == [
            pb.STAGE_STORYBOARD,
            pb.STAGE_RENDER,
            pb.STAGE_COMPOSE,
        ]
        assert stack.store.exists(job.video_uri)
    finished = query_database(
        stack.database_url,
        select(job_events.c.job_id, func.count())
        .where(job_events.c.job_id.in_(ids), job_events.c.kind == "job_finished")
        .group_by(job_events.c.job_id),
    )
    assert sorted(count for _, count in finished) == [1] * 20


def _watch_to_the_end(stub, job_id: str, until=None, timeout_s: float = 240) -> pb.Job:
    job = None
    for event in stub.WatchJob(pb.WatchJobRequest(job_id=job_id), metadata=KEY, timeout=timeout_s):
        job = event.job
        if until is not None and until(event):
            break
    assert job is not None
    return job


def test_a_job_whose_replica_is_killed_completes_on_the_other_and_is_watched_there(stack):
    with replica_stubs(stack) as (a, b):
        request = pb.CreateVideoRequest(prompt="a lighthouse keeper", scene_count=12, seed=11)
        job_id = a.CreateVideo(request, metadata=KEY, timeout=30).job_id
        # B follows the job A runs, and sees the first scene drawn.
        seen = _watch_to_the_end(b, job_id, until=lambda e: e.kind == pb.EVENT_KIND_SCENE_RENDERED)
        stack.kill("gateway")  # SIGKILL replica A: it writes nothing more
        assert seen.state == pb.JOB_STATE_RUNNING and len(seen.images) < 12

        job = _watch_to_the_end(b, job_id)  # one stream, from before the adoption to the end

    assert job.state == pb.JOB_STATE_DONE, job.error
    assert [image.index for image in job.images] == list(range(1, 13))
    assert stack.store.exists(job.video_uri)
    assert _owner(stack, job_id) == "replica-b"
    # B resumed A's work: the storyboard A wrote was reused, not written again.
    assert [s.stage for s in job.stages].count(pb.STAGE_STORYBOARD) == 1
    claims = query_database(
        stack.database_url, select(jobs.c.lease_id).where(jobs.c.job_id == job_id)
    )
    assert claims == [(None,)]
