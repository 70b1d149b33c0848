"""The renderer: one ffmpeg filtergraph draws, fades, captions and encodes the video.

The per-frame work (Ken Burns moves, crossfades, captions, encoding) runs
inside ffmpeg's filters: Python only describes it. Each scene's picture is
fitted to the frame once, in Python, and handed to ffmpeg as raw RGB, which
decodes once and feeds ``zoompan`` (the move), ``xfade`` (the crossfade or
the cut), then ``ass`` (the captions, drawn by libass), then libx264. The graph has one
output: an extra output (a poster branch, say) makes ffmpeg queue frames for
the whole video, so the poster and contact sheet are drawn apart (:mod:`.stills`).

All files are named relative to the work directory the render runs in, so
nothing in the graph needs escaping.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from storyreel_composer.motion import Move
from storyreel_composer.probe import ffmpeg_exe
from storyreel_composer.timeline import Shot


@dataclass(frozen=True)
class Encoding:
    """libx264 and AAC settings."""

    preset: str = "veryfast"
    crf: int = 23
    audio_bitrate: str = "128k"
    sample_rate: int = 44100
    threads: int | None = None


@dataclass(frozen=True)
class FilterPlan:
    """Everything the renderer draws, in output frames and work-directory file names."""

    width: int
    height: int
    fps: int
    #: Raw RGB24 pictures, one per scene, each ``canvas_size`` (larger than
    #: the frame when moves are supersampled).
    canvases: tuple[str, ...]
    canvas_size: tuple[int, int]
    shots: tuple[Shot, ...]
    #: One per scene; None draws the picture still.
    moves: tuple[Move | None, ...]
    total_frames: int
    audio: str
    video: str = "video.mp4"
    #: Filters burning the captions (:func:`.captions.burn`), applied in order.
    captions: tuple[str, ...] = ()
    encoding: Encoding = field(default_factory=Encoding)


def filtergraph(plan: FilterPlan) -> str:
    """The ``-filter_complex`` text of ``plan``."""
    fps = plan.fps
    size = f"{plan.width}x{plan.height}"
    chains = []
    for i, (shot, move) in enumerate(zip(plan.shots, plan.moves, strict=True)):
        lead = _lead(i, shot)
        if move is None:
            # A still: scale once, then repeat the one frame.
            draw = (
                f"scale={size}:flags=lanczos,loop=loop={shot.frames + lead - 1}:size=1:start=0,"
                f"settb=1/{fps},setpts=N"
            )
        else:
            draw = move.zoompan(shot.frames, plan.width, plan.height, fps, lead)
        chains.append(f"[{i}:v]format=yuv420p,{draw},setsar=1[s{i}]")

    # Every join is an xfade: a crossfade over the shot's fade_in frames, or a
    # cut as a one-frame xfade on the frame before the shot, whose weight for
    # the incoming shot is 0 (its hidden lead frame). The concat filter cannot
    # stand in for cuts: it loses the length of one-frame scenes.
    last = "s0"
    for i in range(1, len(plan.shots)):
        shot = plan.shots[i]
        lead = _lead(i, shot)
        chains.append(
            f"[{last}][s{i}]xfade=transition=fade:duration={(shot.fade_in or lead) / fps:.6f}"
            f":offset={(shot.first_frame - lead) / fps:.6f}[x{i}]"
        )
        last = f"x{i}"

    # xfade may hand on yuv444p: the encoder gets yuv420p, which every player takes.
    captions = "".join(f"{caption}," for caption in plan.captions)
    chains.append(f"[{last}]{captions}format=yuv420p[vout]")
    return ";\n".join(chains)


def _lead(index: int, shot: Shot) -> int:
    """Hidden frames before a shot that joins the previous one by a cut."""
    return 1 if index > 0 and not shot.fade_in else 0


def command(plan: FilterPlan, graph_file: str) -> list[str]:
    """The ffmpeg command line of ``plan``, its filtergraph read from ``graph_file``."""
    canvas_w, canvas_h = plan.canvas_size
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-y"]
    for canvas in plan.canvases:
        cmd += ["-f", "rawvideo", "-pixel_format", "rgb24"]
        cmd += ["-video_size", f"{canvas_w}x{canvas_h}", "-framerate", str(plan.fps)]
        cmd += ["-i", canvas]
    cmd += ["-i", plan.audio, "-/filter_complex", graph_file]
    enc = plan.encoding
    cmd += ["-map", "[vout]", "-map", f"{len(plan.canvases)}:a:0"]
    cmd += ["-c:v", "libx264", "-preset", enc.preset, "-crf", str(enc.crf), "-pix_fmt", "yuv420p"]
    if enc.threads:
        cmd += ["-threads", str(enc.threads)]
    cmd += ["-c:a", "aac", "-b:a", enc.audio_bitrate, "-ar", str(enc.sample_rate)]
    cmd += ["-movflags", "+faststart", plan.video]
    return cmd


def encode(plan: FilterPlan, work_dir: Path, *, timeout_s: float) -> Path:
    """Run ``plan`` in ``work_dir``; returns the path of the MP4."""
    graph_file = "filtergraph.txt"
    (work_dir / graph_file).write_text(filtergraph(plan))
    try:
        result = subprocess.run(
            command(plan, graph_file),
            cwd=work_dir,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the render took longer than {timeout_s:g} s") from None
    if result.returncode != 0:
        raise RuntimeError(f"ffmpeg could not render the video: {result.stderr.strip()[-800:]}")
    return work_dir / plan.video
