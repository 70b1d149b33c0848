"""Encoding: still frames on a timeline plus a sound track become an H.264/AAC MP4."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path

import numpy as np
from moviepy import ImageClip, concatenate_videoclips

from storyreel_composer.timeline import Timeline


def clip_durations(timeline: Timeline) -> list[float]:
    """Durations to give moviepy's clips so it shows each scene on exactly its frames.

    moviepy samples frame k at ``k / fps`` and picks the clip whose start is
    the last one <= that time; it writes ``int(duration * fps)`` frames. Putting
    every cut half a frame before the scene's first frame, and the end half a
    frame after the last, keeps both decisions clear of float rounding.
    """
    fps = timeline.fps
    edges = [0.0]
    edges += [(start - 0.5) / fps for start in timeline.start_frames[1:]]
    edges.append((timeline.total_frames + 0.5) / fps)
    return [end - start for start, end in pairwise(edges)]


def encode_slideshow(
    frames: Sequence[np.ndarray],
    timeline: Timeline,
    audio_path: Path,
    out_path: Path,
    *,
    preset: str,
    crf: int,
    audio_bitrate: str,
    sample_rate: int,
    threads: int | None = None,
) -> Path:
    """Write ``frames`` (one RGB array per scene) timed by ``timeline`` to an MP4.

    Video is libx264 yuv420p at ``timeline.fps`` with the moov atom up front
    (playable while downloading); the sound track ``audio_path``, which must
    be as long as the timeline, is encoded to AAC.
    """
    if len(frames) != len(timeline.scene_frames):
        raise ValueError(f"{len(frames)} frames for {len(timeline.scene_frames)} scenes")
    clips: list[ImageClip] = []
    video = None
    try:
        for frame, duration in zip(frames, clip_durations(timeline), strict=True):
            clips.append(ImageClip(frame, duration=duration))
        video = concatenate_videoclips(clips, method="chain")
        video.write_videofile(
            str(out_path),
            fps=timeline.fps,
            codec="libx264",
            audio=str(audio_path),
            audio_codec="aac",
            preset=preset,
            threads=threads,
            # moviepy appends its own "-pix_fmt yuva420p" for libx264, which
            # ffmpeg turns into yuv420p (the encoder has no alpha); the output
            # is checked after encoding either way.
            ffmpeg_params=[
                "-crf",
                str(crf),
                "-pix_fmt",
                "yuv420p",
                "-movflags",
                "+faststart",
                "-b:a",
                audio_bitrate,
                "-ar",
                str(sample_rate),
            ],
            logger=None,
        )
    finally:
        for clip in clips:
            clip.close()
        if video is not None:
            video.close()
    return out_path
