"""Benchmark of the composer: speed against a plain ffmpeg filtergraph, and peak memory.

    .venv/bin/python bench/compose.py                # 12 scenes, 60 s, 720p30
    .venv/bin/python bench/compose.py --repeat 3     # best of three runs each
    .venv/bin/python bench/compose.py --moviepy 6    # also the per-frame moviepy path, 6 s of it
    .venv/bin/python bench/compose.py --memory       # 10 minutes at 1080p: peak RSS

The speed run composes a 12-scene, 60-second job (the user's audio as the
sound track, Ken Burns moves, 0.5 s crossfades, AAC audio) through the
composer core, then the same zooms, crossfades and audio as one hand-written
ffmpeg command, and prints on its last line ``composer/ffmpeg ratio: X``: the
composer's time divided by that baseline's. Both run on this machine in the
same conditions; timings on a shared machine are noisy, so compare ratios
and use --repeat. The captioned composition (burned captions, SRT/VTT) is
timed too, for information.

``--memory`` composes a 10-minute 1080p video (24 scenes, captions on) and
prints the peak resident memory of the whole process tree (this process and
every ffmpeg it starts), sampled every 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

REPO = Path(__file__).resolve().parents[1]

SENTENCES = [
    "The lighthouse keeper climbs the stairs at dusk.",
    "Waves break against the rocks below, white and loud.",
    "A lost whale circles the bay, calling for its family.",
    "He lights the lamp and the beam sweeps the water.",
    "The whale follows the light out towards the open sea.",
    "By morning, two whales sing together beyond the reef.",
]


def make_images(folder: Path, count: int, size: int = 768) -> list[Path]:
    """Painterly test pictures: smooth gradients with soft shapes and a little grain."""
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:size, 0:size] / size
    paths = []
    for i in range(count):
        base = np.stack(
            [
                np.sin(x * 5 + i) * 0.5 + 0.5,
                np.cos(y * 4 + i * 0.7) * 0.5 + 0.5,
                np.sin((x + y) * 3 + i * 1.3) * 0.5 + 0.5,
            ],
            -1,
        )
        image = Image.fromarray((base * 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(25):
            cx, cy, r = [*rng.integers(0, size, 2).tolist(), int(rng.integers(10, size // 6))]
            colour = tuple(int(v) for v in rng.integers(0, 255, 3))
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        image = image.filter(ImageFilter.GaussianBlur(2))
        grain = rng.integers(-4, 5, (size, size, 3))
        pixels = np.clip(np.asarray(image).astype(np.int16) + grain, 0, 255).astype(np.uint8)
        path = folder / f"scene-{i + 1:02d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def make_music(path: Path, seconds: float) -> Path:
    """A stereo music-like track: a chord with a slow tremolo over soft noise, as MP3."""
    from storyreel_composer.probe import ffmpeg_exe

    chord = "+".join(f"0.2*sin(2*PI*{f}*t)*(0.6+0.4*sin(2*PI*0.5*t))" for f in (220, 277.2, 329.6))
    source = f"aevalsrc='{chord}|{chord}':s=44100:d={seconds}"
    subprocess.run(
        [
            *(ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i", source),
            *("-f", "lavfi", "-i", f"anoisesrc=d={seconds}:a=0.02:c=pink"),
            *("-filter_complex", "[0:a][1:a]amix=inputs=2:normalize=0"),
            *("-ac", "2", "-c:a", "libmp3lame", str(path)),
        ],
        check=True,
    )
    return path


def narrations(count: int) -> list[str]:
    return [
        " ".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(1 + i % 3))
        for i in range(count)
    ]


def cpu_seconds() -> float:
    """CPU time used so far by this process and the children it has waited for."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Timed:
    """Wall and CPU seconds of a block."""

    def __enter__(self) -> Timed:
        self._wall, self._cpu = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = cpu_seconds() - self._cpu


class TreeMemory:
    """Peak resident memory of this process plus all its descendants, sampled in a thread."""

    def __init__(self, interval_s: float = 0.05) -> None:
        import psutil

        self._process = psutil.Process()
        self._interval_s = interval_s
        self._stop = threading.Event()
        self.peak_bytes = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            for proc in [self._process, *self._process.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += proc.memory_info().rss
            self.peak_bytes = max(self.peak_bytes, total)
            self._stop.wait(self._interval_s)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def compose(work: Path, images, music, texts, *, width, height, fps, captions, threads=None):
    """One composition through the composer core; returns (Timed, ComposeResult)."""
    from storyreel_composer.composer import Scene, VideoComposer
    from storyreel_composer.settings import ComposerSettings
    from storyreel_composer.tts import NarrationSynthesizer

    from storyreel.compose_options import ComposeOptions
    from storyreel.storage import FileStore

    store_dir = work / "store"
    shutil.rmtree(store_dir, ignore_errors=True)
    store = FileStore(store_dir)
    scenes = [
        Scene(store.put_file(f"jobs/in/images/{p.name}", p), text)
        for p, text in zip(images, texts, strict=True)
    ]
    audio_uri = store.put_file(f"jobs/in/audio/{music.name}", music)
    settings = ComposerSettings(
        port=0, work_dir=work / "tmp", max_scenes=max(24, len(images)), encode_threads=threads
    )
    composer = VideoComposer(store, NarrationSynthesizer.from_settings(settings), settings)
    options = ComposeOptions(captions=captions, seed=1)
    with Timed() as timed:
        result = asyncio.run(
            composer.compose(
                "bench", scenes, audio_uri, fps=fps, width=width, height=height, options=options
            )
        )
    return timed, result


def baseline(work: Path, images, music, *, seconds, width, height, fps, zoom=1.12, fade_s=0.5):
    """The same zooms, crossfades and audio as one plain ffmpeg command; returns Timed."""
    from storyreel_composer.probe import ffmpeg_exe

    count = len(images)
    total = round(seconds * fps)
    fade = round(fade_s * fps)
    edges = [round(total * i / count) for i in range(count + 1)]
    cw, ch = 2 * round(width * 0.75), 2 * round(height * 0.75)  # 1.5x the frame, even
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-y"]
    for path in images:
        cmd += ["-i", str(path)]
    cmd += ["-i", str(music)]
    parts = []
    for i in range(count):
        before = fade // 2 if i else 0
        after = fade - fade // 2 if i < count - 1 else 0
        frames = edges[i + 1] - edges[i] + before + after
        z0, z1 = (1.0, zoom) if i % 2 == 0 else (zoom, 1.0)
        parts.append(
            f"[{i}:v]scale={cw}:{ch}:force_original_aspect_ratio=increase,crop={cw}:{ch},"
            f"format=yuv420p,zoompan=z='{z0}+({z1 - z0})*on/{frames - 1}'"
            f":x='(iw-iw/zoom)/2':y='(ih-ih/zoom)/2':d={frames}:s={width}x{height}:fps={fps}[v{i}]"
        )
    last = "v0"
    for i in range(1, count):
        offset = (edges[i] - fade // 2) / fps
        parts.append(
            f"[{last}][v{i}]xfade=transition=fade:duration={fade / fps}:offset={offset}[x{i}]"
        )
        last = f"x{i}"
    samples = round(total / fps * 44100)
    parts.append(f"[{last}]format=yuv420p[vout]")
    parts.append(
        f"[{count}:a]aresample=44100,apad=whole_len={samples},atrim=end_sample={samples}[aout]"
    )
    cmd += ["-filter_complex", ";".join(parts), "-map", "[vout]", "-map", "[aout]"]
    cmd += ["-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-pix_fmt", "yuv420p"]
    cmd += ["-c:a", "aac", "-b:a", "128k", "-movflags", "+faststart", str(work / "baseline.mp4")]
    with Timed() as timed:
        subprocess.run(cmd, check=True)
    return timed


def moviepy_speed(work: Path, images, *, seconds, width, height, fps) -> float:
    """Seconds of video per second of wall time when moviepy draws the same plan per frame."""
    from storyreel_composer.filtergraph import FilterPlan
    from storyreel_composer.images import fit_image
    from storyreel_composer.motion import choose_moves
    from storyreel_composer.reference import reference_clip
    from storyreel_composer.timeline import Timeline, shots

    count = max(2, min(len(images), math.ceil(seconds / 2.5)))
    total = round(seconds * fps)
    lengths = [total // count + (1 if i < total % count else 0) for i in range(count)]
    timeline = Timeline(fps, tuple(lengths))
    canvas = (2 * round(width * 0.75), 2 * round(height * 0.75))
    canvases = [fit_image(Image.open(p).convert("RGB"), *canvas) for p in images[:count]]
    plan = FilterPlan(
        width=width,
        height=height,
        fps=fps,
        canvases=(),
        canvas_size=canvas,
        shots=tuple(shots(timeline, round(0.5 * fps))),
        moves=tuple(choose_moves(1, count, 1.12)),
        total_frames=timeline.total_frames,
        audio="",
    )
    clip = reference_clip(plan, canvases)
    started = time.perf_counter()
    clip.write_videofile(
        str(work / "moviepy.mp4"),
        fps=fps,
        codec="libx264",
        preset="veryfast",
        audio=False,
        logger=None,
    )
    return timeline.duration_s / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--scenes", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each; the best counts")
    parser.add_argument(
        "--moviepy",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="also time moviepy drawing SECONDS of the same kind of video",
    )
    parser.add_argument(
        "--memory",
        action="store_true",
        help="compose 10 minutes at 1080p30 and report the peak RSS",
    )
    parser.add_argument("--keep", type=Path, help="keep the work files in this folder")
    args = parser.parse_args()
    if args.memory:
        args.scenes, args.seconds, args.width, args.height = 24, 600.0, 1920, 1080

    work = Path(tempfile.mkdtemp(prefix="storyreel-bench-")) if not args.keep else args.keep
    work.mkdir(parents=True, exist_ok=True)
    try:
        images = make_images(work, args.scenes)
        music = make_music(work / "music.mp3", args.seconds)
        texts = narrations(args.scenes)
        size = dict(width=args.width, height=args.height, fps=args.fps)
        print(
            f"job: {args.scenes} scenes, {args.seconds:g} s, {args.width}x{args.height} at "
            f"{args.fps} fps, {os.cpu_count()} CPUs",
            flush=True,
        )

        if args.memory:
            with TreeMemory() as memory:
                timed, result = compose(work, images, music, texts, captions="burned", **size)
            print(
                f"composed {result.duration_s:.1f} s in {timed.wall:.1f} s "
                f"({result.duration_s / timed.wall:.2f}x real time, {timed.cpu:.0f} CPU s)"
            )
            print(f"peak RSS (process tree): {memory.peak_bytes / 2**20:.0f} MiB")
            return 0

        runs: dict[str, list[Timed]] = {"base": [], "plain": [], "captioned": []}
        for _ in range(args.repeat):
            runs["base"].append(baseline(work, images, music, seconds=args.seconds, **size))
            timed, result = compose(work, images, music, texts, captions="off", **size)
            runs["plain"].append(timed)
            timed, _ = compose(work, images, music, texts, captions="burned", **size)
            runs["captioned"].append(timed)
        duration = result.duration_s
        best = {name: min(times, key=lambda t: t.wall) for name, times in runs.items()}
        cores = os.cpu_count() or 1
        labels = {
            "base": "plain ffmpeg filtergraph",
            "plain": "composer, no captions",
            "captioned": "composer, captions",
        }
        for name, label in labels.items():
            t = best[name]
            # With every core to itself, a run takes at least its CPU time over the cores.
            print(
                f"{label + ':':26}{t.wall:6.1f} s wall ({duration / t.wall:.2f}x real time), "
                f"{t.cpu:6.1f} CPU s ({duration * cores / t.cpu:.2f}x on {cores} idle cores)"
            )
        print(f"load average: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
        if args.moviepy:
            speed = moviepy_speed(work, images, seconds=args.moviepy, **size)
            print(f"moviepy per-frame path:   {speed:.2f}x real time")
        # CPU time is steadier than wall time on a shared machine.
        print(f"composer/ffmpeg CPU ratio: {best['plain'].cpu / best['base'].cpu:.2f}")
        print(f"composer/ffmpeg ratio: {best['plain'].wall / best['base'].wall:.2f}")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "services" / "composer"))
    sys.exit(main())
