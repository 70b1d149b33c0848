"""The composition as a moviepy clip: the per-frame Python reference of the renderer.

:func:`reference_clip` builds, from the same :class:`~.filtergraph.FilterPlan` the
ffmpeg filtergraph draws, a moviepy ``CompositeVideoClip``: one clip per shot
placed at its first frame, moved by its Ken Burns :class:`~.motion.Move`
(each frame drawn by :func:`~.stills.shot_frame`, as the poster's are),
crossfaded in by a mask over its ``fade_in`` frames, with the sound track as
its audio. Rendering it with moviepy gives the same pictures frame by frame
(captions aside) at a fraction of the speed, which is what it is for: tests
compare the filtergraph's frames against it, and ``bench/compose.py --moviepy``
measures the difference.

Only the tests and the benchmark import this module, and it is the only one
that imports moviepy: the service, ``storyreel compose`` and the rest of the
package never load it (tests/core/test_layering.py). moviepy comes with the
package's ``reference`` extra (``pip install 'storyreel-composer[reference]'``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from moviepy import AudioFileClip, CompositeVideoClip, VideoClip
from PIL import Image

from storyreel_composer.filtergraph import FilterPlan
from storyreel_composer.motion import Move
from storyreel_composer.stills import shot_frame
from storyreel_composer.timeline import Shot


def reference_clip(
    plan: FilterPlan, canvases: Sequence[Image.Image], audio: Path | None = None
) -> CompositeVideoClip:
    """The moviepy clip of ``plan`` (``canvases`` are its pictures, in scene order).

    Clip edges sit half a frame before their first frame, so that sampling
    at ``k / fps`` picks shots and crossfade weights exactly as the
    filtergraph does (``xfade`` weighs the incoming shot j / fade_in on the
    j-th frame of a fade).
    """
    fps = plan.fps
    size = (plan.width, plan.height)
    clips = []
    for shot, move, canvas in zip(plan.shots, plan.moves, canvases, strict=True):
        clip = VideoClip(_frames(shot, move, canvas, fps, size), duration=shot.frames / fps)
        if shot.fade_in:
            clip = clip.with_mask(
                VideoClip(_fade_mask(shot, fps, size), duration=shot.frames / fps, is_mask=True)
            )
        clips.append(clip.with_start((shot.first_frame - 0.5) / fps))
    video = CompositeVideoClip(clips, size=size).with_duration(plan.total_frames / fps)
    if audio is not None:
        video = video.with_audio(AudioFileClip(str(audio)))
    return video


def _index(t: float, fps: int) -> int:
    # Local times fall half a frame into each frame (see reference_clip).
    return int(np.floor(t * fps + 1e-6))


def _frames(shot: Shot, move: Move | None, canvas: Image.Image, fps: int, size):
    last = max(shot.frames - 1, 1)

    def frame(t: float) -> np.ndarray:
        index = min(max(_index(t, fps), 0), shot.frames - 1)
        return shot_frame(canvas, move, index / last, size)

    return frame


def _fade_mask(shot: Shot, fps: int, size):
    width, height = size

    def mask(t: float) -> np.ndarray:
        weight = min(max(_index(t, fps), 0) / shot.fade_in, 1.0)
        return np.full((height, width), weight, dtype=np.float32)

    return mask
