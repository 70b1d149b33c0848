"""Direct the story through the public API, on the whole stack as real processes.

Create with review, edit scene 2's narration and scene 3's image prompt, approve and get
the video; then edit scene 1's narration on the finished job. Only scene 1's speech is
synthesised again (the composer's narration cache serves the others), no image is drawn
again, and the new video has a new URI while the old one stays readable.
"""

from __future__ import annotations

import time

import grpc
import pytest
from support import MODELS, started_stack

from storyreel.gateway.v1 import gateway_pb2 as pb
from storyreel.gateway.v1 import gateway_pb2_grpc
from storyreel.types.v1 import types_pb2

pytestmark = [pytest.mark.e2e, pytest.mark.model]

FINISHED = (pb.JOB_STATE_DONE, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)


@pytest.fixture(scope="module")
def stub(tmp_path_factory: pytest.TempPathFactory):
    env = {
        "STORYREEL_LLM_MODEL": str(MODELS / "smollm2-135m-instruct"),
        "STORYREEL_GATEWAY_RENDER_WIDTH": "128",
        "STORYREEL_GATEWAY_RENDER_HEIGHT": "128",
    }
    with (
        started_stack(tmp_path_factory.mktemp("stack"), env) as local,
        grpc.insecure_channel(local.gateway_address) as channel,
    ):
        yield gateway_pb2_grpc.StoryReelServiceStub(channel)


def wait_for(stub, job_id: str, states, timeout_s: float = 600) -> pb.Job:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = stub.GetJob(pb.GetJobRequest(job_id=job_id)).job
        if job.state in states:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {pb.JobState.Name(job.state)}")


def edited(board: types_pb2.Storyboard, changes: dict) -> types_pb2.Storyboard:
    """A copy of ``board`` with ``{(scene number, field): value}`` set."""
    copy = types_pb2.Storyboard()
    copy.CopyFrom(board)
    for (index, field), value in changes.items():
        setattr(copy.scenes[index - 1], field, value)
    return copy


def read(stub, job_id: str, uri: str) -> bytes:
    request = pb.ReadArtifactRequest(job_id=job_id, uri=uri)
    return b"".join(part.chunk for part in stub.ReadArtifact(request))


def test_review_edit_approve_then_edit_one_narration_of_the_finished_video(stub):
    created = stub.CreateVideo(
        pb.CreateVideoRequest(
            prompt="A lighthouse keeper befriends a lost whale",
            scene_count=3,
            seed=7,
            review=True,
            width=320,
            height=240,
            fps=12,
        )
    )
    job = wait_for(stub, created.job_id, (pb.JOB_STATE_REVIEW, *FINISHED))
    assert job.state == pb.JOB_STATE_REVIEW, job.error
    assert not job.images  # nothing drawn before approval

    # 1. Scene 2's narration and scene 3's image prompt, then approve.
    board = edited(
        job.storyboard,
        {
            (2, "narration"): "The whale sang back across the dark water.",
            (3, "image_prompt"): "a lighthouse at dawn, a whale's tail above calm sea",
        },
    )
    job = stub.UpdateStoryboard(
        pb.UpdateStoryboardRequest(
            job_id=job.job_id, storyboard=board, version=job.storyboard_version
        )
    ).job
    stub.ApproveStoryboard(
        pb.ApproveStoryboardRequest(job_id=job.job_id, version=job.storyboard_version)
    )
    first = wait_for(stub, job.job_id, FINISHED)
    assert first.state == pb.JOB_STATE_DONE, first.error
    assert first.storyboard.scenes[1].narration == "The whale sang back across the dark water."
    assert first.storyboard.scenes[2].image_prompt.startswith("a lighthouse at dawn")
    narrated = sum(1 for scene in first.storyboard.scenes if scene.narration.strip())
    assert first.narration_synthesized == narrated

    # 2. Scene 1's narration on the finished job: a new run.
    board = edited(first.storyboard, {(1, "narration"): "At first, the keeper was alone."})
    stub.UpdateStoryboard(
        pb.UpdateStoryboardRequest(
            job_id=first.job_id, storyboard=board, version=first.storyboard_version
        )
    )
    second = _next_run(stub, first)
    assert second.state == pb.JOB_STATE_DONE, second.error
    # Only scene 1's speech was synthesised again.
    assert (second.narration_synthesized, second.narration_cached) == (1, narrated - 1)
    # No image was drawn again: each is the earlier one, or a hit of the render cache.
    before = {image.index: image.uri for image in first.images}
    for image in second.images:
        assert image.uri == before[image.index] or image.cached, image
    # A new video at a new URI; the old one is still readable.
    assert second.video_uri != first.video_uri
    assert read(stub, second.job_id, first.video_uri)[4:8] == b"ftyp"
    assert read(stub, second.job_id, second.video_uri)[4:8] == b"ftyp"


def _next_run(stub, first: pb.Job) -> pb.Job:
    """The job once the run that the edit started has finished."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        job = stub.GetJob(pb.GetJobRequest(job_id=first.job_id)).job
        if job.generation > first.generation and job.state in FINISHED:
            return job
        time.sleep(0.5)
    raise AssertionError("the edit's run did not finish")
