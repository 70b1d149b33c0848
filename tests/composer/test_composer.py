"""VideoComposer on real files: real piper narration, real ffmpeg encoding, a real file store."""

from __future__ import annotations

import asyncio
import bisect
import re
import subprocess
import wave
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
from storyreel_composer.composer import SceneInput, VideoComposer
from storyreel_composer.tts import NarrationSynthesizer
from support import probe_media, stored_uris

from storyreel.errors import InvalidInput, NotFound, NotReady, Overloaded

FPS = 24
FRAME = 1 / FPS


def decode(path: Path, *options: str) -> bytes:
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-i", str(path)]
    return subprocess.run([*cmd, *options, "-"], capture_output=True, check=True).stdout


def dominant_channels(path: Path) -> list[int]:
    """For every frame of the video, its dominant colour channel (0 red, 1 green, 2 blue)."""
    raw = decode(path, "-map", "0:v:0", "-vf", "scale=8:8", "-f", "rawvideo", "-pix_fmt", "rgb24")
    frames = np.frombuffer(raw, np.uint8).reshape(-1, 8 * 8, 3)
    return frames.mean(axis=1).argmax(axis=1).tolist()


def audio_rms(path: Path, start_s: float, end_s: float) -> float:
    """Loudness of the video's sound track between two times (16-bit sample units)."""
    raw = decode(path, "-map", "0:a:0", "-ac", "1", "-ar", "16000", "-f", "s16le")
    samples = np.frombuffer(raw, np.int16).astype(np.float64)
    window = samples[int(start_s * 16000) : int(end_s * 16000)]
    return float(np.sqrt(np.mean(window**2)))


def video_path(store, uri: str) -> Path:
    return store.path_of(uri)


def assert_nothing_left(store, inputs: list[str], work_dir: Path) -> None:
    """No video stored (only the test's inputs) and no temporary files left behind."""
    assert sorted(stored_uris(store)) == sorted(inputs)
    assert not work_dir.exists() or list(work_dir.iterdir()) == []


# --- narrated videos (real piper voice) -------------------------------------------------------

NARRATIONS = [
    "A lighthouse keeper watches the grey sea every night.",
    "",
    "One morning, a whale sings back.",
]


@pytest.mark.model
async def test_narrated_video_is_h264_yuv420p_aac_with_even_size_and_exact_length(
    narrating_composer: VideoComposer, images, file_store, composer_settings
):
    scenes = [SceneInput(uri, text) for uri, text in zip(images, NARRATIONS, strict=True)]
    result = await narrating_composer.compose("job-narrated", scenes, width=256, height=144)

    assert result.video_uri == file_store.uri_for("jobs/job-narrated/video/video.mp4")
    media = probe_media(video_path(file_store, result.video_uri))
    assert (media.video_codec, media.pix_fmt, media.audio_codec) == ("h264", "yuv420p", "aac")
    assert (media.width, media.height, media.fps) == (256, 144, FPS)
    # Every scene is a whole number of frames, so the picture is exactly as long as reported.
    assert media.frames == round(result.duration_s * FPS)
    assert media.duration_s == pytest.approx(result.duration_s, abs=FRAME)
    assert_nothing_left(file_store, [*images, result.video_uri], composer_settings.work_dir)


@pytest.mark.model
async def test_scenes_last_their_narration_plus_padding_and_silent_scenes_the_default(
    narrating_composer: VideoComposer, voice: NarrationSynthesizer, images, tmp_path
):
    scenes = [SceneInput(uri, text) for uri, text in zip(images, NARRATIONS, strict=True)]
    result = await narrating_composer.compose("job-timing", scenes)
    settings = narrating_composer.settings

    starts = result.scene_starts_s
    lengths = [b - a for a, b in zip(starts, [*starts[1:], result.duration_s], strict=True)]
    assert starts[0] == 0.0
    assert lengths[1] == pytest.approx(settings.silent_scene_s)
    # piper varies its pacing a little between runs, so measure this voice on the same text:
    # a narrated scene lasts its narration plus the padding, rounded up to a whole frame.
    for number in (0, 2):
        spoken = voice.synthesize(NARRATIONS[number], tmp_path / f"n{number}.wav")
        assert lengths[number] == pytest.approx(spoken + settings.narration_padding_s, abs=0.35)
        assert lengths[number] * FPS == pytest.approx(round(lengths[number] * FPS), abs=1e-6)


@pytest.mark.model
async def test_picture_changes_exactly_at_each_reported_scene_start(
    narrating_composer: VideoComposer, images, file_store
):
    scenes = [SceneInput(uri, text) for uri, text in zip(images, NARRATIONS, strict=True)]
    result = await narrating_composer.compose("job-cuts", scenes)

    shown = dominant_channels(video_path(file_store, result.video_uri))
    start_frames = [round(start * FPS) for start in result.scene_starts_s]
    expected = [bisect.bisect_right(start_frames, k) - 1 for k in range(len(shown))]
    assert shown == expected


@pytest.mark.model
async def test_narration_is_heard_from_each_scene_start_and_the_padding_is_silent(
    narrating_composer: VideoComposer, images, file_store
):
    scenes = [SceneInput(uri, text) for uri, text in zip(images, NARRATIONS, strict=True)]
    result = await narrating_composer.compose("job-speech", scenes)
    path = video_path(file_store, result.video_uri)
    padding = narrating_composer.settings.narration_padding_s

    ends = [*result.scene_starts_s[1:], result.duration_s]
    for number, (start, end) in enumerate(zip(result.scene_starts_s, ends, strict=True)):
        if NARRATIONS[number]:
            assert audio_rms(path, start, start + (end - start) / 2) > 500, f"scene {number + 1}"
            # The narration ends at least `padding` before the next scene starts.
            assert audio_rms(path, end - padding + 0.05, end - 0.05) < 50, f"scene {number + 1}"
        else:
            assert audio_rms(path, start + 0.05, end - 0.05) < 50, f"silent scene {number + 1}"


@pytest.mark.model
async def test_text_with_nothing_to_say_makes_a_silent_scene(
    narrating_composer: VideoComposer, images
):
    result = await narrating_composer.compose(
        "job-punctuation", [SceneInput(images[0], "..."), SceneInput(images[1], "Hello.")]
    )
    assert result.scene_starts_s[1] == pytest.approx(narrating_composer.settings.silent_scene_s)


# --- user audio -------------------------------------------------------------------------------


async def test_video_with_user_audio_lasts_as_long_as_the_audio_within_one_frame(
    unvoiced_composer: VideoComposer, images, file_store, make_audio, composer_settings
):
    audio = make_audio("tone.wav", "sine=frequency=440", 2.37)
    audio_uri = file_store.put_file("jobs/inputs/audio/tone.wav", audio)
    # Scene 2's narration is three times scene 1's; scene 3 has none and gets the mean.
    scenes = [
        SceneInput(images[0], "a" * 10),
        SceneInput(images[1], "b" * 30),
        SceneInput(images[2], ""),
    ]
    result = await unvoiced_composer.compose("job-tone", scenes, audio_uri)

    media = probe_media(video_path(file_store, result.video_uri))
    assert media.duration_s == pytest.approx(2.37, abs=FRAME)
    assert result.duration_s == pytest.approx(2.37, abs=FRAME / 2)
    assert media.frames == round(2.37 * FPS)
    shares = np.diff([*result.scene_starts_s, result.duration_s]) / result.duration_s
    assert shares == pytest.approx([10 / 60, 30 / 60, 20 / 60], abs=2 * FRAME / 2.37)
    # The tone plays to the end of the video.
    assert audio_rms(video_path(file_store, result.video_uri), 2.0, 2.3) > 1000
    assert_nothing_left(
        file_store, [*images, audio_uri, result.video_uri], composer_settings.work_dir
    )


async def test_silent_mp3_is_valid_audio_and_scenes_share_it_evenly(
    unvoiced_composer: VideoComposer, images, file_store, make_audio
):
    audio = make_audio("silence.mp3", "anullsrc=r=44100:cl=stereo", 1.5, "-c:a", "libmp3lame")
    audio_uri = file_store.put_file("jobs/inputs/audio/silence.mp3", audio)
    result = await unvoiced_composer.compose(
        "job-silence", [SceneInput(images[0]), SceneInput(images[1])], audio_uri
    )
    assert result.scene_starts_s == [0.0, 0.75]
    media = probe_media(video_path(file_store, result.video_uri))
    assert media.duration_s == pytest.approx(1.5, abs=FRAME)
    assert media.audio_codec == "aac"


# --- rejected requests: InvalidInput before any work, nothing stored -----------------------------


def _text_file(tmp_path: Path, make_audio) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text("these are my notes, not audio\n" * 20)
    return path


def _garbage_mp3(tmp_path: Path, make_audio) -> Path:
    path = tmp_path / "garbage.mp3"
    path.write_bytes(np.random.default_rng(7).integers(0, 256, 20_000, np.uint8).tobytes())
    return path


def _cut_mp3(tmp_path: Path, make_audio) -> Path:
    full = make_audio("full.mp3", "sine", 3.0, "-c:a", "libmp3lame")
    path = tmp_path / "cut.mp3"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    return path


def _empty_wav(tmp_path: Path, make_audio) -> Path:
    path = tmp_path / "empty.wav"
    path.touch()
    return path


def _no_samples_wav(tmp_path: Path, make_audio) -> Path:
    path = tmp_path / "nothing.wav"
    with wave.open(str(path), "wb") as wav:  # a valid header and no samples
        wav.setframerate(16000)
        wav.setsampwidth(2)
        wav.setnchannels(1)
    return path


def _video_without_sound(tmp_path: Path, make_audio) -> Path:
    return make_audio("mute.mp4", "testsrc=size=64x64:rate=10", 1.0, "-c:v", "libx264")


def _too_long(tmp_path: Path, make_audio) -> Path:
    return make_audio("long.wav", "sine", 3.0)


@pytest.mark.parametrize(
    ("make_bad_audio", "problem"),
    [
        # ffmpeg reads a long text file as a "tty" video; either way it is not audio.
        (_text_file, "not usable audio: (it is not a media file|it has no audio stream)"),
        (_garbage_mp3, "not usable audio: it is not a media file"),
        (_cut_mp3, "not usable audio: (its data is corrupt|it is truncated)"),
        (_empty_wav, "not usable audio: the file is empty"),
        (_no_samples_wav, "not usable audio: it holds no samples"),
        (_video_without_sound, "not usable audio: it has no audio stream"),
        (_too_long, "lasts 3.0 s; the limit is 2 s"),
    ],
    ids=["text", "garbage", "truncated", "empty", "no-samples", "no-audio-stream", "too-long"],
)
async def test_bad_user_audio_is_invalid_input_naming_the_problem_and_nothing_is_stored(
    make_bad_audio, problem, file_store, images, tmp_path, make_audio, composer_settings
):
    settings = composer_settings.model_copy(update={"max_audio_s": 2.0})
    composer = VideoComposer(
        file_store,
        NarrationSynthesizer(settings.voice_model_path, settings.voice_config_path),
        settings,
    )
    bad = make_bad_audio(tmp_path, make_audio)
    audio_uri = file_store.put_file(f"jobs/inputs/audio/{bad.name}", bad)

    with pytest.raises(InvalidInput, match=rf"audio_uri {re.escape(audio_uri)} .*{problem}"):
        await composer.compose("job-bad-audio", [SceneInput(images[0], "Hi.")], audio_uri)
    assert_nothing_left(file_store, [*images, audio_uri], settings.work_dir)


def _request(images: list[str], **change) -> dict:
    """compose() arguments: a valid two-scene request with ``change`` applied."""
    request = {
        "job_id": "job-malformed",
        "scenes": [SceneInput(images[0], "Hello."), SceneInput(images[1], "Bye.")],
        "audio_uri": None,
    }
    return request | change


MALFORMED = {
    "missing-image-uri": (
        lambda im: _request(im, scenes=[SceneInput(im[0]), SceneInput(""), SceneInput(im[1])]),
        "scene 2 has no image_uri",
    ),
    "no-scenes": (lambda im: _request(im, scenes=[]), "scenes must hold 1 to 24 scenes, got 0"),
    "too-many-scenes": (
        lambda im: _request(im, scenes=[SceneInput(im[0])] * 25),
        "scenes must hold 1 to 24 scenes, got 25",
    ),
    "image-outside-store": (
        lambda im: _request(im, scenes=[SceneInput("file:///etc/hosts")]),
        "scene 1 image_uri: URI 'file:///etc/hosts' is not in the artifact store",
    ),
    "odd-width": (
        lambda im: _request(im, width=255),
        "width must be an even number between 64 and 3840, got 255",
    ),
    "small-height": (
        lambda im: _request(im, height=62),
        "height must be an even number between 64 and 3840, got 62",
    ),
    "large-width": (
        lambda im: _request(im, width=3842),
        "width must be an even number between 64 and 3840, got 3842",
    ),
    "fast-fps": (lambda im: _request(im, fps=61), "fps must be between 1 and 60, got 61"),
    "negative-fps": (lambda im: _request(im, fps=-1), "fps must be between 1 and 60, got -1"),
    "bad-job-id": (lambda im: _request(im, job_id="../escape"), "job_id must be"),
    "long-narration": (
        lambda im: _request(im, scenes=[SceneInput(im[0], "x" * 2001)]),
        "scene 1 narration is 2001 characters; the limit is 2000",
    ),
    "audio-outside-store": (
        lambda im: _request(im, audio_uri="s3://elsewhere/a.wav"),
        "audio_uri: URI 's3://elsewhere/a.wav' is not in the artifact store",
    ),
}


@pytest.mark.parametrize(("build", "problem"), MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_request_is_invalid_input_naming_the_field_and_nothing_is_stored(
    build, problem, unvoiced_composer: VideoComposer, images, file_store, composer_settings
):
    request = build(images)
    with pytest.raises(InvalidInput, match=re.escape(problem)):
        await unvoiced_composer.compose(
            request.pop("job_id"), request.pop("scenes"), request.pop("audio_uri"), **request
        )
    assert_nothing_left(file_store, images, composer_settings.work_dir)


async def test_image_uri_that_does_not_exist_is_not_found_and_nothing_is_stored(
    unvoiced_composer: VideoComposer, images, file_store, make_audio, composer_settings
):
    audio_uri = file_store.put_file("jobs/inputs/a.wav", make_audio("a.wav", "sine", 1.0))
    missing = file_store.uri_for("jobs/inputs/images/missing.png")
    with pytest.raises(NotFound, match=rf"scene 2 image_uri {re.escape(missing)} does not exist"):
        await unvoiced_composer.compose(
            "job-missing", [SceneInput(images[0]), SceneInput(missing)], audio_uri
        )
    assert_nothing_left(file_store, [*images, audio_uri], composer_settings.work_dir)


async def test_stored_file_that_is_not_an_image_is_invalid_input_naming_the_scene(
    unvoiced_composer: VideoComposer, images, file_store, make_audio, composer_settings
):
    audio_uri = file_store.put_file("jobs/inputs/a.wav", make_audio("a.wav", "sine", 1.0))
    fake = file_store.put_bytes("jobs/inputs/images/fake.png", b"<html>not a png</html>")
    with pytest.raises(
        InvalidInput, match=rf"scene 2 image {re.escape(fake)} is not a readable image"
    ):
        await unvoiced_composer.compose(
            "job-fake", [SceneInput(images[0]), SceneInput(fake)], audio_uri
        )
    assert_nothing_left(file_store, [*images, audio_uri, fake], composer_settings.work_dir)


async def test_narration_before_the_voice_is_loaded_is_not_ready(
    unvoiced_composer: VideoComposer, images, file_store, composer_settings
):
    with pytest.raises(NotReady):
        await unvoiced_composer.compose("job-early", [SceneInput(images[0], "Hello there.")])
    assert_nothing_left(file_store, images, composer_settings.work_dir)


async def test_request_beyond_the_waiting_limit_is_overloaded_while_one_composes(
    file_store, images, make_audio, composer_settings
):
    settings = composer_settings.model_copy(
        update={"max_concurrent_compositions": 1, "max_waiting_compositions": 0}
    )
    composer = VideoComposer(
        file_store,
        NarrationSynthesizer(settings.voice_model_path, settings.voice_config_path),
        settings,
    )
    audio_uri = file_store.put_file("jobs/inputs/a.wav", make_audio("a.wav", "sine", 1.0))
    first = asyncio.create_task(composer.compose("job-first", [SceneInput(images[0])], audio_uri))
    await asyncio.sleep(0)  # the first request takes the only slot and starts working
    with pytest.raises(Overloaded, match="busy"):
        await composer.compose("job-second", [SceneInput(images[1])], audio_uri)
    result = await first
    # Once the slot is free again, the next request is served.
    again = await composer.compose("job-second", [SceneInput(images[1])], audio_uri)
    assert sorted(stored_uris(file_store)) == sorted(
        [*images, audio_uri, result.video_uri, again.video_uri]
    )
