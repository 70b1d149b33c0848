"""The ffmpeg renderer on real files: exact cuts, centred crossfades, player-safe output,
timed captions, and Ken Burns frames that match the moviepy reference."""

from __future__ import annotations

import bisect
import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from storyreel_composer.filtergraph import Encoding, FilterPlan, encode, filtergraph
from storyreel_composer.motion import Move
from storyreel_composer.reference import reference_clip
from storyreel_composer.timeline import Timeline, shots
from support import ffmpeg_decode, probe_media

COLOURS = [(230, 20, 20), (20, 230, 20), (20, 20, 230)]


def silent_wav(path: Path, seconds: float, rate: int = 22050) -> Path:
    with wave.open(str(path), "wb") as wav:
        wav.setframerate(rate)
        wav.setsampwidth(2)
        wav.setnchannels(1)
        wav.writeframes(b"\0\0" * round(seconds * rate))
    return path


def decode_frames(path: Path, width: int, height: int) -> np.ndarray:
    raw = ffmpeg_decode(path, "-map", "0:v:0", "-f", "rawvideo", "-pix_fmt", "rgb24")
    return np.frombuffer(raw, np.uint8).reshape(-1, height, width, 3).astype(np.float64)


def colour_plan(
    work: Path, timeline: Timeline, size=(96, 64), fade=0, moves=None, **more
) -> FilterPlan:
    """A plan of solid-colour scenes (one per COLOURS entry used) with a silent track."""
    count = len(timeline.scene_frames)
    for number in range(count):
        image = np.full((size[1], size[0], 3), COLOURS[number % 3], np.uint8)
        (work / f"canvas-{number}.rgb").write_bytes(image.tobytes())
    silent_wav(work / "track.wav", timeline.duration_s)
    return FilterPlan(
        width=size[0],
        height=size[1],
        fps=timeline.fps,
        canvases=tuple(f"canvas-{n}.rgb" for n in range(count)),
        canvas_size=size,
        shots=tuple(shots(timeline, fade)),
        moves=tuple(moves or [None] * count),
        total_frames=timeline.total_frames,
        audio="track.wav",
        encoding=Encoding(audio_bitrate="64k"),
        **more,
    )


# (30, (5, 4, 41)): durations whose plain float sum falls short of 50 frames.
@pytest.mark.parametrize(("fps", "frames"), [(30, (5, 4, 41)), (7, (1, 1, 3))])
def test_cuts_show_every_scene_on_exactly_its_frames(tmp_path, fps, frames):
    timeline = Timeline(fps, frames)
    out = encode(colour_plan(tmp_path, timeline), tmp_path, timeout_s=60)

    media = probe_media(out)
    assert (media.video_codec, media.pix_fmt, media.audio_codec) == ("h264", "yuv420p", "aac")
    assert (media.width, media.height, media.frames, media.fps) == (96, 64, sum(frames), fps)
    shown = decode_frames(out, 96, 64).mean(axis=(1, 2)).argmax(axis=1)
    starts = timeline.start_frames
    assert shown.tolist() == [bisect.bisect_right(starts, k) - 1 for k in range(sum(frames))]


def test_crossfade_blends_over_the_frames_centred_on_the_scene_boundary(tmp_path):
    timeline = Timeline(24, (24, 24))  # red then green, the boundary at frame 24
    plan = colour_plan(tmp_path, timeline, fade=8)
    assert "xfade=transition=fade:duration=0.333333:offset=0.833333" in filtergraph(plan)
    frames = decode_frames(encode(plan, tmp_path, timeout_s=60), 96, 64)

    assert len(frames) == 48
    green = frames[:, :, :, 1].mean(axis=(1, 2))
    share = (green - 20) / (230 - 20)  # 0: all red, 1: all green
    assert share[:20] == pytest.approx([0] * 20, abs=0.03)  # red until the fade starts
    assert share[28:] == pytest.approx([1] * 20, abs=0.03)  # green once it is over
    # The j-th frame of the fade shows j/8 of the incoming scene: half at the boundary.
    assert share[20:28] == pytest.approx([j / 8 for j in range(8)], abs=0.04)
    assert share[24] == pytest.approx(0.5, abs=0.04)


def test_mp4_has_its_index_up_front_for_playing_while_downloading(tmp_path):
    out = encode(colour_plan(tmp_path, Timeline(10, (5, 5))), tmp_path, timeout_s=60)
    data = out.read_bytes()
    assert 0 < data.find(b"moov") < data.find(b"mdat")


def test_captions_are_drawn_over_the_pictures_on_the_frames_of_their_time(tmp_path):
    import shutil

    from storyreel_composer.settings import PACKAGED_FONT

    (tmp_path / "cue.txt").write_text("CAPTION")
    shutil.copyfile(PACKAGED_FONT, tmp_path / "font.ttf")
    caption = (
        "drawtext=fontfile=font.ttf:textfile=cue.txt:fontsize=20:fontcolor=white"
        ":x=10:y=10:enable='gte(t,1)*lt(t,2)'"
    )
    plan = colour_plan(tmp_path, Timeline(12, (12, 12, 12)), captions=(caption,))
    video = decode_frames(encode(plan, tmp_path, timeout_s=60), 96, 64)
    text = video[:, 10:25, 10:40].max(axis=(1, 2, 3))
    assert (text[12:24] > 240).all()  # from 1 s to 2 s
    assert (text[:12] < 240).all() and (text[24:] < 240).all()


def test_ken_burns_frames_match_the_moviepy_reference_frame_by_frame(tmp_path):
    # A grey pattern of 10 px blocks: any shift or scale error shows.
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (27, 48), np.uint8)
    canvas = Image.fromarray(np.kron(blocks, np.ones((10, 10), np.uint8))).convert("RGB")
    (tmp_path / "canvas.rgb").write_bytes(canvas.tobytes())
    silent_wav(tmp_path / "track.wav", 1.0)
    moves = [Move("pan_right", 1.2, 1.2, 0.0, 1.0), Move("zoom_in", 1.0, 1.25, 0.3, 0.3, 0.6, 0.6)]
    for move in moves:
        plan = FilterPlan(
            width=320,
            height=180,
            fps=24,
            canvases=("canvas.rgb",),
            canvas_size=canvas.size,
            shots=tuple(shots(Timeline(24, (24,)), 0)),
            moves=(move,),
            total_frames=24,
            audio="track.wav",
            encoding=Encoding(crf=5),
        )
        frames = decode_frames(encode(plan, tmp_path, timeout_s=60), 320, 180)
        reference = reference_clip(plan, [canvas])
        expected = [reference.get_frame(k / 24).astype(np.float64) for k in range(24)]
        for k in (0, 7, 12, 23):
            errors = [np.abs(frames[k] - frame).mean() for frame in expected]
            # The rendered frame is the reference's own frame, not a neighbour's.
            assert int(np.argmin(errors)) == k, (move.kind, k, errors)
            assert errors[k] < 30, (move.kind, k)
