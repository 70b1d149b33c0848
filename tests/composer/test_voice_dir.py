"""Voices as data (issue 17, item 3): a voice folder, and narration in the story's language.

Every ``*.onnx`` in ``voice_dir`` with its ``*.onnx.json`` beside it is a voice named by its
file stem, with the language its config names; a request that names no voice is spoken by
a voice of its narration's language, and one clearly in a language no voice speaks is
refused (FAILED_PRECONDITION) before anything is read or made.

There is one real piper voice here (English, joe). The second language is a test double:
:func:`support.german_voice_double` is the joe model with a config that says de_DE. It
speaks with the English model; only its declared language is German.
"""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
from PIL import Image
from storyreel_composer.composer import Scene, VideoComposer
from storyreel_composer.service import ComposerService
from storyreel_composer.settings import ComposerSettings
from storyreel_composer.tts import NarrationSynthesizer
from support import GERMAN_VOICE, german_voice_double, stored_uris

from storyreel.channels import open_channel
from storyreel.compose_options import ComposeOptions
from storyreel.composer.v1 import composer_pb2, composer_pb2_grpc
from storyreel.errors import FailedPrecondition, InvalidInput
from storyreel.serving import create_server

GERMAN = [
    "Es war einmal ein kleiner Fuchs, der fliegen wollte.",
    "Jeden Abend sah er den Vögeln am Himmel nach.",
]
ENGLISH = [
    "Once upon a time a little fox wanted to fly.",
    "Every evening he watched the birds in the sky.",
]
CHINESE = ["从前有一只小狐狸，它很想飞。", "每天晚上，它都望着天空中的鸟儿。"]


@pytest.fixture
def voice_dir(tmp_path):
    return german_voice_double(tmp_path / "voices")


@pytest.fixture
def bilingual_settings(composer_settings, voice_dir) -> ComposerSettings:
    return composer_settings.model_copy(update={"voice_dir": voice_dir})


def scenes(file_store, job: str, narrations: list[str]) -> list[Scene]:
    return [
        Scene(file_store.uri_for(f"jobs/{job}/images/scene-{n:03d}.png"), text)
        for n, text in enumerate(narrations, start=1)
    ]


def request(file_store, job: str, narrations: list[str], **fields) -> composer_pb2.ComposeRequest:
    return composer_pb2.ComposeRequest(
        job_id=job,
        scenes=[
            composer_pb2.Scene(image_uri=scene.image_uri, narration=scene.narration)
            for scene in scenes(file_store, job, narrations)
        ],
        **fields,
    )


async def test_every_model_in_the_voice_folder_is_a_voice_named_by_its_stem_in_its_language(
    bilingual_settings, file_store, voice_dir, monkeypatch
):
    running = await create_server(
        bilingual_settings, ComposerService(bilingual_settings, file_store)
    )
    try:
        async with open_channel(f"127.0.0.1:{running.port}") as channel:
            stub = composer_pb2_grpc.ComposerServiceStub(channel)
            voices = await stub.ListVoices(composer_pb2.ListVoicesRequest())
    finally:
        await running.stop(0)
    assert [(v.name, v.language, v.sample_rate) for v in voices.voices] == [
        (GERMAN_VOICE, "de_DE", 22050),
        ("joe", "en_US", 22050),
    ]
    assert voices.default_voice == "joe"
    # The same folder from the environment, as a deployment sets it.
    monkeypatch.setenv("STORYREEL_COMPOSER_VOICE_DIR", str(voice_dir))
    assert NarrationSynthesizer.from_settings(ComposerSettings()).voice_names == [
        GERMAN_VOICE,
        "joe",
    ]


def test_a_model_without_its_config_a_missing_folder_or_a_name_given_twice_is_refused(
    tmp_path, voice_dir
):
    (voice_dir / "orphan.onnx").write_bytes(b"model without a config")
    with pytest.raises(ValueError, match=r"orphan\.onnx has no config orphan\.onnx\.json"):
        ComposerSettings(voice_dir=voice_dir)
    with pytest.raises(ValueError, match="is not a folder"):
        ComposerSettings(voice_dir=tmp_path / "no-such-folder")
    twice = german_voice_double(tmp_path / "again")
    with pytest.raises(ValueError, match=f"voice name.*{GERMAN_VOICE}.*more than once"):
        ComposerSettings(voice_dir=twice, voices={GERMAN_VOICE: twice / f"{GERMAN_VOICE}.onnx"})


def test_a_request_naming_no_voice_is_spoken_by_a_voice_of_its_narrations_language(
    bilingual_settings, file_store
):
    composer = VideoComposer(
        file_store, NarrationSynthesizer.from_settings(bilingual_settings), bilingual_settings
    )
    assert composer.check_request("job-de", scenes(file_store, "job-de", GERMAN)).voice == (
        GERMAN_VOICE
    )
    assert composer.check_request("job-en", scenes(file_store, "job-en", ENGLISH)).voice == "joe"
    # Too short to tell: the default speaks, nothing is refused on a guess.
    assert composer.check_request("job-short", scenes(file_store, "job-short", ["Ja."])).voice == (
        "joe"
    )
    # A named voice of the narration's language is kept; one of another language is refused,
    # naming the voice that speaks it.
    named = ComposeOptions(voice=GERMAN_VOICE)
    plan = composer.check_request("job-de", scenes(file_store, "job-de", GERMAN), options=named)
    assert plan.voice == GERMAN_VOICE
    with pytest.raises(InvalidInput, match=rf"voice 'joe' speaks English.*\({GERMAN_VOICE}\)"):
        composer.check_request(
            "job-de", scenes(file_store, "job-de", GERMAN), options=ComposeOptions(voice="joe")
        )


def test_narration_no_voice_speaks_is_refused_unless_the_users_audio_is_the_soundtrack(
    unvoiced_composer, file_store
):
    with pytest.raises(FailedPrecondition, match=r"Chinese \(zh\).*English \(en\)"):
        unvoiced_composer.check_request("job-zh", scenes(file_store, "job-zh", CHINESE))
    audio = file_store.uri_for("uploads/t/x/audio.wav")
    for mode in ("", "soundtrack"):  # the user's audio alone: nothing is spoken
        plan = unvoiced_composer.check_request(
            "job-zh",
            scenes(file_store, "job-zh", CHINESE),
            audio,
            options=ComposeOptions(audio_mode=mode),
        )
        assert plan.audio_mode == "soundtrack"
    with pytest.raises(FailedPrecondition):  # music plays under the narration: it is spoken
        unvoiced_composer.check_request(
            "job-zh",
            scenes(file_store, "job-zh", CHINESE),
            audio,
            options=ComposeOptions(audio_mode="music"),
        )


async def test_compose_refuses_narration_no_voice_speaks_with_failed_precondition(
    composer_settings, file_store
):
    running = await create_server(composer_settings, ComposerService(composer_settings, file_store))
    before = set(stored_uris(file_store))
    try:
        async with open_channel(f"127.0.0.1:{running.port}") as channel:
            stub = composer_pb2_grpc.ComposerServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.Compose(request(file_store, "job-zh", CHINESE), timeout=60)
    finally:
        await running.stop(0)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = raised.value.details()
    assert "the narration is in Chinese (zh)" in details
    assert "the voices speak English (en)" in details
    assert "soundtrack" in details
    assert set(stored_uris(file_store)) == before


@pytest.mark.model
async def test_german_narration_is_spoken_by_the_german_voice_through_the_stub(
    bilingual_settings, file_store, images
):
    service = ComposerService(bilingual_settings, file_store)
    running = await create_server(bilingual_settings, service)
    try:
        await service.load()
        await running.set_serving(True)
        synthesizer = service.synthesizer
        async with open_channel(f"127.0.0.1:{running.port}") as channel:
            stub = composer_pb2_grpc.ComposerServiceStub(channel)
            for job, narrations, voice in (
                ("job-de", GERMAN, GERMAN_VOICE),
                ("job-en", ENGLISH, "joe"),
            ):
                message = request(file_store, job, narrations, fps=12, width=96, height=64)
                for scene, uri in zip(message.scenes, images, strict=False):
                    data = file_store.get_bytes(uri)
                    file_store.put_bytes(file_store.key_of(scene.image_uri), data, "image/png")
                response = await stub.Compose(message, timeout=120)
                assert response.narration_synthesized == 2
                # The narration cache holds each scene's speech under a key of the voice
                # that spoke it.
                prefix = bilingual_settings.narration_cache_prefix
                for text in narrations:
                    key = synthesizer.narration_key(text, voice=voice)
                    assert file_store.exists(file_store.uri_for(f"{prefix}/{key}.wav")), (job, text)
    finally:
        await running.stop(0)


def test_storyreel_compose_refuses_narration_no_voice_speaks_and_writes_nothing(tmp_path):
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for n in (1, 2):
        Image.new("RGB", (64, 48), (20 * n, 90, 160)).save(pictures / f"scene-{n}.png")
    (tmp_path / "lines.txt").write_text("\n".join(CHINESE) + "\n", encoding="utf-8")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "storyreel.cli",
            "compose",
            "--images",
            "pictures",
            "--narration",
            "lines.txt",
            "-o",
            "out.mp4",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "the narration is in Chinese (zh)" in result.stderr
    assert not (tmp_path / "out.mp4").exists()
