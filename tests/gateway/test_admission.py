"""Admission refuses at the door what a later stage would refuse (issue 11, finding 4).

Each doomed input of the finding is sent to the gateway's wire and must be
INVALID_ARGUMENT at once, with nothing written to the artifact store or the job
database: unknown voices (``no-such-voice``, ``..``, ``JOE``), a prompt made only
of chat-template tokens, and uploads with a valid audio header and nothing usable
behind it (a truncated MP3, an HLS or an ffconcat playlist). Before, every one of
them was accepted and failed 80-130 s later, after the storyboard and the renders.

The voice and upload tests run twice: against the compose test double, and
against the real composer (its gRPC server in this process, voice not loaded:
ListVoices and ProbeAudio need none), so the double is held to the real contract.
"""

from __future__ import annotations

import math
import re
import struct
from pathlib import Path

import grpc
import pytest
from sqlalchemy import select
from storyreel_composer.service import ComposerService
from storyreel_composer.settings import ComposerSettings
from storyreel_gateway.admission import VoiceCatalog, VoiceList
from storyreel_gateway.db import jobs as jobs_table
from storyreel_gateway.db import uploads as uploads_table
from support import (
    WAV_HEADER_ONLY,
    finished_job,
    free_port,
    lavfi_media,
    upload_requests,
    wav_bytes,
)

from storyreel.channels import open_channel
from storyreel.composer.v1 import composer_pb2, composer_pb2_grpc
from storyreel.errors import UpstreamFailed
from storyreel.gateway.v1 import gateway_pb2 as pb
from storyreel.llm.v1 import llm_pb2
from storyreel.serving import create_server
from storyreel.types.v1 import types_pb2

Code = grpc.StatusCode

#: A prompt made only of chat-template control tokens (and whitespace).
ONLY_MARKUP = "<|im_start|> <|im_end|>\n</s><s> [INST] [/INST] <<SYS>><</SYS>> <start_of_turn>"


def tone_mp3(tmp_path: Path, seconds: float = 3.0) -> bytes:
    return lavfi_media(tmp_path / "tone.mp3", "sine", seconds, "-c:a", "libmp3lame").read_bytes()


#: An ID3v2 header (an MP3's valid start, as the gateway sniffs it) with an empty tag.
ID3 = b"ID3\x04\x00\x00\x00\x00\x00\x00"


def doomed_uploads(tmp_path: Path) -> dict[str, bytes]:
    """Uploads with a valid audio header and nothing usable behind it."""
    mp3 = tone_mp3(tmp_path)
    return {
        "truncated-mp3": mp3[: len(mp3) // 2],
        "hls-playlist": ID3
        + b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:3,\naudio.mp3\n#EXT-X-ENDLIST\n",
        "ffconcat-playlist": ID3 + b"ffconcat version 1.0\nfile audio.mp3\nfile audio.wav\n",
        "wav-header-only": WAV_HEADER_ONLY,
        "wav-without-samples": wav_bytes(0.0, 16000),
    }


# -- gateways wired to the double or to the real composer -----------------------------------


@pytest.fixture
async def start_real_composer(file_store, tmp_path):
    """Starts the real composer's gRPC server (voice not loaded, SERVING); returns its address."""
    started = []

    async def start() -> str:
        settings = ComposerSettings(port=0, work_dir=tmp_path / "composer-work")
        running = await create_server(settings, ComposerService(settings, file_store))
        await running.set_serving(True)
        started.append(running)
        return f"127.0.0.1:{running.port}"

    yield start
    for running in started:
        await running.stop(0)


@pytest.fixture
async def real_composer(start_real_composer):
    return await start_real_composer()


@pytest.fixture(params=["double", "real"])
async def gw(request, start_gateway, start_real_composer, upstream):
    """A gateway on the compose double or on the real composer."""
    if request.param == "double":
        return await start_gateway()
    return await start_gateway(composer_address=await start_real_composer())


async def _job_rows(under_test) -> list:
    async with under_test.running.service.database.read() as conn:
        return (await conn.execute(select(jobs_table.c.job_id))).all()


async def _upload_rows(under_test) -> list:
    async with under_test.running.service.database.read() as conn:
        return (
            await conn.execute(
                select(
                    uploads_table.c.uri,
                    uploads_table.c.state,
                    uploads_table.c.duration_s,
                    uploads_table.c.codec,
                )
            )
        ).all()


async def _refused(call, code=Code.INVALID_ARGUMENT) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return caught.value.details()


# -- voices ---------------------------------------------------------------------------------


@pytest.mark.parametrize("voice", ["no-such-voice", "..", "JOE"])
async def test_an_unknown_voice_is_refused_at_create_and_nothing_is_written(
    gw, upstream, file_store, voice
):
    details = await _refused(
        gw.stub.CreateVideo(pb.CreateVideoRequest(prompt="a fox", scene_count=1, voice=voice))
    )
    assert f"voice {voice!r} is not one of the composer's voices: joe" in details
    assert "case-sensitive" in details
    assert list(file_store.list()) == []
    assert await _job_rows(gw) == []
    assert upstream.story_requests == []  # no storyboard was paid for


async def test_a_known_voice_and_the_default_are_admitted(gw, upstream):
    for voice in ("joe", ""):
        request = pb.CreateVideoRequest(prompt="a fox", scene_count=1, voice=voice)
        assert (await gw.stub.CreateVideo(request)).job_id
    assert len(await _job_rows(gw)) == 2


async def test_a_job_with_a_known_voice_is_composed_with_it(start_gateway, upstream):
    gateway = await start_gateway()
    request = pb.CreateVideoRequest(prompt="a fox", scene_count=1, voice="joe")
    job = await finished_job(gateway.stub, (await gateway.stub.CreateVideo(request)).job_id)
    assert job.state == pb.JOB_STATE_DONE, job.error
    assert upstream.compose_requests[-1].voice == "joe"


async def test_the_voice_list_is_cached_and_an_empty_voice_needs_no_composer(
    start_gateway, upstream
):
    gateway = await start_gateway()
    for _ in range(3):
        await gateway.stub.CreateVideo(pb.CreateVideoRequest(prompt="x", voice="joe"))
    assert upstream.list_voices_calls == 1
    upstream.voices_error = Code.UNAVAILABLE  # the composer goes away: the cached list serves
    await gateway.stub.CreateVideo(pb.CreateVideoRequest(prompt="x", voice="joe"))
    await _refused(gateway.stub.CreateVideo(pb.CreateVideoRequest(prompt="x", voice="Joe")))


async def test_with_no_voice_list_and_no_composer_a_named_voice_is_unavailable(
    start_gateway, upstream, file_store
):
    upstream.voices_error = Code.UNAVAILABLE
    gateway = await start_gateway()
    details = await _refused(
        gateway.stub.CreateVideo(pb.CreateVideoRequest(prompt="x", voice="joe")),
        Code.UNAVAILABLE,
    )
    assert "voice cannot be checked now" in details
    assert await _job_rows(gateway) == []
    # A request that names no voice does not depend on the composer's list.
    await gateway.stub.CreateVideo(pb.CreateVideoRequest(prompt="x"))


async def test_regenerating_a_job_whose_voice_the_composer_dropped_is_refused(
    start_gateway, upstream
):
    gateway = await start_gateway()
    job_id = (
        await gateway.stub.CreateVideo(
            pb.CreateVideoRequest(prompt="x", scene_count=1, voice="joe")
        )
    ).job_id
    await finished_job(gateway.stub, job_id)
    upstream.voices = ("amy",)
    upstream.default_voice = "amy"
    gateway.running.service.runner.admission.voices.expire()  # ask the composer again
    details = await _refused(
        gateway.stub.RegenerateScene(pb.RegenerateSceneRequest(job_id=job_id, index=1, seed=7))
    )
    assert "voice 'joe' is not one of the composer's voices: amy" in details
    job = (await gateway.stub.GetJob(pb.GetJobRequest(job_id=job_id))).job
    assert job.state == pb.JOB_STATE_DONE  # left as it was


async def test_the_voice_catalog_refreshes_and_falls_back_to_its_last_list():
    now = [0.0]
    answers: list = [VoiceList(("joe",), "joe"), UpstreamFailed("down"), VoiceList(("amy",), "amy")]
    asked = []

    class Source:
        async def list_voices(self):
            asked.append(now[0])
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer

    catalog = VoiceCatalog(Source(), refresh_s=300, retry_s=15, clock=lambda: now[0])
    assert (await catalog.get()).names == ("joe",)
    now[0] = 299
    assert (await catalog.get()).names == ("joe",)  # still fresh: not asked
    now[0] = 300
    assert (await catalog.get()).names == ("joe",)  # refresh failed: the last list
    now[0] = 310
    assert (await catalog.get()).names == ("joe",)  # not asked again before retry_s
    now[0] = 316
    assert (await catalog.get()).names == ("amy",)
    assert asked == [0, 300, 316]

    class Down:
        async def list_voices(self):
            raise UpstreamFailed("compose is down")

    with pytest.raises(UpstreamFailed, match="voice cannot be checked now: compose is down"):
        await VoiceCatalog(Down()).get()


# -- prompts --------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [ONLY_MARKUP, "  <|system|>\n\t</s>  "])
async def test_a_prompt_of_only_chat_template_tokens_is_refused_at_create(
    start_gateway, upstream, file_store, prompt
):
    gateway = await start_gateway()
    details = await _refused(gateway.stub.CreateVideo(pb.CreateVideoRequest(prompt=prompt)))
    assert details == "prompt must contain text, not only chat-template markup"
    assert list(file_store.list()) == []
    assert await _job_rows(gateway) == []
    assert upstream.story_requests == []


async def test_a_prompt_with_text_between_the_tokens_is_admitted_and_sent_as_given(
    start_gateway, upstream
):
    gateway = await start_gateway()
    job_id = (
        await gateway.stub.CreateVideo(
            pb.CreateVideoRequest(prompt=" <|user|> a fox ", scene_count=1)
        )
    ).job_id
    await finished_job(gateway.stub, job_id)
    # The LLM service strips the tokens itself (the same shared rule).
    assert [r.prompt for r in upstream.story_requests] == ["<|user|> a fox"]
    assert isinstance(upstream.story_requests[0], llm_pb2.WriteStoryboardRequest)


# -- uploads --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "truncated-mp3",
        "hls-playlist",
        "ffconcat-playlist",
        "wav-header-only",
        "wav-without-samples",
    ],
)
async def test_an_upload_with_an_audio_header_and_nothing_usable_is_refused_and_deleted(
    gw, file_store, tmp_path, name
):
    data = doomed_uploads(tmp_path)[name]
    filename = "song.wav" if name.startswith("wav") else "song.mp3"
    details = await _refused(gw.stub.UploadAudio(upload_requests(data, filename)))
    # Said of the caller's own file, by the name it sent; the deleted object is not named.
    assert details.startswith(f"the upload {filename!r} is not usable audio: "), details
    assert "uploads/" not in details
    assert list(file_store.list()) == []  # object deleted
    assert await _upload_rows(gw) == []  # and its row


async def test_the_real_composer_names_the_reason(real_composer, start_gateway, tmp_path):
    gateway = await start_gateway(composer_address=real_composer)
    expected = {
        "truncated-mp3": r"its data is corrupt|it is truncated",
        "hls-playlist": r"not a media file|not in a supported format",
        "ffconcat-playlist": r"not a media file|not in a supported format",
        "wav-header-only": r"not a media file",
        "wav-without-samples": r"holds no samples",
    }
    for name, data in doomed_uploads(tmp_path).items():
        details = await _refused(gateway.stub.UploadAudio(upload_requests(data, "song.mp3")))
        assert re.search(expected[name], details), (name, details)


async def test_a_good_upload_is_probed_and_its_length_and_codec_are_stored(gw, file_store):
    data = wav_bytes(0.5, 16000)
    response = await gw.stub.UploadAudio(upload_requests(data, "a.wav"))
    assert response.size_bytes == len(data)
    assert file_store.get_bytes(response.audio_uri) == data
    [(uri, state, duration_s, codec)] = await _upload_rows(gw)
    assert (uri, state, codec) == (response.audio_uri, "stored", "pcm_s16le")
    assert math.isclose(duration_s, 0.5, abs_tol=1e-3)


async def test_the_probed_facts_are_stored_and_read_back_on_both_databases(
    start_gateway, database_url, file_store
):
    gateway = await start_gateway(database_url=database_url)
    uri = (
        await gateway.stub.UploadAudio(upload_requests(wav_bytes(0.25, 8000), "a.wav"))
    ).audio_uri
    [(stored_uri, state, duration_s, codec)] = await _upload_rows(gateway)
    assert (stored_uri, state, codec) == (uri, "stored", "pcm_s16le")
    assert math.isclose(duration_s, 0.25, abs_tol=1e-3)
    details = await _refused(
        gateway.stub.CreateVideo(pb.CreateVideoRequest(prompt="x", scene_count=7, audio_uri=uri))
    )
    assert "too short to show 7 scenes at 24 fps" in details
    await gateway.stub.CreateVideo(pb.CreateVideoRequest(prompt="x", scene_count=6, audio_uri=uri))


async def test_audio_too_short_for_the_scenes_is_refused_unless_it_is_music(gw, file_store):
    uri = (await gw.stub.UploadAudio(upload_requests(wav_bytes(0.1, 16000), "short.wav"))).audio_uri
    before = sorted(file_store.list())
    # 0.1 s at 24 fps is 2 frames: too few for 4 scenes (the composer's own rule).
    details = await _refused(
        gw.stub.CreateVideo(pb.CreateVideoRequest(prompt="x", scene_count=4, audio_uri=uri))
    )
    assert "the audio lasts 0.100 s: too short to show 4 scenes at 24 fps" in details
    assert sorted(file_store.list()) == before
    assert await _job_rows(gw) == []
    # Two scenes fit; as music under the narration it loops, so any length does.
    await gw.stub.CreateVideo(pb.CreateVideoRequest(prompt="x", scene_count=2, audio_uri=uri))
    music = pb.CreateVideoRequest(
        prompt="x", scene_count=4, audio_uri=uri, audio_mode=types_pb2.AUDIO_MODE_MUSIC
    )
    await gw.stub.CreateVideo(music)


async def test_an_upload_the_composer_cannot_check_is_unavailable_and_not_kept(
    start_gateway, file_store
):
    gateway = await start_gateway(composer_address=f"127.0.0.1:{free_port()}")
    await _refused(
        gateway.stub.UploadAudio(upload_requests(wav_bytes(0.5, 16000), "a.wav")), Code.UNAVAILABLE
    )
    assert list(file_store.list()) == []
    assert await _upload_rows(gateway) == []


# -- the double against the real composer ---------------------------------------------------


def _contract_corpus(tmp_path: Path) -> dict[str, tuple[str, bytes | None]]:
    """name -> (object key, bytes or None for a missing object)."""
    long_header = bytearray(wav_bytes(0.2, 16000))
    # A data chunk that claims 4 s of samples but holds 0.2 s: cut off.
    struct.pack_into("<I", long_header, 40, 16000 * 2 * 4)
    corpus = {
        "wav-mono": ("uploads/t/a/audio.wav", wav_bytes(0.75, 16000)),
        "wav-stereo-44k": ("uploads/t/b/audio.wav", wav_bytes(0.5, 44100, 2)),
        "wav-truncated": ("uploads/t/c/audio.wav", bytes(long_header)),
        "missing": ("uploads/t/d/audio.wav", None),
        "not-an-upload": ("jobs/j/video/audio.wav", wav_bytes(0.5, 16000)),
    }
    for name, data in doomed_uploads(tmp_path).items():
        corpus[name] = (f"uploads/t/{name}/audio.wav", data)
    return corpus


async def _probe(stub, uri: str):
    try:
        return Code.OK, await stub.ProbeAudio(composer_pb2.ProbeAudioRequest(uri=uri))
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details()


async def test_the_compose_double_answers_probe_audio_and_list_voices_as_the_real_composer(
    real_composer, upstream, file_store, tmp_path
):
    """Both over gRPC, on the same stored objects: the same codes, facts and messages
    (for ffmpeg's refusals, the same message up to ffmpeg's own words)."""
    corpus = _contract_corpus(tmp_path)
    async with (
        open_channel(real_composer) as real_channel,
        open_channel(upstream.address) as double_channel,
    ):
        real = composer_pb2_grpc.ComposerServiceStub(real_channel)
        double = composer_pb2_grpc.ComposerServiceStub(double_channel)
        for name, (key, data) in corpus.items():
            uri = file_store.put_bytes(key, data) if data is not None else file_store.root_uri + key
            code, answer = await _probe(double, uri)
            real_code, real_answer = await _probe(real, uri)
            assert code == real_code, (name, answer, real_answer)
            if code == Code.OK:
                assert (answer.codec, answer.sample_rate, answer.channels, answer.format) == (
                    real_answer.codec,
                    real_answer.sample_rate,
                    real_answer.channels,
                    real_answer.format,
                ), name
                assert math.isclose(answer.duration_s, real_answer.duration_s, abs_tol=1e-3)
            elif "is not usable audio: " in real_answer:
                # Same field, same object, same kind of refusal; ffmpeg's own words differ.
                head = real_answer.split("is not usable audio: ")[0]
                assert answer.startswith(head + "is not usable audio: "), (name, answer)
            else:
                assert answer == real_answer, name
        request = composer_pb2.ListVoicesRequest()
        assert await double.ListVoices(request) == await real.ListVoices(request)
