"""ProbeAudio and ListVoices: the facts the gateway's admission asks the composer for.

ProbeAudio reads an upload with the very check Compose applies to ``audio_uri``
(test_composer.py's bad-audio cases compare the two messages); here: what it
answers for good audio in every supported format, what it may read, its own
limits, and the voice list. Both RPCs are also driven through a real gRPC server
whose voice is not loaded: neither needs it.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from pathlib import Path

import grpc
import pytest
from storyreel_composer.composer import VideoComposer
from storyreel_composer.probe import UnsupportedContainer, probe
from storyreel_composer.service import ComposerService
from storyreel_composer.settings import ComposerSettings
from storyreel_composer.tts import NarrationSynthesizer, VoiceInfo
from storyreel_composer.user_audio import AudioFacts
from support import probe_media

from storyreel.channels import open_channel
from storyreel.composer.v1 import composer_pb2, composer_pb2_grpc
from storyreel.errors import InvalidInput, NotFound, Overloaded
from storyreel.limits import AUDIO_FORMATS, AUDIO_FORMATS_TEXT
from storyreel.serving import create_server

#: Every format the gateway accepts: ffmpeg output options, codec and container read back.
FORMATS = {
    "wav": ((), "pcm_s16le", "wav"),
    "mp3": (("-c:a", "libmp3lame"), "mp3", "mp3"),
    "ogg": (("-c:a", "libvorbis"), "vorbis", "ogg"),
    "flac": ((), "flac", "flac"),
    "m4a": (("-c:a", "aac"), "aac", "mov,mp4,m4a,3gp,3g2,mj2"),
    "aac": (("-c:a", "aac", "-f", "adts"), "aac", "aac"),
    "webm": (("-c:a", "libvorbis"), "vorbis", "matroska,webm"),
}


def test_every_soundtrack_format_is_tested_here():
    assert set(FORMATS) == set(AUDIO_FORMATS)


@pytest.mark.parametrize("extension", sorted(FORMATS))
async def test_good_audio_in_every_format_is_described_as_the_decoder_sees_it(
    extension, unvoiced_composer, file_store, make_audio
):
    options, codec, container = FORMATS[extension]
    path = make_audio(f"tone.{extension}", "sine=sample_rate=44100", 1.5, *options)
    uri = file_store.put_file(f"uploads/tenant/x/audio.{extension}", path)

    facts = await unvoiced_composer.probe_audio(uri)

    assert (facts.codec, facts.format, facts.sample_rate, facts.channels) == (
        codec,
        container,
        44100,
        1,
    )
    # The exact, decoded length, as read independently of the composer's probe.
    assert math.isclose(facts.duration_s, probe_media(path).duration_s, abs_tol=0.03)


async def test_only_uploads_are_read_and_a_missing_one_is_not_found(
    unvoiced_composer, file_store, make_audio
):
    path = make_audio("a.wav", "sine", 0.5)
    outside = file_store.put_file("jobs/someone/video/audio.wav", path)
    with pytest.raises(InvalidInput, match="is not an upload: only uploads/ is read"):
        await unvoiced_composer.probe_audio(outside)
    with pytest.raises(InvalidInput, match="is not in the artifact store"):
        await unvoiced_composer.probe_audio("file:///etc/passwd")
    with pytest.raises(InvalidInput, match="invalid object key"):
        await unvoiced_composer.probe_audio(file_store.root_uri + "uploads/../jobs/x/a.wav")
    # Outside uploads/ the answer is the same whether the object exists or not.
    with pytest.raises(InvalidInput, match="is not an upload"):
        await unvoiced_composer.probe_audio(file_store.root_uri + "jobs/nothing/a.wav")
    missing = file_store.root_uri + "uploads/tenant/none/audio.wav"
    with pytest.raises(NotFound, match=f"audio_uri {missing} does not exist"):
        await unvoiced_composer.probe_audio(missing)
    with pytest.raises(InvalidInput) as caught:
        await unvoiced_composer.probe_audio(file_store.root_uri + "x" * 100_000)
    assert len(caught.value.message) < 1000  # a huge URI is not echoed whole


async def test_probes_have_their_own_bounded_slots(
    file_store, composer_settings, make_audio, monkeypatch
):
    settings = composer_settings.model_copy(
        update={"max_concurrent_probes": 1, "max_waiting_probes": 0}
    )
    composer = VideoComposer(file_store, NarrationSynthesizer.from_settings(settings), settings)
    uri = file_store.put_file("uploads/t/x/audio.wav", make_audio("a.wav", "sine", 0.5))

    def slow(uri: str) -> AudioFacts:
        time.sleep(0.5)
        return AudioFacts(0.5, "pcm_s16le", 44100, 1, "wav")

    monkeypatch.setattr(composer, "_probe_blocking", slow)
    first = asyncio.ensure_future(composer.probe_audio(uri))
    await asyncio.sleep(0.1)
    with pytest.raises(Overloaded, match="audio probes are already waiting"):
        await composer.probe_audio(uri)
    assert (await first).duration_s == 0.5
    assert (await composer.probe_audio(uri)).codec == "pcm_s16le"  # the slot is free again


def test_a_playlist_is_never_opened_when_formats_are_given(tmp_path, make_audio):
    make_audio("part.wav", "sine", 1.0)
    playlist = tmp_path / "list.mp3"
    playlist.write_text("ffconcat version 1.0\nfile audio-sources/part.wav\n")
    # Unrestricted, ffmpeg follows the list and finds the audio it names...
    assert probe(playlist, decode=False).container == "concat"
    # ...held to the audio containers, it refuses it.
    with pytest.raises(UnsupportedContainer):
        probe(playlist, decode=False, formats=("wav", "mp3"))


# -- voices ---------------------------------------------------------------------------------


def test_the_voice_catalog_names_every_voice_with_its_language_and_rate(tmp_path: Path):
    settings = ComposerSettings()
    other = tmp_path / "amy.onnx"
    other.write_bytes(b"not loaded here")
    other.with_name("amy.onnx.json").write_text(
        json.dumps({"audio": {"sample_rate": 16000}, "language": {"code": "en_GB"}})
    )
    plain = tmp_path / "bare.onnx"  # no config: nothing known but its name
    synthesizer = NarrationSynthesizer(
        settings.voice_model_path,
        settings.voice_config_path,
        more_voices={"amy": other, "bare": plain},
    )
    catalog = synthesizer.catalog()
    assert catalog.voices == (
        VoiceInfo("amy", "en_GB", 16000),
        VoiceInfo("bare", "", 0),
        VoiceInfo("joe", "en_US", 22050),
    )
    assert catalog.default_voice == "joe"
    assert not synthesizer.loaded  # nothing was loaded to answer
    for name in ("JOE", "..", "no-such-voice"):
        with pytest.raises(InvalidInput, match="is not one of amy, bare, joe"):
            synthesizer.check_voice(name)


async def test_list_voices_and_probe_audio_through_a_server_whose_voice_is_not_loaded(
    composer_settings, file_store, make_audio
):
    running = await create_server(composer_settings, ComposerService(composer_settings, file_store))
    try:
        async with open_channel(f"127.0.0.1:{running.port}") as channel:
            stub = composer_pb2_grpc.ComposerServiceStub(channel)
            voices = await stub.ListVoices(composer_pb2.ListVoicesRequest())
            assert [(v.name, v.language, v.sample_rate) for v in voices.voices] == [
                ("joe", "en_US", 22050)
            ]
            assert voices.default_voice == "joe"

            uri = file_store.put_file(
                "uploads/t/x/audio.mp3",
                make_audio("a.mp3", "sine=sample_rate=22050", 1.0, "-c:a", "libmp3lame"),
            )
            facts = await stub.ProbeAudio(composer_pb2.ProbeAudioRequest(uri=uri))
            assert (facts.codec, facts.format, facts.sample_rate, facts.channels) == (
                "mp3",
                "mp3",
                22050,
                1,
            )
            assert math.isclose(facts.duration_s, 1.0, abs_tol=0.06)

            truncated = file_store.put_bytes(
                "uploads/t/y/audio.mp3", file_store.get_bytes(uri)[:3000]
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ProbeAudio(composer_pb2.ProbeAudioRequest(uri=truncated))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert caught.value.details().startswith(f"audio_uri {truncated} is not usable audio")

            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ProbeAudio(
                    composer_pb2.ProbeAudioRequest(uri=uri.replace("/uploads/", "/jobs/"))
                )
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await running.stop(0)


# -- damaged audio, and one list of formats (issue 17, item 5) ------------------------------


@pytest.mark.parametrize(
    "options",
    [("-c:a", "libmp3lame"), ("-c:a", "libmp3lame", "-write_xing", "0")],
    ids=["with-xing-header", "without"],
)
async def test_the_first_thousand_bytes_of_an_mp3_are_refused_as_truncated(
    unvoiced_composer, file_store, make_audio, options
):
    """Without a Xing header nothing says how long the file should be: ffmpeg finds only a
    few frames, recognises the file as MP3 by a guess ("misdetection possible"), and that
    is refused, never played as a 0.1 s soundtrack."""
    full = make_audio("song.mp3", "sine", 5.0, *options)
    uri = file_store.put_bytes("uploads/t/x/audio.mp3", full.read_bytes()[:1000])
    with pytest.raises(InvalidInput, match=r"is not usable audio: it is truncated") as caught:
        await unvoiced_composer.probe_audio(uri)
    assert caught.value.message.startswith(f"audio_uri {uri} ")


ROOT = Path(__file__).resolve().parents[2]
#: Every text that lists the soundtrack formats for people.
FORMAT_LISTS = [
    "protos/storyreel/gateway/v1/gateway.proto",
    "protos/storyreel/composer/v1/composer.proto",
    "gateway/README.md",
    "services/composer/README.md",
]


def _prose(path: Path) -> str:
    """The text with comment markers dropped and every run of whitespace one space."""
    text = path.read_text(encoding="utf-8")
    return " ".join(" ".join(re.sub(r"^\s*//", "", line) for line in text.splitlines()).split())


def test_every_list_of_the_formats_is_the_one_definition():
    """Help texts, messages, READMEs and contract comments list storyreel.limits' formats."""
    from storyreel import cli

    assert ", ".join(AUDIO_FORMATS[:-1]) + " or " + AUDIO_FORMATS[-1] == AUDIO_FORMATS_TEXT
    texts = {name: _prose(ROOT / name) for name in FORMAT_LISTS}
    texts["storyreel --help"] = " ".join(
        action.help or ""
        for parser in cli.build_parser()._subparsers._group_actions[0].choices.values()
        for action in parser._actions
    )
    for name, text in texts.items():
        starts = [match.start() for match in re.finditer(r"\bwav, mp3\b", text)]
        assert starts, f"{name} lists no formats"
        for start in starts:
            assert text.startswith(AUDIO_FORMATS_TEXT, start), (name, text[start : start + 80])
