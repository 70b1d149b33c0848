"""Review and edit the storyboard (issue 14, items 1, 6 and the gateway half of 3).

CreateVideoRequest.review stops a job in REVIEW once its storyboard is written;
UpdateStoryboard replaces it (in review, or on a finished job: a new run that draws
only the scenes whose picture changed); ApproveStoryboard lets it go on.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from support import ALICE, API_KEYS, BOB, finished_job, watch_events

from storyreel.gateway.v1 import gateway_pb2 as pb
from storyreel.types.v1 import types_pb2


@pytest.fixture
def gateway_database(database_url):
    """Every test here runs on SQLite and on PostgreSQL."""
    return database_url


def _board() -> types_pb2.Storyboard:
    return types_pb2.Storyboard(
        title="The keeper",
        characters=[types_pb2.Character(name="Ada", appearance="a keeper in a red coat")],
        scenes=[
            types_pb2.Scene(
                index=1,
                narration="Ada climbs the stairs.",
                image_prompt="ink, a keeper in a red coat climbs a spiral stair",
                characters=["Ada"],
            ),
            types_pb2.Scene(
                index=2, narration="The lamp wakes.", image_prompt="ink, a great lamp glowing"
            ),
            types_pb2.Scene(
                index=3, narration="Ships turn home.", image_prompt="ink, ships on a dark sea"
            ),
        ],
        style="ink",
    )


async def _refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def _get(gateway, job_id: str, metadata=()) -> pb.Job:
    return (await gateway.GetJob(pb.GetJobRequest(job_id=job_id), metadata=metadata)).job


async def _read(gateway, job_id: str, uri: str) -> bytes:
    request = pb.ReadArtifactRequest(job_id=job_id, uri=uri)
    return b"".join([m.chunk async for m in gateway.ReadArtifact(request)])


async def test_review_edit_approve_then_edit_the_finished_job(gateway, upstream):
    board = _board()
    request = pb.CreateVideoRequest(storyboard=board, seed=7, review=True)
    job_id = (await gateway.CreateVideo(request)).job_id
    events = await watch_events(gateway, job_id)
    # The stream ends in REVIEW (its event, or the snapshot if it got there first).
    assert events[-1].kind in (pb.EVENT_KIND_REVIEW, pb.EVENT_KIND_SNAPSHOT)
    job = events[-1].job
    assert job.state == pb.JOB_STATE_REVIEW and job.review
    assert job.storyboard == board and job.storyboard_version == 1
    # Nothing is drawn, and no replica claims it.
    await asyncio.sleep(0.6)
    assert (await _get(gateway, job_id)).state == pb.JOB_STATE_REVIEW
    assert upstream.render_calls == 0 and upstream.compose_requests == []
    # A watcher of a job in review gets the snapshot, and the stream ends.
    assert [e.kind for e in await watch_events(gateway, job_id)] == [pb.EVENT_KIND_SNAPSHOT]

    edited = _board()
    edited.scenes[1].narration = "The great lamp wakes at dusk."
    edited.scenes[2].image_prompt = "ink, three ships under a lighthouse beam"
    job = (
        await gateway.UpdateStoryboard(
            pb.UpdateStoryboardRequest(job_id=job_id, storyboard=edited, version=1)
        )
    ).job
    assert job.state == pb.JOB_STATE_REVIEW and job.storyboard_version == 2
    assert job.storyboard == edited

    # A stale version, or a bad storyboard: refused, nothing changed.
    other = _board()
    other.title = "Another"
    stale = await _refused(
        gateway.UpdateStoryboard(
            pb.UpdateStoryboardRequest(job_id=job_id, storyboard=other, version=1)
        )
    )
    assert stale.code() == grpc.StatusCode.ABORTED
    assert "the storyboard changed since version 1; fetch it again" in stale.details()
    bad = _board()
    bad.scenes[0].image_prompt = " "
    invalid = await _refused(
        gateway.UpdateStoryboard(
            pb.UpdateStoryboardRequest(job_id=job_id, storyboard=bad, version=2)
        )
    )
    assert invalid.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "storyboard.scenes[0].image_prompt: must not be empty" in invalid.details()
    stale = await _refused(
        gateway.ApproveStoryboard(pb.ApproveStoryboardRequest(job_id=job_id, version=1))
    )
    assert stale.code() == grpc.StatusCode.ABORTED
    job = await _get(gateway, job_id)
    assert (job.state, job.storyboard_version, job.storyboard) == (
        pb.JOB_STATE_REVIEW,
        2,
        edited,
    )

    approved = await gateway.ApproveStoryboard(
        pb.ApproveStoryboardRequest(job_id=job_id, version=2)
    )
    assert approved.job.state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING)
    job = await finished_job(gateway, job_id)
    assert job.state == pb.JOB_STATE_DONE, job.error
    (render,) = upstream.render_messages
    assert {s.index: s.prompt for s in render.scenes}[3] == (
        "ink, three ships under a lighthouse beam"
    )
    (compose,) = upstream.compose_requests
    assert [s.narration for s in compose.scenes] == [s.narration for s in edited.scenes]
    again = await _refused(
        gateway.ApproveStoryboard(pb.ApproveStoryboardRequest(job_id=job_id, version=2))
    )
    assert again.code() == grpc.StatusCode.FAILED_PRECONDITION

    # On the finished job, a new narration for scene 1: a new run that draws nothing.
    old_video, old_images = job.video_uri, [i.uri for i in job.images]
    edited.scenes[0].narration = "Ada climbs, counting the steps."
    rerun = await gateway.UpdateStoryboard(
        pb.UpdateStoryboardRequest(job_id=job_id, storyboard=edited, version=2)
    )
    assert rerun.job.state == pb.JOB_STATE_QUEUED and rerun.job.generation == 1
    assert rerun.job.storyboard_version == 3
    job = await finished_job(gateway, job_id)
    assert job.state == pb.JOB_STATE_DONE, job.error
    assert upstream.render_calls == 1  # no scene drawn again
    assert [i.uri for i in job.images] == old_images
    assert len(upstream.compose_requests) == 2
    assert upstream.compose_requests[-1].scenes[0].narration == "Ada climbs, counting the steps."
    assert job.video_uri != old_video
    assert await _read(gateway, job_id, old_video) == b"mp4"  # the old video stays readable
    assert await _read(gateway, job_id, job.video_uri) == b"mp4"


async def test_a_finished_job_redraws_only_changed_and_new_scenes(gateway, upstream):
    job_id = (await gateway.CreateVideo(pb.CreateVideoRequest(storyboard=_board()))).job_id
    job = await finished_job(gateway, job_id)
    assert job.state == pb.JOB_STATE_DONE, job.error
    images = {s.image_prompt: i.uri for s, i in zip(job.storyboard.scenes, job.images, strict=True)}

    # Reordered (3, 1, 2), scene "2" gets a new picture, and a new scene at the end.
    board = _board()
    first, second, third = (types_pb2.Scene() for _ in range(3))
    first.CopyFrom(board.scenes[2])
    second.CopyFrom(board.scenes[0])
    third.CopyFrom(board.scenes[1])
    third.image_prompt = "ink, a great lamp in fog"
    new = types_pb2.Scene(index=9, narration="Morning.", image_prompt="ink, dawn over the sea")
    del board.scenes[:]
    board.scenes.extend([first, second, third, new])
    version = job.storyboard_version
    response = await gateway.UpdateStoryboard(
        pb.UpdateStoryboardRequest(job_id=job_id, storyboard=board, version=version)
    )
    assert [s.index for s in response.job.storyboard.scenes] == [1, 2, 3, 4]  # renumbered
    job = await finished_job(gateway, job_id)
    assert job.state == pb.JOB_STATE_DONE, job.error
    assert upstream.render_requests[-1] == [3, 4]  # only the changed and the new scene
    assert job.scene_count == 4
    assert job.images[0].uri == images["ink, ships on a dark sea"]
    assert job.images[1].uri == images["ink, a keeper in a red coat climbs a spiral stair"]
    assert [s.narration for s in upstream.compose_requests[-1].scenes] == [
        "Ships turn home.",
        "Ada climbs the stairs.",
        "The lamp wakes.",
        "Morning.",
    ]


async def test_update_while_running_or_cancelled_is_a_failed_precondition(gateway, upstream):
    upstream.render_delay_s = 5.0
    job_id = (await gateway.CreateVideo(pb.CreateVideoRequest(storyboard=_board()))).job_id
    await watch_events(gateway, job_id, stop=lambda e: e.job.stage == pb.STAGE_RENDER)
    running = await _refused(
        gateway.UpdateStoryboard(
            pb.UpdateStoryboardRequest(job_id=job_id, storyboard=_board(), version=1)
        )
    )
    assert running.code() == grpc.StatusCode.FAILED_PRECONDITION
    cancelled = await gateway.CancelJob(pb.CancelJobRequest(job_id=job_id))
    assert cancelled.job.state == pb.JOB_STATE_CANCELLED
    cancelled = await _refused(
        gateway.UpdateStoryboard(
            pb.UpdateStoryboardRequest(job_id=job_id, storyboard=_board(), version=1)
        )
    )
    assert cancelled.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "cancelled" in cancelled.details()


async def test_another_tenants_job_is_not_found(start_gateway, upstream):
    stub = (await start_gateway(api_keys=API_KEYS)).stub
    request = pb.CreateVideoRequest(storyboard=_board(), review=True)
    job_id = (await stub.CreateVideo(request, metadata=ALICE)).job_id
    await watch_events(stub, job_id, metadata=ALICE)
    calls = {
        "update": stub.UpdateStoryboard(
            pb.UpdateStoryboardRequest(job_id=job_id, storyboard=_board(), version=1),
            metadata=BOB,
        ),
        "approve": stub.ApproveStoryboard(
            pb.ApproveStoryboardRequest(job_id=job_id, version=1), metadata=BOB
        ),
    }
    for name, call in calls.items():
        assert (await _refused(call)).code() == grpc.StatusCode.NOT_FOUND, name
    job = await _get(stub, job_id, ALICE)
    assert job.state == pb.JOB_STATE_REVIEW and job.storyboard_version == 1


async def test_a_generated_storyboard_in_review_survives_a_restart(start_gateway, upstream):
    first = await start_gateway()
    request = pb.CreateVideoRequest(prompt="a fox", scene_count=1, review=True)
    job_id = (await first.stub.CreateVideo(request)).job_id
    job = (await watch_events(first.stub, job_id))[-1].job
    assert job.state == pb.JOB_STATE_REVIEW and len(upstream.story_requests) == 1
    assert job.storyboard.scenes[0].narration == "line 1"
    await first.stop()

    second = await start_gateway()
    await asyncio.sleep(0.6)  # a few claim polls: nobody takes it
    job = await _get(second.stub, job_id)
    assert job.state == pb.JOB_STATE_REVIEW and upstream.render_calls == 0
    await second.stub.ApproveStoryboard(pb.ApproveStoryboardRequest(job_id=job_id, version=1))
    job = await finished_job(second.stub, job_id)
    assert job.state == pb.JOB_STATE_DONE, job.error
    assert len(upstream.story_requests) == 1  # the storyboard is not written again


def test_the_review_option_counts_in_the_fingerprint_only_when_set():
    from storyreel_gateway.admission import Admission
    from storyreel_gateway.jobs import JobSpec

    spec = JobSpec(prompt="a fox", scene_count=2, seed=1, width=64, height=64, fps=24)
    reviewed = spec.model_copy(update={"review": True})
    assert Admission.request_hash(spec) != Admission.request_hash(reviewed)


async def test_an_edited_shot_or_look_gets_its_prompt_assembled_again(gateway, upstream):
    board = _board()
    board.scenes[0].setting = "on a spiral stair"
    board.scenes[0].action = "climbs with a lamp"
    request = pb.CreateVideoRequest(storyboard=board, seed=7, review=True)
    job_id = (await gateway.CreateVideo(request)).job_id
    assert (await watch_events(gateway, job_id))[-1].job.state == pb.JOB_STATE_REVIEW
    edited = types_pb2.Storyboard()
    edited.CopyFrom(board)
    edited.scenes[0].setting = "at the top of the tower"  # the prompt left as it was
    edited.characters[0].appearance = "a keeper in a green oilskin"
    job = (
        await gateway.UpdateStoryboard(
            pb.UpdateStoryboardRequest(job_id=job_id, storyboard=edited, version=1)
        )
    ).job
    prompt = job.storyboard.scenes[0].image_prompt
    # Assembled as the LLM service assembles its own: style, appearance whole, action, setting.
    assert prompt == "ink, a keeper in a green oilskin, climbs with a lamp, at the top of the tower"
    # A prompt the editor wrote is kept as written; scenes without a shot are untouched.
    assert job.storyboard.scenes[1].image_prompt == board.scenes[1].image_prompt
    edited = job.storyboard
    edited.scenes[0].image_prompt = "ink, my own words for the tower"
    edited.scenes[0].setting = "on the gallery"
    job = (
        await gateway.UpdateStoryboard(
            pb.UpdateStoryboardRequest(job_id=job_id, storyboard=edited, version=2)
        )
    ).job
    assert job.storyboard.scenes[0].image_prompt == "ink, my own words for the tower"
