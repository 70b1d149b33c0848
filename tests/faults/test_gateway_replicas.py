"""Two gateway replicas over one S3 store, with the real services as separate processes.

The replicas share nothing but the bucket, as behind a Kubernetes Service. The story
service runs its TGI backend against a TGI test double (TGI needs a GPU); render and
compose are the real services with the tiny offline diffusion model.
"""

from __future__ import annotations

import json

import grpc
import pytest

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
        },
    )
    local.add_gateway("gateway-b", env={"STORYREEL_GATEWAY_INSTANCE_ID": "replica-b"})
    return local


def _watch_to_the_end(stub, job_id: str, until=None, timeout_s: float = 240) -> pb.Job:
    job = None
    for event in stub.WatchJob(pb.WatchJobRequest(job_id=job_id), metadata=KEY, timeout=timeout_s):
        job = event.job
        if until is not None and until(event):
            break
    assert job is not None
    return job


def test_a_job_whose_replica_is_killed_completes_on_the_other_and_is_watched_there(stack):
    with (
        grpc.insecure_channel(stack.gateway_address) as to_a,
        grpc.insecure_channel(stack.processes["gateway-b"].address) as to_b,
    ):
        a = gateway_pb2_grpc.StoryReelServiceStub(to_a)
        b = gateway_pb2_grpc.StoryReelServiceStub(to_b)
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
    manifest = json.loads(
        stack.store.get_bytes(stack.store.uri_for(f"jobs/{job_id}/manifest.json"))
    )
    assert manifest["owner"] == "replica-b"
    # B resumed A's work: the storyboard A wrote was reused, not written again.
    assert [s.stage for s in job.stages].count(pb.STAGE_STORYBOARD) == 1
    assert list(stack.store.list("active/")) == []
