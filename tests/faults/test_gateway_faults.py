"""Faults and load against the real stack (see conftest.py): processes killed, many jobs."""

from __future__ import annotations

import concurrent.futures
import time

import grpc
import pytest

from storyreel.gateway.v1 import gateway_pb2 as pb
from storyreel.gateway.v1 import gateway_pb2_grpc

pytestmark = pytest.mark.e2e

KEY = (("authorization", "Bearer fault-key"),)


@pytest.fixture(scope="module")
def stack(start_stack):
    return start_stack(
        "faults",
        {
            "STORYREEL_GATEWAY_API_KEYS": '{"faults": ["fault-key"]}',
            "STORYREEL_GATEWAY_MAX_JOBS_IN_FLIGHT": "4",
        },
    )


@pytest.fixture
def stub(stack):
    with grpc.insecure_channel(stack.gateway_address) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        yield gateway_pb2_grpc.StoryReelServiceStub(channel)


def create(stub, **fields) -> str:
    return stub.CreateVideo(pb.CreateVideoRequest(**fields), metadata=KEY, timeout=30).job_id


def wait_for(stub, job_id: str, until=None, timeout_s: float = 240):
    """Watch the job (reconnecting while the gateway is away) until ``until(event)`` or the end."""
    deadline = time.monotonic() + timeout_s
    job = None
    while time.monotonic() < deadline:
        try:
            for event in stub.WatchJob(
                pb.WatchJobRequest(job_id=job_id),
                metadata=KEY,
                timeout=max(1.0, deadline - time.monotonic()),
            ):
                job = event.job
                if until is not None and until(event):
                    return job
            if job is not None and job.state in (
                pb.JOB_STATE_DONE,
                pb.JOB_STATE_FAILED,
                pb.JOB_STATE_CANCELLED,
            ):
                return job
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not get there in {timeout_s} s; last: {job}")


def first_scene(event) -> bool:
    return event.kind == pb.EVENT_KIND_SCENE_RENDERED


def test_gateway_killed_mid_job_resumes_after_restart(stack, stub):
    job_id = create(stub, prompt="a whale", scene_count=6, seed=3)
    wait_for(stub, job_id, first_scene)
    stack.kill("gateway")  # SIGKILL: no chance to write anything more
    stack.restart("gateway")
    job = wait_for(stub, job_id)
    assert job.state == pb.JOB_STATE_DONE, job.error
    assert [image.index for image in job.images] == [1, 2, 3, 4, 5, 6]
    assert stack.store.exists(job.video_uri)


def test_render_service_killed_mid_job_and_restarted(stack, stub):
    job_id = create(stub, prompt="a paper boat", scene_count=6, seed=4)
    wait_for(stub, job_id, first_scene)
    stack.kill("diffusion")
    time.sleep(1.0)
    stack.restart("diffusion")
    job = wait_for(stub, job_id)
    assert job.state == pb.JOB_STATE_DONE, job.error
    assert [image.index for image in job.images] == [1, 2, 3, 4, 5, 6]


def test_twenty_jobs_at_once_all_complete_once(stack, stub):
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        ids = list(
            pool.map(
                lambda i: create(
                    stub, prompt=f"story {i}", scene_count=1, idempotency_key=f"load-{i}"
                ),
                range(20),
            )
        )
        jobs = list(pool.map(lambda job_id: wait_for(stub, job_id, timeout_s=600), ids))
    assert len(set(ids)) == 20
    assert all(job.state == pb.JOB_STATE_DONE for job in jobs), [j.error for j in jobs]
    assert all(stack.store.exists(job.video_uri) for job in jobs)
    for job_id in ids:
        manifests = list(stack.store.list(f"jobs/{job_id}/manifest.json"))
        assert len(manifests) == 1
    # Retrying every request with its key starts nothing new.
    again = [
        create(stub, prompt=f"story {i}", scene_count=1, idempotency_key=f"load-{i}")
        for i in range(20)
    ]
    assert again == ids


def test_cancel_stops_a_running_job_within_seconds(stack, stub):
    job_id = create(stub, prompt="a long story", scene_count=12)
    wait_for(stub, job_id, first_scene)
    started = time.monotonic()
    stub.CancelJob(pb.CancelJobRequest(job_id=job_id), metadata=KEY, timeout=30)
    job = wait_for(stub, job_id)
    assert job.state == pb.JOB_STATE_CANCELLED
    assert time.monotonic() - started < 30
    assert len(job.images) < 12


def test_admission_limit_rejects_the_overflow(stack, stub):
    stack.restart(
        "gateway",
        env={"STORYREEL_GATEWAY_MAX_JOBS_IN_FLIGHT": "1", "STORYREEL_GATEWAY_MAX_JOBS_QUEUED": "1"},
    )
    try:
        with grpc.insecure_channel(stack.gateway_address) as channel:
            limited = gateway_pb2_grpc.StoryReelServiceStub(channel)
            accepted = [create(limited, prompt=f"slot {i}", scene_count=4) for i in range(2)]
            with pytest.raises(grpc.RpcError) as caught:
                create(limited, prompt="overflow", scene_count=4)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            for job_id in accepted:
                assert wait_for(limited, job_id).state == pb.JOB_STATE_DONE
    finally:
        stack.restart("gateway")


def test_wrong_tenant_and_missing_key_are_refused(stack, stub):
    job_id = create(stub, prompt="private", scene_count=1)
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    wait_for(stub, job_id)
