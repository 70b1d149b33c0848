"""VideoComposer on real files: real piper narration, real ffmpeg rendering, a real file store."""

from __future__ import annotations

import asyncio
import bisect
import itertools
import json
import re
import subprocess
import wave
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image
from storyreel_composer.composer import Scene, VideoComposer
from storyreel_composer.stills import thumbnail
from storyreel_composer.tts import NarrationSynthesizer
from support import ffmpeg_decode, probe_media, stored_uris, tone_level

from storyreel.compose_options import ComposeOptions
from storyreel.errors import InvalidInput, NotFound, NotReady, Overloaded

FPS = 24
FRAME = 1 / FPS
CUT = ComposeOptions(transition="cut")


def video_frames(path: Path) -> np.ndarray:
    """Every frame of the video as RGB, shape (frames, height, width, 3)."""
    media = probe_media(path)
    raw = ffmpeg_decode(path, "-map", "0:v:0", "-f", "rawvideo", "-pix_fmt", "rgb24")
    return np.frombuffer(raw, np.uint8).reshape(-1, media.height, media.width, 3)


def dominant_channels(path: Path) -> list[int]:
    """For every frame of the video, its dominant colour channel (0 red, 1 green, 2 blue)."""
    raw = ffmpeg_decode(
        path, "-map", "0:v:0", "-vf", "scale=8:8", "-f", "rawvideo", "-pix_fmt", "rgb24"
    )
    frames = np.frombuffer(raw, np.uint8).reshape(-1, 8 * 8, 3)
    return frames.mean(axis=1).argmax(axis=1).tolist()


def audio_samples(path: Path, rate: int = 16000) -> np.ndarray:
    raw = ffmpeg_decode(path, "-map", "0:a:0", "-ac", "1", "-ar", str(rate), "-f", "s16le")
    return np.frombuffer(raw, np.int16).astype(np.float64)


def audio_rms(path: Path, start_s: float, end_s: float) -> float:
    """Loudness of the video's sound track between two times (16-bit sample units)."""
    window = audio_samples(path)[int(start_s * 16000) : int(end_s * 16000)]
    return float(np.sqrt(np.mean(window**2)))


def integrated_loudness(path: Path) -> float:
    """EBU R128 integrated loudness of the file's sound (ffmpeg's loudnorm measurement)."""
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-i", str(path), "-map", "0:a:0"]
    cmd += ["-af", "loudnorm=print_format=json", "-f", "null", "-"]
    err = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    return float(json.loads(err[err.rfind("{") : err.rfind("}") + 1])["input_i"])


def video_path(store, uri: str) -> Path:
    return store.path_of(uri)


def outputs(result) -> list[str]:
    """Every artifact a composition stored."""
    uris = [result.video_uri, result.poster_uri, result.contact_sheet_uri]
    return uris + [uri for uri in (result.captions_srt_uri, result.captions_vtt_uri) if uri]


def assert_nothing_left(store, inputs: list[str], work_dir: Path) -> None:
    """Only the listed artifacts are stored and no temporary files are left behind."""
    assert sorted(stored_uris(store)) == sorted(inputs)
    assert not work_dir.exists() or list(work_dir.iterdir()) == []


_SRT_TIME = r"(\d\d):(\d\d):(\d\d),(\d\d\d)"
_VTT_TIME = r"(\d\d):(\d\d):(\d\d)\.(\d\d\d)"


def _seconds(groups) -> float:
    hours, minutes, seconds, ms = (int(g) for g in groups)
    return hours * 3600 + minutes * 60 + seconds + ms / 1000


def parse_srt(text: str) -> list[tuple[float, float, str]]:
    """Cues of a SubRip file; fails unless every block is number, times, text."""
    cues = []
    for number, block in enumerate(text.strip().split("\n\n"), start=1):
        lines = block.split("\n")
        assert lines[0] == str(number), block
        match = re.fullmatch(f"{_SRT_TIME} --> {_SRT_TIME}", lines[1])
        assert match, lines[1]
        assert len(lines) >= 3 and all(line.strip() for line in lines[2:]), block
        cues.append(
            (_seconds(match.groups()[:4]), _seconds(match.groups()[4:]), " ".join(lines[2:]))
        )
    return cues


def parse_vtt(text: str) -> list[tuple[float, float, str]]:
    """Cues of a WebVTT file; fails unless it starts with WEBVTT and every cue is times, text."""
    blocks = text.strip().split("\n\n")
    assert blocks[0] == "WEBVTT"
    cues = []
    for block in blocks[1:]:
        lines = block.split("\n")
        match = re.fullmatch(f"{_VTT_TIME} --> {_VTT_TIME}", lines[0])
        assert match, lines[0]
        assert len(lines) >= 2 and "-->" not in " ".join(lines[1:]), block
        cues.append(
            (_seconds(match.groups()[:4]), _seconds(match.groups()[4:]), " ".join(lines[1:]))
        )
    return cues


def pattern_images(store, count: int = 2) -> list[str]:
    """Stored grey-and-colour block pictures, so that any movement shows in the frames."""
    rng = np.random.default_rng(3)
    uris = []
    for n in range(count):
        blocks = rng.integers(0, 256, (18, 32, 3), np.uint8)
        image = Image.fromarray(np.kron(blocks, np.ones((10, 10, 1), np.uint8)))
        path = store.root / f"pattern-{n}.png"
        image.save(path)
        uris.append(store.put_file(f"jobs/inputs/images/pattern-{n}.png", path))
        path.unlink()
    return uris


# --- narrated videos (real piper voice) -------------------------------------------------------

NARRATIONS = [
    "A lighthouse keeper watches the grey sea every night.",
    "",
    "One morning, a whale sings back. It sings all day!",
]


@pytest.mark.model
async def test_narrated_video_is_h264_yuv420p_aac_with_even_size_and_exact_length(
    narrating_composer: VideoComposer, images, file_store, composer_settings
):
    scenes = [Scene(uri, text) for uri, text in zip(images, NARRATIONS, strict=True)]
    result = await narrating_composer.compose("job-narrated", scenes, width=256, height=144)

    assert result.video_uri == file_store.uri_for("jobs/job-narrated/video/video.mp4")
    media = probe_media(video_path(file_store, result.video_uri))
    assert (media.video_codec, media.pix_fmt, media.audio_codec) == ("h264", "yuv420p", "aac")
    assert (media.width, media.height, media.fps) == (256, 144, FPS)
    assert (result.width, result.height, result.fps) == (256, 144, FPS)
    # Every scene is a whole number of frames, so the picture is exactly as long as reported.
    assert media.frames == round(result.duration_s * FPS)
    assert media.duration_s == pytest.approx(result.duration_s, abs=FRAME)
    prefix = "jobs/job-narrated/video/"
    assert result.captions_srt_uri == file_store.uri_for(prefix + "captions.srt")
    assert result.captions_vtt_uri == file_store.uri_for(prefix + "captions.vtt")
    assert result.poster_uri == file_store.uri_for(prefix + "poster.png")
    assert result.contact_sheet_uri == file_store.uri_for(prefix + "contact-sheet.png")
    assert (result.narration_synthesized, result.narration_cached) == (2, 0)
    # Besides the job's artifacts, the narration cache holds each narrated scene's speech.
    cached = [u for u in stored_uris(file_store) if "/cache/narration/" in u]
    assert len(cached) == 2
    assert_nothing_left(
        file_store, [*images, *outputs(result), *cached], composer_settings.work_dir
    )


@pytest.mark.model
async def test_scenes_last_their_narration_plus_padding_and_silent_scenes_the_default(
    narrating_composer: VideoComposer, voice: NarrationSynthesizer, images, tmp_path
):
    scenes = [Scene(uri, text) for uri, text in zip(images, NARRATIONS, strict=True)]
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
async def test_with_cuts_the_picture_changes_exactly_at_each_reported_scene_start(
    narrating_composer: VideoComposer, images, file_store
):
    scenes = [Scene(uri, text) for uri, text in zip(images, NARRATIONS, strict=True)]
    result = await narrating_composer.compose("job-cuts", scenes, options=CUT)

    shown = dominant_channels(video_path(file_store, result.video_uri))
    start_frames = [round(start * FPS) for start in result.scene_starts_s]
    expected = [bisect.bisect_right(start_frames, k) - 1 for k in range(len(shown))]
    assert shown == expected


@pytest.mark.model
async def test_crossfades_are_centred_on_the_scene_starts_that_follow_the_narration(
    narrating_composer: VideoComposer, images, file_store
):
    scenes = [Scene(uri, text) for uri, text in zip(images, NARRATIONS, strict=True)]
    options = ComposeOptions(transition="crossfade", crossfade_s=0.5)
    result = await narrating_composer.compose("job-fades", scenes, options=options)

    frames = video_frames(video_path(file_store, result.video_uri)).mean(axis=(1, 2))
    shown = frames.argmax(axis=1)
    start_frames = [round(start * FPS) for start in result.scene_starts_s]
    half = round(0.5 * FPS) // 2
    for k in range(len(shown)):
        scene = bisect.bisect_right(start_frames, k) - 1
        if all(abs(k - start) > half for start in start_frames[1:]):
            assert shown[k] == scene, k  # outside the fades: the scene's own picture
    for scene, start in enumerate(start_frames[1:], start=1):
        # On the boundary itself the two pictures are mixed half and half.
        incoming, outgoing = frames[start][scene], frames[start][scene - 1]
        assert incoming == pytest.approx(outgoing, abs=25), (scene, frames[start])


@pytest.mark.model
async def test_narration_is_heard_from_each_scene_start_and_the_padding_is_silent(
    narrating_composer: VideoComposer, images, file_store
):
    scenes = [Scene(uri, text) for uri, text in zip(images, NARRATIONS, strict=True)]
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
async def test_srt_and_vtt_captions_are_valid_and_in_step_with_the_narration(
    narrating_composer: VideoComposer, images, file_store
):
    scenes = [Scene(uri, text) for uri, text in zip(images, NARRATIONS, strict=True)]
    result = await narrating_composer.compose("job-captions", scenes)
    path = video_path(file_store, result.video_uri)
    srt = parse_srt(file_store.get_bytes(result.captions_srt_uri).decode())
    vtt = parse_vtt(file_store.get_bytes(result.captions_vtt_uri).decode())
    assert srt == vtt
    padding = narrating_composer.settings.narration_padding_s

    ends = [*result.scene_starts_s[1:], result.duration_s]
    for number, (start, end) in enumerate(zip(result.scene_starts_s, ends, strict=True)):
        # (Cue times are rounded to the millisecond: place cues by their middle.)
        cues = [cue for cue in srt if start <= (cue[0] + cue[1]) / 2 < end]
        # Every word of the narration is captioned, in order, within its own scene.
        assert " ".join(text for _, _, text in cues).split() == NARRATIONS[number].split()
        if not cues:
            continue
        assert cues[0][0] == pytest.approx(start, abs=0.002)  # from the first word...
        assert cues[-1][1] == pytest.approx(end - padding, abs=FRAME + 0.002)  # ...to the last
        for cue_start, cue_end, _ in cues:
            assert start - 0.001 <= cue_start < cue_end <= end
            # While a caption shows, the narrator is speaking.
            assert audio_rms(path, cue_start, cue_end) > 500, (number, cue_start, cue_end)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(srt))  # no overlaps


@pytest.mark.model
async def test_text_with_nothing_to_say_makes_a_silent_scene(
    narrating_composer: VideoComposer, images
):
    result = await narrating_composer.compose(
        "job-punctuation", [Scene(images[0], "..."), Scene(images[1], "Hello.")]
    )
    assert result.scene_starts_s[1] == pytest.approx(narrating_composer.settings.silent_scene_s)


@pytest.mark.model
async def test_a_faster_speaking_rate_makes_shorter_scenes(
    narrating_composer: VideoComposer, images
):
    scenes = [Scene(images[0], NARRATIONS[0]), Scene(images[1], "The end.")]
    normal = await narrating_composer.compose("job-rate-1", scenes)
    fast = await narrating_composer.compose(
        "job-rate-2", scenes, options=ComposeOptions(speaking_rate=1.6, voice="joe")
    )
    padding = narrating_composer.settings.narration_padding_s
    spoken_normal = normal.scene_starts_s[1] - padding
    spoken_fast = fast.scene_starts_s[1] - padding
    assert spoken_fast < spoken_normal * 0.8


@pytest.mark.model
async def test_music_under_narration_is_ducked_while_the_narrator_speaks_and_fades_out(
    narrating_composer: VideoComposer, images, file_store, make_audio
):
    # A 4 kHz tone, 2 s long: shorter than the video, so it must loop.
    music = make_audio("tone.ogg", "sine=frequency=4000:sample_rate=44100", 2.0)
    music_uri = file_store.put_file("jobs/inputs/audio/tone.ogg", music)
    scenes = [Scene(uri, text) for uri, text in zip(images, NARRATIONS, strict=True)]
    options = ComposeOptions(audio_mode="music")
    result = await narrating_composer.compose("job-music", scenes, music_uri, options=options)
    settings = narrating_composer.settings

    # The narration sets the length, as without music.
    starts = result.scene_starts_s
    assert result.duration_s > 2.0 + settings.silent_scene_s
    samples = audio_samples(video_path(file_store, result.video_uri), 16000)
    level = lambda a, b: tone_level(samples, 16000, 4000, a, b)  # noqa: E731
    speaking = level(starts[0] + 0.3, starts[0] + 1.8)
    pause = level(starts[1] + 0.6, starts[2] - 0.6)  # the silent scene
    # Ducked by music_duck_db (-12 dB, a factor of 4) while the narrator speaks.
    assert speaking < pause / 2.5
    assert pause > 0
    # Faded out at the end: the last fifth of a second is far quieter than before the fade.
    fade = settings.music_fade_out_s
    end = result.duration_s
    assert level(end - 0.2, end) < level(end - fade - 0.7, end - fade - 0.2) / 4


# --- user audio -------------------------------------------------------------------------------


AUDIO_FORMATS = {
    "wav": (),
    "mp3": ("-c:a", "libmp3lame"),
    "ogg": ("-c:a", "libvorbis"),
    "flac": ("-c:a", "flac"),
    "m4a": ("-c:a", "aac"),
    "aac": ("-c:a", "aac"),
}


@pytest.mark.parametrize("extension", AUDIO_FORMATS)
async def test_video_with_user_audio_lasts_as_long_as_the_audio_within_one_frame(
    extension, unvoiced_composer: VideoComposer, images, file_store, make_audio, composer_settings
):
    audio = make_audio(f"tone.{extension}", "sine=frequency=440", 2.37, *AUDIO_FORMATS[extension])
    audio_uri = file_store.put_file(f"jobs/inputs/audio/tone.{extension}", audio)
    # What decodes is the audio's length (raw AAC adds its encoder's priming samples).
    audio_s = probe_media(audio).duration_s
    # Scene 2's narration is three times scene 1's; scene 3 has none and gets the mean.
    scenes = [
        Scene(images[0], "a" * 10),
        Scene(images[1], "b" * 30),
        Scene(images[2], ""),
    ]
    result = await unvoiced_composer.compose(f"job-{extension}", scenes, audio_uri)

    path = video_path(file_store, result.video_uri)
    media = probe_media(path)
    assert media.duration_s == pytest.approx(audio_s, abs=FRAME)
    assert result.duration_s == pytest.approx(audio_s, abs=FRAME / 2)
    assert media.frames == round(audio_s * FPS)
    assert (media.video_codec, media.pix_fmt, media.audio_codec) == ("h264", "yuv420p", "aac")
    shares = np.diff([*result.scene_starts_s, result.duration_s]) / result.duration_s
    assert shares == pytest.approx([10 / 60, 30 / 60, 20 / 60], abs=2 * FRAME / 2.37)
    # The tone plays to the end of the video.
    assert audio_rms(path, audio_s - 0.4, audio_s - 0.1) > 1000
    assert_nothing_left(
        file_store, [*images, audio_uri, *outputs(result)], composer_settings.work_dir
    )


async def test_silent_mp3_is_valid_audio_and_scenes_share_it_evenly(
    unvoiced_composer: VideoComposer, images, file_store, make_audio
):
    audio = make_audio("silence.mp3", "anullsrc=r=44100:cl=stereo", 1.5, "-c:a", "libmp3lame")
    audio_uri = file_store.put_file("jobs/inputs/audio/silence.mp3", audio)
    result = await unvoiced_composer.compose(
        "job-silence", [Scene(images[0]), Scene(images[1])], audio_uri
    )
    assert result.scene_starts_s == [0.0, 0.75]
    path = video_path(file_store, result.video_uri)
    media = probe_media(path)
    assert media.duration_s == pytest.approx(1.5, abs=FRAME)
    assert media.audio_codec == "aac"
    assert audio_rms(path, 0, 1.5) < 5  # normalisation leaves silence silent
    # Nothing is narrated: no caption files.
    assert result.captions_srt_uri == result.captions_vtt_uri == ""


async def test_quiet_and_loud_tracks_come_out_equally_loud(
    unvoiced_composer: VideoComposer, images, file_store, make_audio
):
    target = unvoiced_composer.settings.loudness_lufs
    inputs, outputs_ = [], []
    for name, volume in (("quiet", 0.02), ("loud", 0.9)):
        source = f"aevalsrc={volume}*sin(2*PI*330*t)*(0.6+0.4*sin(2*PI*2*t)):s=44100"
        audio = make_audio(f"{name}.flac", source, 4.0)
        audio_uri = file_store.put_file(f"jobs/inputs/audio/{name}.flac", audio)
        result = await unvoiced_composer.compose(f"job-{name}", [Scene(images[0])], audio_uri)
        inputs.append(integrated_loudness(audio))
        outputs_.append(integrated_loudness(video_path(file_store, result.video_uri)))
    assert inputs[1] - inputs[0] > 30  # 33 dB apart going in...
    assert outputs_ == pytest.approx([target, target], abs=1.0)  # ...at the target coming out


@pytest.mark.parametrize(
    ("aspect", "size"),
    [
        ("9:16", (480, 854)),
        ("1:1", (480, 480)),
        ("16:9", (854, 480)),
        ("4:5", (480, 600)),
        ("21:9", (1120, 480)),
    ],
)
async def test_aspect_ratio_renders_at_the_size_of_its_resolution_with_captions_inside(
    aspect, size, unvoiced_composer: VideoComposer, images, file_store, make_audio
):
    audio_uri = file_store.put_file("jobs/inputs/a.wav", make_audio("a.wav", "sine", 1.0))
    scenes = [Scene(images[0], "Captions stay inside the safe area of every frame shape.")]
    options = ComposeOptions(aspect=aspect, resolution="480p", fit="blur", motion="none")
    result = await unvoiced_composer.compose(f"job-{size[0]}", scenes, audio_uri, options=options)

    path = video_path(file_store, result.video_uri)
    media = probe_media(path)
    assert (media.width, media.height) == size == (result.width, result.height)
    assert (media.video_codec, media.pix_fmt, media.audio_codec) == ("h264", "yuv420p", "aac")
    poster = Image.open(file_store.path_of(result.poster_uri))
    assert poster.size == size and poster.mode == "RGB"
    # The caption (white text on a red picture) lies inside the safe area.
    frame = video_frames(path)[12].astype(int)
    white = np.argwhere((frame > 200).all(axis=2))
    assert len(white) > 100
    settings = unvoiced_composer.settings
    margin = settings.caption_margin
    bottom = settings.caption_portrait_bottom_margin if size[1] > size[0] else margin
    assert white[:, 1].min() >= size[0] * margin and white[:, 1].max() < size[0] * (1 - margin)
    assert white[:, 0].max() < size[1] * (1 - bottom)


async def test_same_seed_gives_the_same_moves_and_another_seed_other_moves(
    unvoiced_composer: VideoComposer, file_store, make_audio
):
    pictures = pattern_images(file_store)
    audio_uri = file_store.put_file("jobs/inputs/a.wav", make_audio("a.wav", "sine", 1.5))
    scenes = [Scene(uri) for uri in pictures]

    async def frames(job: str, seed: int) -> np.ndarray:
        options = ComposeOptions(seed=seed, captions="off")
        result = await unvoiced_composer.compose(job, scenes, audio_uri, options=options)
        return video_frames(video_path(file_store, result.video_uri)).astype(int)

    first, again, other = (
        await frames("job-s1", 1),
        await frames("job-s1b", 1),
        await frames("job-s2", 2),
    )
    assert np.array_equal(first, again)
    assert np.abs(first - other).mean() > 5
    # The picture moves within a scene.
    assert np.abs(first[0] - first[15]).mean() > 5


async def test_still_motion_keeps_the_picture_still(
    unvoiced_composer: VideoComposer, file_store, make_audio
):
    pictures = pattern_images(file_store, 1)
    audio_uri = file_store.put_file("jobs/inputs/a.wav", make_audio("a.wav", "sine", 1.0))
    options = ComposeOptions(motion="none", captions="off")
    result = await unvoiced_composer.compose(
        "job-still", [Scene(pictures[0])], audio_uri, options=options
    )
    frames = video_frames(video_path(file_store, result.video_uri)).astype(int)
    assert np.abs(frames[2] - frames[-1]).mean() < 2


@pytest.mark.parametrize("mode", ["burned", "sidecar", "off"])
async def test_captions_can_be_burned_kept_to_sidecar_files_or_turned_off(
    mode, unvoiced_composer: VideoComposer, images, file_store, make_audio
):
    audio_uri = file_store.put_file("jobs/inputs/a.wav", make_audio("a.wav", "sine", 1.0))
    scenes = [Scene(images[0], "Hello there.")]
    options = ComposeOptions(captions=mode, motion="none")
    result = await unvoiced_composer.compose(f"job-{mode}", scenes, audio_uri, options=options)

    frame = video_frames(video_path(file_store, result.video_uri))[12].astype(int)
    has_white_text = bool((frame > 200).all(axis=2).any())
    assert has_white_text == (mode == "burned")
    if mode == "off":
        assert result.captions_srt_uri == result.captions_vtt_uri == ""
    else:
        cues = parse_srt(file_store.get_bytes(result.captions_srt_uri).decode())
        assert cues == [(0.0, 1.0, "Hello there.")]  # over the whole scene: no speech to follow
        assert parse_vtt(file_store.get_bytes(result.captions_vtt_uri).decode()) == cues


async def test_contact_sheet_shows_one_thumbnail_per_scene_in_order(
    unvoiced_composer: VideoComposer, images, file_store, make_audio
):
    audio_uri = file_store.put_file("jobs/inputs/a.wav", make_audio("a.wav", "sine", 1.5))
    result = await unvoiced_composer.compose("job-sheet", [Scene(uri) for uri in images], audio_uri)
    sheet = np.asarray(Image.open(file_store.path_of(result.contact_sheet_uri)).convert("RGB"))
    width = unvoiced_composer.settings.contact_sheet_thumb_width
    # One row of three 128x128 frames shrunk to the thumbnail width, 4 px margins and padding.
    assert sheet.shape == (4 + width + 4, 4 + 3 * (width + 4), 3)
    for n in range(3):
        thumb = sheet[4 : 4 + width, 4 + n * (width + 4) : 4 + n * (width + 4) + width]
        assert thumb.reshape(-1, 3).mean(axis=0).argmax() == n


async def test_poster_is_the_rendered_middle_frame_of_scene_one_without_captions(
    unvoiced_composer: VideoComposer, file_store, make_audio
):
    pictures = pattern_images(file_store)
    audio_uri = file_store.put_file("jobs/inputs/a.wav", make_audio("a.wav", "sine", 2.0))
    scenes = [Scene(pictures[0], "A caption over the poster."), Scene(pictures[1])]
    result = await unvoiced_composer.compose(
        "job-poster", scenes, audio_uri, options=ComposeOptions(seed=3, captions="sidecar")
    )
    frames = video_frames(video_path(file_store, result.video_uri)).astype(np.float64)
    poster = np.asarray(Image.open(file_store.path_of(result.poster_uri)), np.float64)
    middle = round(result.scene_starts_s[1] * 24) // 2
    errors = [np.abs(poster - frame).mean() for frame in frames]
    # The poster is that very frame of the moving picture (to compression and resampling).
    assert abs(int(np.argmin(errors)) - middle) <= 1
    scene_two = round(result.scene_starts_s[1] * 24) + 12
    assert errors[middle] < 30 and errors[middle] < errors[scene_two] / 2
    sheet = np.asarray(Image.open(file_store.path_of(result.contact_sheet_uri)), np.float64)
    first = np.asarray(thumbnail(Image.fromarray(poster.astype(np.uint8)), 320), np.float64)
    assert np.abs(sheet[4 : 4 + first.shape[0], 4 : 4 + first.shape[1]] - first).mean() < 1


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


def _hls_playlist(tmp_path: Path, make_audio) -> Path:
    """An HLS playlist naming a real file beside it, as an .mp3 (ID3 start) and as .m3u8."""
    make_audio("part.mp3", "sine", 1.0, "-c:a", "libmp3lame")
    path = tmp_path / "list.m3u8"
    path.write_text("#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:1,\npart.mp3\n#EXT-X-ENDLIST\n")
    return path


def _ffconcat_playlist(tmp_path: Path, make_audio) -> Path:
    """An ffconcat list naming a file in the composer's own work folder."""
    path = tmp_path / "list.mp3"
    path.write_text("ffconcat version 1.0\nfile track.wav\nfile user-audio.mp3\n")
    return path


def _id3_then_playlist(tmp_path: Path, make_audio) -> Path:
    """A valid ID3 header (what the gateway sniffs as MP3) with a playlist behind it."""
    path = tmp_path / "tagged.mp3"
    path.write_bytes(b"ID3\x04\x00\x00\x00\x00\x00\x00ffconcat version 1.0\nfile track.wav\n")
    return path


@pytest.mark.parametrize(
    ("make_bad_audio", "problem"),
    [
        # ffmpeg reads a long text file as a "tty" video, a container never read here.
        (_text_file, "not usable audio: it is not (a media file|in a supported format)"),
        (_garbage_mp3, "not usable audio: it is not a media file"),
        (_cut_mp3, "not usable audio: (its data is corrupt|it is truncated)"),
        (_empty_wav, "not usable audio: the file is empty"),
        (_no_samples_wav, "not usable audio: it holds no samples"),
        (_video_without_sound, "not usable audio: it has no audio stream"),
        (_too_long, "lasts 3.0 s; the limit is 2 s"),
        (_hls_playlist, "not usable audio: it is not in a supported format"),
        (_ffconcat_playlist, "not usable audio: it is not in a supported format"),
        (_id3_then_playlist, "not usable audio: it is not (a media file|in a supported format)"),
    ],
    ids=[
        "text",
        "garbage",
        "truncated",
        "empty",
        "no-samples",
        "no-audio-stream",
        "too-long",
        "hls",
        "ffconcat",
        "id3-playlist",
    ],
)
async def test_bad_user_audio_is_invalid_input_naming_the_problem_and_nothing_is_stored(
    make_bad_audio, problem, file_store, images, tmp_path, make_audio, composer_settings
):
    """ProbeAudio (probe_audio) refuses the same audio with the very same message."""
    settings = composer_settings.model_copy(update={"max_audio_s": 2.0})
    composer = VideoComposer(
        file_store,
        NarrationSynthesizer(settings.voice_model_path, settings.voice_config_path),
        settings,
    )
    bad = make_bad_audio(tmp_path, make_audio)
    audio_uri = file_store.put_file(f"uploads/tenant/x/{bad.name}", bad)

    with pytest.raises(InvalidInput, match=rf"audio_uri {re.escape(audio_uri)} .*{problem}") as c:
        await composer.compose("job-bad-audio", [Scene(images[0], "Hi.")], audio_uri)
    with pytest.raises(InvalidInput) as probed:
        await composer.probe_audio(audio_uri)
    assert probed.value.message == c.value.message
    assert_nothing_left(file_store, [*images, audio_uri], settings.work_dir)


def _request(images: list[str], **change) -> dict:
    """compose() arguments: a valid two-scene request with ``change`` applied."""
    request = {
        "job_id": "job-malformed",
        "scenes": [Scene(images[0], "Hello."), Scene(images[1], "Bye.")],
        "audio_uri": None,
    }
    return request | change


def _options(images: list[str], **options) -> dict:
    return _request(images, options=ComposeOptions(**options))


def _with_audio(images: list[str], **options) -> dict:
    return _request(images, audio_uri=images[0], options=ComposeOptions(**options))


MALFORMED = {
    "missing-image-uri": (
        lambda im: _request(im, scenes=[Scene(im[0]), Scene(""), Scene(im[1])]),
        "scene 2 has no image_uri",
    ),
    "no-scenes": (lambda im: _request(im, scenes=[]), "scenes must hold 1 to 24 scenes, got 0"),
    "too-many-scenes": (
        lambda im: _request(im, scenes=[Scene(im[0])] * 25),
        "scenes must hold 1 to 24 scenes, got 25",
    ),
    "image-outside-store": (
        lambda im: _request(im, scenes=[Scene("file:///etc/hosts")]),
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
        lambda im: _request(im, scenes=[Scene(im[0], "x" * 2001)]),
        "scene 1 narration is 2001 characters; the limit is 2000",
    ),
    "audio-outside-store": (
        lambda im: _request(im, audio_uri="s3://elsewhere/a.wav"),
        "audio_uri: URI 's3://elsewhere/a.wav' is not in the artifact store",
    ),
    "size-and-aspect": (
        lambda im: _request(im, width=640, height=360, options=ComposeOptions(aspect="1:1")),
        "set either width and height or aspect and resolution, not both",
    ),
    "unknown-aspect": (
        lambda im: _options(im, aspect="4:3"),
        "aspect must be one of 16:9, 9:16, 1:1, 4:5, 21:9, got '4:3'",
    ),
    "unknown-resolution": (
        lambda im: _options(im, resolution="4k"),
        "resolution must be one of 480p, 720p, 1080p, got '4k'",
    ),
    "unknown-fit": (lambda im: _options(im, fit="stretch"), "fit must be one of cover, blur"),
    "unknown-transition": (
        lambda im: _options(im, transition="wipe"),
        "transition must be one of crossfade, cut",
    ),
    "long-crossfade": (
        lambda im: _options(im, crossfade_s=2.5),
        "crossfade_s must be between 0.04 and 2 s, got 2.5",
    ),
    "negative-crossfade": (
        lambda im: _options(im, crossfade_s=-1),
        "crossfade_s must be between 0.04 and 2 s, got -1",
    ),
    "fast-speech": (
        lambda im: _options(im, speaking_rate=3),
        "speaking_rate must be between 0.5 and 2, got 3",
    ),
    "unknown-voice": (lambda im: _options(im, voice="amy"), "voice 'amy' is not one of joe"),
    "unknown-captions": (
        lambda im: _options(im, captions="subtitles"),
        "captions must be one of burned, sidecar, off",
    ),
    "narration-with-audio": (
        lambda im: _with_audio(im, audio_mode="narration"),
        "audio_mode narration takes no audio_uri",
    ),
    "music-without-audio": (
        lambda im: _options(im, audio_mode="music"),
        "audio_mode music needs an audio_uri",
    ),
    "soundtrack-without-audio": (
        lambda im: _options(im, audio_mode="soundtrack"),
        "audio_mode soundtrack needs an audio_uri",
    ),
    "negative-seed": (lambda im: _options(im, seed=-1), "seed must not be negative, got -1"),
    "large-revision": (
        lambda im: _request(im, revision=2**31),
        "revision must be a whole number from 0 to 2**31-1, got 2147483648",
    ),
    "negative-revision": (
        lambda im: _request(im, revision=-1),
        "revision must be a whole number from 0 to 2**31-1, got -1",
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
            "job-missing", [Scene(images[0]), Scene(missing)], audio_uri
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
        await unvoiced_composer.compose("job-fake", [Scene(images[0]), Scene(fake)], audio_uri)
    assert_nothing_left(file_store, [*images, audio_uri, fake], composer_settings.work_dir)


async def test_narration_before_the_voice_is_loaded_is_not_ready(
    unvoiced_composer: VideoComposer, images, file_store, composer_settings
):
    with pytest.raises(NotReady):
        await unvoiced_composer.compose("job-early", [Scene(images[0], "Hello there.")])
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
    first = asyncio.create_task(composer.compose("job-first", [Scene(images[0])], audio_uri))
    await asyncio.sleep(0)  # the first request takes the only slot and starts working
    with pytest.raises(Overloaded, match="busy"):
        await composer.compose("job-second", [Scene(images[1])], audio_uri)
    result = await first
    # Once the slot is free again, the next request is served.
    again = await composer.compose("job-second", [Scene(images[1])], audio_uri)
    assert sorted(stored_uris(file_store)) == sorted(
        [*images, audio_uri, *outputs(result), *outputs(again)]
    )
