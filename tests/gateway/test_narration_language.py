"""Narration in the story's language (issue 17, item 3), seen from the gateway's API.

The gateway learns each voice's language from the composer (ListVoices). A story clearly in
a language no voice speaks is refused: at CreateVideo (FAILED_PRECONDITION) when the prompt
or the caller's own storyboard tells the language, or, for a generated storyboard, by
failing the job before any image is drawn. The caller's own audio as the whole sound track
needs no voice. A voice the caller names that clearly speaks another language than the
story's is INVALID_ARGUMENT when a voice of the story's language exists. Text too short to
tell is never refused on a guess.

The compose double has one voice, joe (en_US), as the real composer out of the box. The
tests with a second language run the real composer (its gRPC server in this process,
voices not loaded: ListVoices needs none) with a voice folder holding a test double of a
German voice (:func:`support.german_voice_double`: joe's model, a de_DE config).
"""

from __future__ import annotations

import grpc
import pytest
from sqlalchemy import select
from storyreel_composer.service import ComposerService
from storyreel_composer.settings import ComposerSettings
from storyreel_gateway.db import jobs as jobs_table
from support import GERMAN_VOICE, finished_job, german_voice_double, upload_audio

from storyreel.gateway.v1 import gateway_pb2 as pb
from storyreel.llm.v1 import llm_pb2, llm_pb2_grpc
from storyreel.serving import create_server
from storyreel.types.v1 import types_pb2

Code = grpc.StatusCode

CHINESE_PROMPT = "一只小狐狸在黎明时分穿过白雪覆盖的森林，它想学会飞翔。"
GERMAN_PROMPT = "Ein kleiner Fuchs lernt im verschneiten Wald das Fliegen."
CHINESE_STORY = ["从前有一只小狐狸，它很想飞。", "每天晚上，它都望着天空中的鸟儿。"]
GERMAN_STORY = [
    "Es war einmal ein kleiner Fuchs, der fliegen wollte.",
    "Jeden Abend sah er den Vögeln am Himmel nach.",
]


def storyboard(narrations: list[str]) -> types_pb2.Storyboard:
    return types_pb2.Storyboard(
        title="Fuchs",
        scenes=[
            types_pb2.Scene(index=i, narration=text, image_prompt=f"a fox, scene {i}")
            for i, text in enumerate(narrations, start=1)
        ],
    )


async def _refused(call, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return caught.value.details()


async def _job_rows(under_test) -> list:
    async with under_test.running.service.database.read() as conn:
        return (await conn.execute(select(jobs_table.c.job_id))).all()


@pytest.fixture
async def bilingual_composer(file_store, tmp_path):
    """The real composer with joe and the German voice double; its address."""
    settings = ComposerSettings(
        port=0,
        work_dir=tmp_path / "composer-work",
        voice_dir=german_voice_double(tmp_path / "voices"),
    )
    running = await create_server(settings, ComposerService(settings, file_store))
    await running.set_serving(True)
    yield f"127.0.0.1:{running.port}"
    await running.stop(0)


class StoryInChinese(llm_pb2_grpc.LlmServiceServicer):
    """An LLM double that writes its story in Chinese whatever the prompt's language."""

    def __init__(self) -> None:
        self.calls = 0

    async def WriteStoryboard(self, request, context):
        self.calls += 1
        scenes = [CHINESE_STORY[i % len(CHINESE_STORY)] for i in range(request.scene_count)]
        return llm_pb2.WriteStoryboardResponse(storyboard=storyboard(scenes))


@pytest.fixture
async def chinese_llm():
    server = grpc.aio.server()
    writer = StoryInChinese()
    llm_pb2_grpc.add_LlmServiceServicer_to_server(writer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    writer.address = f"127.0.0.1:{port}"
    yield writer
    await server.stop(0)


async def test_a_prompt_in_a_language_no_voice_speaks_is_refused_at_create_and_nothing_is_kept(
    start_gateway, upstream, file_store
):
    gateway = await start_gateway()
    details = await _refused(
        gateway.stub.CreateVideo(pb.CreateVideoRequest(prompt=CHINESE_PROMPT, scene_count=2)),
        Code.FAILED_PRECONDITION,
    )
    assert "the prompt is in Chinese (zh)" in details
    assert "the voices speak English (en)" in details
    assert "Install a piper voice for Chinese (zh)" in details
    assert "bring your own soundtrack" in details
    assert await _job_rows(gateway) == []
    assert list(file_store.list()) == []
    assert upstream.story_requests == []  # no story was paid for
    # Too short to tell ("Hallo Welt"), or no language at all: admitted, never refused on a
    # guess (the composer speaks it with the default voice).
    for prompt in ("Hallo Welt", "狐狸", "x"):
        assert (await gateway.stub.CreateVideo(pb.CreateVideoRequest(prompt=prompt))).job_id


async def test_a_storyboard_in_a_language_no_voice_speaks_is_refused_unless_audio_replaces_it(
    start_gateway, upstream
):
    gateway = await start_gateway()
    board = storyboard(CHINESE_STORY)
    details = await _refused(
        gateway.stub.CreateVideo(pb.CreateVideoRequest(storyboard=board)),
        Code.FAILED_PRECONDITION,
    )
    assert "the storyboard's narration is in Chinese (zh)" in details
    assert await _job_rows(gateway) == []
    # Music plays under the narration: it is still spoken.
    audio_uri = (await upload_audio(gateway.stub)).audio_uri
    music = pb.CreateVideoRequest(
        storyboard=board, audio_uri=audio_uri, audio_mode=types_pb2.AUDIO_MODE_MUSIC
    )
    await _refused(gateway.stub.CreateVideo(music), Code.FAILED_PRECONDITION)
    # The caller's audio as the whole sound track: nothing is spoken, no voice is needed.
    for mode in (types_pb2.AUDIO_MODE_UNSPECIFIED, types_pb2.AUDIO_MODE_SOUNDTRACK):
        request = pb.CreateVideoRequest(
            storyboard=board, audio_uri=audio_uri, audio_mode=mode, fps=4
        )
        job_id = (await gateway.stub.CreateVideo(request)).job_id
        job = await finished_job(gateway.stub, job_id)
        assert job.state == pb.JOB_STATE_DONE, job.error


async def test_a_story_a_voice_speaks_is_admitted_and_a_named_voice_of_another_is_not(
    start_gateway, upstream, bilingual_composer
):
    gateway = await start_gateway(composer_address=bilingual_composer)
    # No voice named: the composer chooses the German one; the request is admitted.
    for request in (
        pb.CreateVideoRequest(prompt=GERMAN_PROMPT),
        pb.CreateVideoRequest(storyboard=storyboard(GERMAN_STORY)),
        pb.CreateVideoRequest(prompt=GERMAN_PROMPT, voice=GERMAN_VOICE),
    ):
        assert (await gateway.stub.CreateVideo(request)).job_id
    # A named voice that speaks English, for a German story: refused, naming the one to use.
    for request, subject in (
        (pb.CreateVideoRequest(prompt=GERMAN_PROMPT, voice="joe"), "the prompt"),
        (
            pb.CreateVideoRequest(storyboard=storyboard(GERMAN_STORY), voice="joe"),
            "the storyboard's narration",
        ),
    ):
        details = await _refused(gateway.stub.CreateVideo(request), Code.INVALID_ARGUMENT)
        assert (
            f"voice 'joe' speaks English (en), but {subject} is in German (de): "
            f"choose a voice that speaks it ({GERMAN_VOICE})"
        ) in details
    # And the German voice for an English prompt, likewise.
    details = await _refused(
        gateway.stub.CreateVideo(
            pb.CreateVideoRequest(
                prompt="Once upon a time a little fox wanted to fly.", voice=GERMAN_VOICE
            )
        ),
        Code.INVALID_ARGUMENT,
    )
    assert f"voice '{GERMAN_VOICE}' speaks German (de)" in details
    # Chinese: still no voice for it.
    await _refused(
        gateway.stub.CreateVideo(pb.CreateVideoRequest(prompt=CHINESE_PROMPT)),
        Code.FAILED_PRECONDITION,
    )


async def test_a_generated_story_no_voice_speaks_fails_the_job_before_anything_is_drawn(
    start_gateway, upstream, chinese_llm
):
    gateway = await start_gateway(llm_address=chinese_llm.address)
    # The prompt is English (admitted); the story comes back in Chinese.
    created = await gateway.stub.CreateVideo(
        pb.CreateVideoRequest(prompt="A little fox wants to learn how to fly.", scene_count=2)
    )
    job = await finished_job(gateway.stub, created.job_id)
    assert job.state == pb.JOB_STATE_FAILED
    assert job.error.code == "FAILED_PRECONDITION"
    assert "the storyboard's narration is in Chinese (zh)" in job.error.message
    assert "no narration voice here speaks it" in job.error.message
    assert chinese_llm.calls == 1
    assert upstream.render_calls == 0  # no GPU time was spent on it
    assert upstream.compose_requests == []
    assert [s.narration for s in job.storyboard.scenes] == CHINESE_STORY  # kept to read


async def test_a_story_in_review_no_voice_speaks_cannot_be_approved_until_edited(
    start_gateway, upstream, chinese_llm
):
    gateway = await start_gateway(llm_address=chinese_llm.address)
    created = await gateway.stub.CreateVideo(
        pb.CreateVideoRequest(prompt="A fox wants to fly.", scene_count=2, review=True)
    )
    job = await finished_job(gateway.stub, created.job_id)  # stops in REVIEW
    assert job.state == pb.JOB_STATE_REVIEW
    approve = pb.ApproveStoryboardRequest(job_id=created.job_id, version=job.storyboard_version)
    details = await _refused(gateway.stub.ApproveStoryboard(approve), Code.FAILED_PRECONDITION)
    assert "Chinese (zh)" in details
    # An edit into another language no voice speaks is refused too; one into English is taken.
    update = pb.UpdateStoryboardRequest(
        job_id=created.job_id, storyboard=storyboard(GERMAN_STORY), version=approve.version
    )
    await _refused(gateway.stub.UpdateStoryboard(update), Code.FAILED_PRECONDITION)
    update.storyboard.CopyFrom(
        storyboard(
            [
                "Once upon a time a little fox wanted to fly.",
                "Every evening he watched the birds in the sky.",
            ]
        )
    )
    edited = (await gateway.stub.UpdateStoryboard(update)).job
    approve.version = edited.storyboard_version
    await gateway.stub.ApproveStoryboard(approve)
    job = await finished_job(gateway.stub, created.job_id)
    assert job.state == pb.JOB_STATE_DONE, job.error
    assert upstream.render_calls == 1
