"""Benchmark of the orchestration: one job through the services, and in one process.

    .venv/bin/python bench/orchestration.py                 # 4 scenes, SmolLM2: 3 runs each way
    .venv/bin/python bench/orchestration.py --repeat 5      # more runs: steadier medians
    .venv/bin/python bench/orchestration.py --story fixed   # storyboards from the TGI test double
    .venv/bin/python bench/orchestration.py --threads 0     # torch's own thread count (all cores)

The same job (prompt, scene count, seed, style, image size and steps, video
size and frame rate; the same offline models) runs two ways, both through the
gateway's own JobRunner and JobPipeline, so admission, stage order, database
writes and events are identical; only the stage implementations differ:

* **services**: the whole stack started by ``storyreel.stack.LocalStack``,
  every service its own process with file:// storage in a temporary folder.
  A job is timed from CreateVideo until WatchJob reports it DONE, through the
  gateway's public gRPC API.
* **in-process**: the same models loaded once in this process, and the three
  stage protocols implemented by thin adapters over each service's core (the
  story writer on its generation thread, the scene renderer, the video
  composer) with no gRPC; the JobRunner and JobPipeline run in this process
  over the same kind of file:// store and SQLite job database. A job is timed
  from ``create`` until ``watch`` reports it DONE.

Model loading is excluded: each way runs one warm-up job first. The render
cache is turned off both ways, so every run draws every image. Runs alternate
(services, then in-process) ``--repeat`` times. The table shows each run's
wall time, the stage durations from the job record, what is left of the wall
time outside the stages ("other": admission, database writes, events, the calls),
and the CPU seconds of every process involved. The last line is
``services/in-process ratio: X``: the median services time divided by the
median in-process time. Both ways run on this machine in the same conditions;
timings on a shared machine are noisy, so compare ratios and use --repeat.

Each model runs on ``--threads`` torch threads (1 by default), both ways: on a
CPU shared with other work, as many threads as cores can be many times
slower (SmolLM2 fell below one token a second on two busy cores).

``--story fixed`` takes the model out of the story stage, both ways: the story
writer runs its ``tgi`` backend against ``TGITestDouble`` of
``tests/model_server_doubles.py`` (started in this process), which answers every request
at once with the same storyboard.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = "A lighthouse keeper befriends a lost whale"
STAGES = ("storyboard", "render", "compose")
TENANT = ""  # no API keys: every job belongs to the anonymous tenant


@dataclass
class Run:
    """One job's outcome: wall and CPU seconds, stage durations, and what it made."""

    way: str
    wall: float
    cpu: float
    stages: dict[str, float]
    video_s: float
    scenes: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    @property
    def other(self) -> float:
        return self.wall - sum(self.stages.values())


def own_cpu() -> float:
    """CPU seconds of this process and the children it has waited for (ffmpeg)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def tree_cpu(pids: Sequence[int]) -> float:
    """CPU seconds of these processes, their descendants and their waited-for children."""
    import psutil

    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    t = proc.cpu_times()
                    total += t.user + t.system + t.children_user + t.children_system
    return total


# -- the services way ---------------------------------------------------------------------


class ServicesWay:
    """The real stack, one process per service; jobs go through the gateway's gRPC API."""

    name = "services"

    def __init__(self, work: Path, env: dict[str, str]) -> None:
        from storyreel.stack import LocalStack

        artifacts = work / "artifacts"
        self.stack = LocalStack(
            work, fixed_ports=False, env={**env, "STORYREEL_STORAGE_URL": artifacts.as_uri()}
        )
        self.channel = None
        self.stub = None

    async def start(self) -> None:
        import grpc

        from storyreel.gateway.v1 import gateway_pb2_grpc

        await asyncio.to_thread(self.stack.start, 600)
        self.channel = grpc.aio.insecure_channel(self.stack.gateway_address)
        self.stub = gateway_pb2_grpc.StoryReelServiceStub(self.channel)

    def cpu(self) -> float:
        pids = [p.process.pid for p in self.stack.processes.values()]
        return tree_cpu(pids) + own_cpu()

    async def run(self, prompt: str, scenes: int, seed: int, style: str) -> Run:
        from storyreel.gateway.v1 import gateway_pb2 as pb

        cpu, started = self.cpu(), time.perf_counter()
        created = await self.stub.CreateVideo(
            pb.CreateVideoRequest(prompt=prompt, scene_count=scenes, seed=seed, style=style),
            timeout=60,
        )
        job = None
        async for event in self.stub.WatchJob(
            pb.WatchJobRequest(job_id=created.job_id), timeout=3600
        ):
            job = event.job
            if event.kind == pb.EVENT_KIND_JOB_FINISHED:
                break
        wall = time.perf_counter() - started
        cpu = self.cpu() - cpu
        if job is None or job.state != pb.JOB_STATE_DONE:
            error = f"{job.error.code}: {job.error.message}" if job is not None else "no events"
            raise SystemExit(f"services job {created.job_id} did not finish: {error}")
        stages = {
            pb.Stage.Name(s.stage).removeprefix("STAGE_").lower(): s.duration_s for s in job.stages
        }
        board = tuple((s.narration, s.image_prompt) for s in job.storyboard.scenes)
        return Run(self.name, wall, cpu, stages, job.duration_s, board)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        await asyncio.to_thread(self.stack.stop)


# -- the in-process way -------------------------------------------------------------------


def _stage_errors(call: Callable[..., Awaitable]) -> Callable[..., Awaitable]:
    """Domain errors as the gRPC clients report them (StageFailed with the status name),
    so the pipeline retries and fails exactly as it does over gRPC."""

    async def wrapped(*args, **kwargs):
        from storyreel_gateway.pipeline import StageFailed

        from storyreel.errors import StoryreelError

        try:
            return await call(*args, **kwargs)
        except StoryreelError as exc:
            raise StageFailed(exc.status, exc.message) from None

    return wrapped


class InProcessStory:
    """StoryStage over the story writer, on one generation thread as in the service."""

    def __init__(self, settings) -> None:
        from storyreel_llm.backends import create_backend
        from storyreel_llm.service import GenerationSlot
        from storyreel_llm.writer import StoryboardWriter

        self.backend = create_backend(settings)
        self.writer = StoryboardWriter(self.backend, settings)
        self.slot = GenerationSlot(settings.max_waiting_requests)

    async def load(self) -> None:
        from storyreel.clip_count import clip_tokenizer

        await asyncio.to_thread(clip_tokenizer)
        await self.slot.run(self.backend.load)

    @_stage_errors
    async def write_storyboard(self, job_id, prompt, scene_count, style, seed):
        self.writer.check_request(prompt, scene_count, style)
        # The LLM's storyboard is the shared storyreel.storyboard.Storyboard (a subclass
        # with the writer's rules): the gateway's record keeps it as it is.
        return await self.slot.run(self.writer.write, prompt, scene_count, style, seed)

    async def close(self) -> None:
        self.backend.interrupt()
        await asyncio.to_thread(self.slot.shutdown)
        self.backend.close()


class InProcessRender:
    """RenderStage over the scene renderer (its own single inference thread)."""

    def __init__(self, settings, store, parallelism: int) -> None:
        from storyreel_diffusion.renderer import SceneRenderer

        self.renderer = SceneRenderer(settings, store)
        self.parallelism = parallelism

    async def load(self) -> None:
        await self.renderer.load()

    async def render(self, job_id, scenes, settings, characters=()) -> AsyncIterator:
        from storyreel_diffusion.planning import CastMember, Scene
        from storyreel_gateway.jobs import SceneImage
        from storyreel_gateway.pipeline import StageFailed

        from storyreel.errors import StoryreelError

        known = {c.name for c in characters}
        images = self.renderer.render(
            job_id,
            [
                Scene(
                    index=s.index,
                    prompt=s.prompt,
                    seed=s.seed,
                    characters=tuple(n for n in s.characters if n in known),
                )
                for s in scenes
            ],
            width=settings.width,
            height=settings.height,
            aspect=settings.aspect or None,
            steps=settings.steps,
            guidance=settings.guidance,
            characters=[CastMember(name=c.name, appearance=c.appearance) for c in characters],
            consistency=settings.consistency or None,
            job_seed=settings.job_seed,
            revision=settings.revision,
        )
        try:
            async for image in images:
                yield SceneImage(index=image.index, uri=image.uri, seed=image.seed)
        except StoryreelError as exc:
            raise StageFailed(exc.status, exc.message) from None
        finally:
            await images.aclose()

    async def close(self) -> None:
        await self.renderer.close()


class InProcessCompose:
    """ComposeStage over the video composer, with the service's narration voices."""

    def __init__(self, settings, store) -> None:
        from storyreel_composer.composer import VideoComposer
        from storyreel_composer.tts import NarrationSynthesizer

        self.synthesizer = NarrationSynthesizer.from_settings(settings)
        self.composer = VideoComposer(store, self.synthesizer, settings)

    async def load(self) -> None:
        await asyncio.to_thread(self.synthesizer.load)

    @_stage_errors
    async def compose(
        self, job_id, scenes, audio_uri="", *, fps=0, width=0, height=0, options=None, revision=0
    ):
        from storyreel_composer.composer import Scene
        from storyreel_gateway.jobs import ComposedVideo

        # The gateway's ComposeOptions is the composer's (storyreel.compose_options).
        result = await self.composer.compose(
            job_id,
            [Scene(uri, narration) for uri, narration in scenes],
            audio_uri or None,
            fps=fps,
            width=width,
            height=height,
            options=options,
            revision=revision,
        )
        return ComposedVideo(
            uri=result.video_uri,
            duration_s=result.duration_s,
            scene_starts_s=tuple(result.scene_starts_s),
            width=result.width,
            height=result.height,
            fps=result.fps,
            captions_srt_uri=result.captions_srt_uri,
            captions_vtt_uri=result.captions_vtt_uri,
            poster_uri=result.poster_uri,
            contact_sheet_uri=result.contact_sheet_uri,
        )

    async def close(self) -> None:
        self.synthesizer.close()


class InProcessWay:
    """The gateway's JobRunner and JobPipeline in this process, over in-process stages."""

    name = "in-process"

    def __init__(self, work: Path) -> None:
        self.work = work
        self.runner = None
        self.database = None
        self.parts: list = []

    async def start(self) -> None:
        from diffusers.utils import logging as diffusers_logging
        from storyreel_composer.settings import ComposerSettings
        from storyreel_diffusion.settings import DiffusionSettings
        from storyreel_gateway.db import Database
        from storyreel_gateway.pipeline import JobPipeline
        from storyreel_gateway.runner import JobRunner
        from storyreel_gateway.settings import GatewaySettings
        from storyreel_gateway.store import JobStore
        from storyreel_llm.settings import LLMSettings
        from transformers.utils import logging as transformers_logging

        from storyreel.logs import JsonFormatter
        from storyreel.settings import StorageSettings
        from storyreel.storage import open_store

        # Log as the services do (JSON lines at INFO), to a file.
        self.work.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.work / "in-process.log")
        handler.setFormatter(JsonFormatter("in-process"))
        root = logging.getLogger()
        root.handlers[:] = [handler]
        root.setLevel(logging.INFO)
        for noisy in ("httpx", "urllib3", "filelock", "PIL"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        # diffusers and transformers have handlers of their own: send their records to the
        # root logger instead, as the diffusion service does.
        for library in (diffusers_logging, transformers_logging):
            library.disable_default_handler()
            library.enable_propagation()

        # Every setting from the environment, as each service reads it.
        diffusion = DiffusionSettings()
        if diffusion.torch_threads:
            import torch

            torch.set_num_threads(diffusion.torch_threads)
        # Job state in a SQLite file of its own, as the stack's gateway keeps it; uploads
        # spool under the work folder.
        gateway = GatewaySettings(
            database_url=f"sqlite+aiosqlite:///{(self.work / 'gateway.db').resolve()}",
            upload_tmp_dir=self.work / "uploads",
        )
        store = open_store(StorageSettings(url=(self.work / "artifacts").as_uri()))
        await asyncio.to_thread(store.check_ready)
        story = InProcessStory(LLMSettings())
        render = InProcessRender(diffusion, store, gateway.render_parallelism or 1)
        compose = InProcessCompose(ComposerSettings(), store)
        self.parts = [story, render, compose]
        for part in self.parts:
            await part.load()
        self.database = Database(gateway.database_url, gateway.database_pool_size)
        await self.database.migrate()
        jobs = JobStore(self.database)
        pipeline = JobPipeline.from_settings(gateway, jobs, story, render, compose)
        self.runner = JobRunner(gateway, store, jobs, pipeline, instance_id="bench")
        await self.runner.start()

    async def run(self, prompt: str, scenes: int, seed: int, style: str) -> Run:
        from storyreel_gateway.jobs import JobSpec, JobState

        cpu, started = own_cpu(), time.perf_counter()
        spec = JobSpec(
            prompt=prompt, scene_count=scenes, seed=seed, style=style, width=0, height=0, fps=0
        )
        record = await self.runner.create(TENANT, spec)
        job = record
        async for event in self.runner.watch(TENANT, record.job_id):
            job = event.job
        wall = time.perf_counter() - started
        cpu = own_cpu() - cpu
        if job.state is not JobState.DONE:
            error = f"{job.error.code}: {job.error.message}" if job.error else job.state.value
            raise SystemExit(f"in-process job {job.job_id} did not finish: {error}")
        stages = {s.stage.value: s.duration_s or 0.0 for s in job.stages}
        board = tuple((s.narration, s.image_prompt) for s in job.storyboard.scenes)
        return Run(self.name, wall, cpu, stages, job.duration_s, board)

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.close()
        if self.database is not None:
            await self.database.close()
        for part in self.parts:
            await part.close()


# -- the benchmark ------------------------------------------------------------------------


def print_table(runs: list[Run]) -> None:
    head = f"{'run':>4}  {'way':<11}{'total s':>8}"
    head += "".join(f"{name:>11}" for name in STAGES)
    head += f"{'other':>8}{'CPU s':>8}{'video s':>9}"
    print(head)
    for number, run in enumerate(runs):
        line = f"{number // 2 + 1:>4}  {run.way:<11}{run.wall:8.2f}"
        line += "".join(f"{run.stages.get(name, 0.0):11.2f}" for name in STAGES)
        line += f"{run.other:8.2f}{run.cpu:8.1f}{run.video_s:9.2f}"
        print(line)
    medians = {}
    for way in ("services", "in-process"):
        mine = [r for r in runs if r.way == way]
        med = {
            "total": statistics.median(r.wall for r in mine),
            **{name: statistics.median(r.stages.get(name, 0.0) for r in mine) for name in STAGES},
            "other": statistics.median(r.other for r in mine),
            "cpu": statistics.median(r.cpu for r in mine),
        }
        medians[way] = med
        line = f"{'med':>4}  {way:<11}{med['total']:8.2f}"
        line += "".join(f"{med[name]:11.2f}" for name in STAGES)
        line += f"{med['other']:8.2f}{med['cpu']:8.1f}"
        print(line)
    s, p = medians["services"], medians["in-process"]
    line = f"{'':>4}  {'ratio':<11}{s['total'] / p['total']:8.2f}"
    line += "".join(f"{s[n] / p[n] if p[n] else float('nan'):11.2f}" for n in STAGES)
    print(line + f"{'':8}{s['cpu'] / p['cpu']:8.2f}")


async def bench(args: argparse.Namespace, work: Path) -> list[Run]:
    services = ServicesWay(work / "services", args.env)
    in_process = InProcessWay(work / "in-process")
    ways = (services, in_process)
    try:
        startup = {}
        for way in ways:
            started = time.perf_counter()
            await way.start()
            startup[way.name] = time.perf_counter() - started
        print(
            f"start-up (not timed): services {startup['services']:.1f} s, "
            f"in-process {startup['in-process']:.1f} s",
            flush=True,
        )
        job = (args.prompt, args.scenes, args.seed, args.style)
        warm = [await way.run(*job) for way in ways]
        print(
            f"warm-up job (not timed): services {warm[0].wall:.1f} s, "
            f"in-process {warm[1].wall:.1f} s",
            flush=True,
        )
        runs: list[Run] = []
        for number in range(1, args.repeat + 1):
            for way in ways:
                run = await way.run(*job)
                runs.append(run)
                print(f"  run {number} {way.name}: {run.wall:.2f} s", flush=True)
        return runs
    finally:
        for way in ways:
            with contextlib.suppress(Exception):
                await way.close()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each way")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--scenes", type=int, default=4)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--style", default="")
    parser.add_argument(
        "--story",
        choices=("local", "fixed"),
        default="local",
        help="local: SmolLM2 writes the storyboard (the service's default backend);\n"
        "fixed: the TGI test double answers at once with the same storyboard",
    )
    parser.add_argument("--render-size", type=int, default=64, help="square images, in pixels")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps")
    parser.add_argument("--video", default="128x96", help="video WIDTHxHEIGHT")
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of each model, both ways (0: torch's default, one per core);\n"
        "on a shared CPU more threads than free cores can be many times slower",
    )
    parser.add_argument("--keep", type=Path, help="keep the work files (logs, artifacts) here")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    video_width, video_height = (int(v) for v in args.video.lower().split("x"))

    # One environment for both ways: the stack's processes inherit it, and the
    # in-process way reads its settings from it.
    env = {
        "STORYREEL_LLM_MODEL": str(REPO / "models" / "smollm2-135m-instruct"),
        "STORYREEL_DIFFUSION_MODEL": str(REPO / "models" / "tiny-sd"),
        # Every run draws every image: no cache hits from the warm-up job.
        "STORYREEL_DIFFUSION_CACHE_ENABLED": "false",
        "STORYREEL_GATEWAY_RENDER_WIDTH": str(args.render_size),
        "STORYREEL_GATEWAY_RENDER_HEIGHT": str(args.render_size),
        "STORYREEL_GATEWAY_RENDER_STEPS": str(args.steps),
        "STORYREEL_GATEWAY_VIDEO_WIDTH": str(video_width),
        "STORYREEL_GATEWAY_VIDEO_HEIGHT": str(video_height),
        "STORYREEL_GATEWAY_VIDEO_FPS": str(args.fps),
    }
    if args.threads:
        env["STORYREEL_LLM_TORCH_THREADS"] = str(args.threads)
        env["STORYREEL_DIFFUSION_TORCH_THREADS"] = str(args.threads)
    double = None
    if args.story == "fixed":
        sys.path.insert(0, str(REPO / "tests"))
        from model_server_doubles import TGITestDouble

        double = TGITestDouble(schema_answers=True).start()
        env["STORYREEL_LLM_BACKEND"] = "tgi"
        env["STORYREEL_LLM_TGI_URL"] = double.url
    os.environ.update(env)
    args.env = env

    work = args.keep or Path(tempfile.mkdtemp(prefix="storyreel-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    story = "SmolLM2 (local backend)" if args.story == "local" else "TGI test double (fixed)"
    print(
        f"job: {args.scenes} scenes of {args.prompt!r}, seed {args.seed}; story: {story}; "
        f"images {args.render_size}x{args.render_size}, {args.steps} steps; video "
        f"{video_width}x{video_height} at {args.fps} fps; torch threads "
        f"{args.threads or 'default'}; {os.cpu_count()} CPUs",
        flush=True,
    )
    try:
        runs = asyncio.run(bench(args, work))
    finally:
        if double is not None:
            double.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print_table(runs)
    boards = {run.scenes for run in runs}
    # Narration is synthesized with random noise (piper), so lengths may differ a little.
    shortest, longest = min(r.video_s for r in runs), max(r.video_s for r in runs)
    print(
        "storyboards: "
        + ("the same in every run" if len(boards) == 1 else f"{len(boards)} different ones")
        + f"; video length: {shortest:.2f}"
        + (f"-{longest:.2f}" if longest - shortest >= 0.005 else "")
        + " s"
    )
    print(f"load average: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    median = {
        way: statistics.median(r.wall for r in runs if r.way == way)
        for way in ("services", "in-process")
    }
    cpu = {
        way: statistics.median(r.cpu for r in runs if r.way == way)
        for way in ("services", "in-process")
    }
    # CPU time is steadier than wall time on a shared machine.
    print(f"services/in-process CPU ratio: {cpu['services'] / cpu['in-process']:.2f}")
    print(f"services/in-process ratio: {median['services'] / median['in-process']:.2f}")
    return 0


if __name__ == "__main__":
    for package in ("gateway", "services/llm", "services/diffusion", "services/composer"):
        sys.path.insert(0, str(REPO / package))
    sys.exit(main())
