"""Benchmark of the gateway's job core: admission and reads, on SQLite and on PostgreSQL.

    .venv/bin/python bench/jobs.py                      # 200 jobs from 8 callers, each backend
    .venv/bin/python bench/jobs.py --repeat 3           # more rounds: steadier medians
    .venv/bin/python bench/jobs.py --jobs 1000 --callers 32 --tenants 8

The gateway's own JobRunner, JobStore and JobPipeline run in this process, over
a database of each kind, with stages that do nothing: the story stage returns
a fixed storyboard of ``--scenes`` scenes at once, the render stage one
SceneImage per scene (all pointing at one image written once to a file://
artifact store), the compose stage one ComposedVideo (a video written once).
So every job goes through the gateway's real admission, claims, leases,
per-stage writes and events; only the upstream work is gone.

Per backend and round, a fresh database is migrated and a JobRunner started
(``--in-flight`` jobs at once, queue limits high enough never to refuse,
claim poll 0.05 s). ``--callers`` concurrent callers then create ``--jobs``
jobs between them, spread over ``--tenants`` tenants; each caller calls
``create`` and then ``get`` on the job it made, and takes the next. The bench
then waits until every job is DONE. Reported per backend:

* admission latency (the ``create`` call) and ``get`` latency, p50 and p99 in ms,
  over every call of every round;
* create+get throughput: jobs divided by the time from the first ``create``
  to the last ``get`` (median over rounds);
* completed jobs/s end to end: jobs divided by the time from the first
  ``create`` until the last job was written DONE (median over rounds).

The backends alternate (SQLite, then PostgreSQL) ``--repeat`` times, after one
untimed warm-up round each. SQLite is a file in a temporary folder;
PostgreSQL is a local server from the ``pgserver`` wheel on a Unix socket,
with a fresh database per round. Both run on this machine in the same
conditions; timings on a shared machine are noisy, so compare ratios and use
--repeat. The ratios printed are PostgreSQL's figures divided by SQLite's
(above 1: PostgreSQL is faster). The line before last is
``jobs/s (postgresql): Y``, and the last line is ``jobs/s: X``: the
create+get throughput on SQLite.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ("sqlite", "postgresql")
PROMPT = "A lighthouse keeper befriends a lost whale"


# -- stages that do nothing -----------------------------------------------------------------


class NoopStory:
    """StoryStage: the same storyboard at once, with as many scenes as asked for."""

    async def write_storyboard(self, job_id, prompt, scene_count, style, seed):
        from storyreel.storyboard import Character, Scene, Storyboard

        return Storyboard(
            title="The keeper and the whale",
            characters=[Character(name="Keeper", appearance="an old man in a yellow coat")],
            scenes=[
                Scene(
                    index=index,
                    narration=f"Scene {index} of the story.",
                    image_prompt=f"the lighthouse keeper, scene {index}",
                    characters=["Keeper"],
                )
                for index in range(1, scene_count + 1)
            ],
            style=style,
        )


class NoopRender:
    """RenderStage: every scene's image is the one image written at the start."""

    parallelism = 1

    def __init__(self, image_uri: str) -> None:
        self.image_uri = image_uri

    async def render(self, job_id, scenes, settings, characters=()):
        from storyreel_gateway.jobs import SceneImage

        for scene in scenes:
            yield SceneImage(index=scene.index, uri=self.image_uri, seed=scene.seed)


class NoopCompose:
    """ComposeStage: every job's video is the one video written at the start."""

    def __init__(self, video_uri: str) -> None:
        self.video_uri = video_uri

    async def compose(self, job_id, scenes, audio_uri="", **request):
        from storyreel_gateway.jobs import ComposedVideo

        return ComposedVideo(uri=self.video_uri, duration_s=2.0 * len(scenes))


# -- one round ------------------------------------------------------------------------------


@dataclass
class Round:
    """One round on one backend: every call's latency and the round's two spans."""

    backend: str
    jobs: int
    create_ms: list[float] = field(default_factory=list)
    get_ms: list[float] = field(default_factory=list)
    calls_s: float = 0.0  # first create to last get
    done_s: float = 0.0  # first create to the last job written DONE

    @property
    def calls_rate(self) -> float:
        return self.jobs / self.calls_s

    @property
    def done_rate(self) -> float:
        return self.jobs / self.done_s


class Postgres:
    """A local PostgreSQL server (pgserver) on a Unix socket; a fresh database per call."""

    def __init__(self) -> None:
        import pgserver

        # Not under a private (0700) folder: run as root, pgserver runs the server as a
        # user of its own, which must reach the folder.
        self.folder = Path(tempfile.mkdtemp(prefix="storyreel-postgres-"))
        self.server = pgserver.get_server(self.folder, cleanup_mode="stop")

    async def new_database(self) -> str:
        import asyncpg

        name = f"bench_{uuid.uuid4().hex[:12]}"
        conn = await asyncpg.connect(host=str(self.folder), user="postgres", database="postgres")
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return f"postgresql+asyncpg://postgres@/{name}?host={self.folder}"

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.server.cleanup()
        shutil.rmtree(self.folder, ignore_errors=True)


async def database_url(backend: str, work: Path, postgres: Postgres | None, number: int) -> str:
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{(work / f'gateway-{number}.db').resolve()}"
    assert postgres is not None
    return await postgres.new_database()


async def run_round(
    backend: str,
    url: str,
    args: argparse.Namespace,
    work: Path,
    store,
    uris: tuple[str, str],
    jobs: int,
) -> Round:
    """Start a JobRunner on a fresh database, create ``jobs`` jobs, wait until all are DONE."""
    from sqlalchemy import func, select
    from storyreel_gateway.db import Database
    from storyreel_gateway.db import jobs as jobs_table
    from storyreel_gateway.jobs import JobSpec, JobState
    from storyreel_gateway.pipeline import JobPipeline
    from storyreel_gateway.runner import JobRunner
    from storyreel_gateway.settings import GatewaySettings
    from storyreel_gateway.store import JobStore

    settings = GatewaySettings(
        database_url=url,
        database_pool_size=args.pool_size,
        upload_tmp_dir=work / "uploads",
        max_jobs_in_flight=args.in_flight,
        max_jobs_queued=max(1000, 2 * jobs),
        max_jobs_queued_per_tenant=0,
        claim_poll_s=0.05,
        max_scenes=max(24, args.scenes),
    )
    database = Database(url, settings.database_pool_size)
    runner = None
    try:
        await database.migrate()
        store_of_jobs = JobStore(database)
        image_uri, video_uri = uris
        pipeline = JobPipeline.from_settings(
            settings, store_of_jobs, NoopStory(), NoopRender(image_uri), NoopCompose(video_uri)
        )
        runner = JobRunner(settings, store, store_of_jobs, pipeline, instance_id=f"bench-{backend}")
        await runner.start()

        result = Round(backend, jobs)
        taken = 0
        loop = asyncio.get_running_loop()

        async def caller() -> None:
            nonlocal taken
            while taken < jobs:
                index, taken = taken, taken + 1
                tenant = f"tenant-{index % args.tenants}"
                spec = JobSpec(
                    prompt=f"{PROMPT} ({index})",
                    scene_count=args.scenes,
                    seed=index + 1,
                    width=0,
                    height=0,
                    fps=0,
                )
                started = loop.time()
                record = await runner.create(tenant, spec)
                created = loop.time()
                got = await runner.get(tenant, record.job_id)
                result.create_ms.append((created - started) * 1000)
                result.get_ms.append((loop.time() - created) * 1000)
                if got.job_id != record.job_id:
                    raise SystemExit(f"get returned job {got.job_id} for {record.job_id}")

        began_wall, began = time.time(), loop.time()
        await asyncio.gather(*(caller() for _ in range(args.callers)))
        result.calls_s = loop.time() - began

        # Wait until no job is queued or running, reading the table itself.
        unfinished = [JobState.QUEUED.value, JobState.RUNNING.value]
        deadline = loop.time() + args.timeout
        while True:
            async with database.read() as conn:
                left = (
                    await conn.execute(
                        select(func.count()).where(jobs_table.c.state.in_(unfinished))
                    )
                ).scalar_one()
            if not left:
                break
            if loop.time() > deadline:
                raise SystemExit(f"{backend}: {left} jobs still unfinished after {args.timeout} s")
            await asyncio.sleep(0.01)
        async with database.read() as conn:
            states = dict(
                (
                    await conn.execute(
                        select(jobs_table.c.state, func.count()).group_by(jobs_table.c.state)
                    )
                ).all()
            )
            last_done = (
                await conn.execute(
                    select(func.max(jobs_table.c.updated_at)).where(
                        jobs_table.c.state == JobState.DONE.value
                    )
                )
            ).scalar_one()
            if states != {JobState.DONE.value: jobs}:
                failed = (
                    await conn.execute(
                        select(jobs_table.c.job_id).where(jobs_table.c.state != JobState.DONE.value)
                    )
                ).first()
                detail = ""
                if failed is not None:
                    error = (await store_of_jobs.get(failed.job_id)).error
                    if error is not None:
                        detail = f"; job {failed.job_id}: {error.code}: {error.message}"
                raise SystemExit(f"{backend}: jobs did not all end DONE: {states}{detail}")
        # updated_at is this process's wall clock when the job was last written.
        result.done_s = float(last_done) - began_wall
        return result
    finally:
        if runner is not None:
            await runner.close()
        await database.close()


# -- the benchmark --------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), interpolated between the nearest ranks."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


async def bench(args: argparse.Namespace, work: Path) -> list[Round]:
    from storyreel.settings import StorageSettings
    from storyreel.storage import open_store

    store = open_store(StorageSettings(url=(work / "artifacts").as_uri()))
    await asyncio.to_thread(store.check_ready)
    # The one image and the one video every job points at (a DONE job's video is checked
    # to exist when it is read).
    uris = (
        store.put_bytes("bench/scene.png", b"\x89PNG\r\n\x1a\n", "image/png"),
        store.put_bytes("bench/video.mp4", b"\x00\x00\x00\x18ftypmp42", "video/mp4"),
    )
    postgres = None
    try:
        started = time.perf_counter()
        postgres = await asyncio.to_thread(Postgres)
        print(f"PostgreSQL started (not timed): {time.perf_counter() - started:.1f} s", flush=True)
        number = 0
        warm = min(args.jobs, 20)
        for backend in BACKENDS:
            url = await database_url(backend, work, postgres, number)
            number += 1
            await run_round(backend, url, args, work, store, uris, warm)
        print(f"warm-up round (not timed): {warm} jobs on each backend", flush=True)
        rounds: list[Round] = []
        for repeat in range(1, args.repeat + 1):
            for backend in BACKENDS:
                url = await database_url(backend, work, postgres, number)
                number += 1
                result = await run_round(backend, url, args, work, store, uris, args.jobs)
                rounds.append(result)
                print(
                    f"  round {repeat} {backend:<10}: create+get {result.calls_rate:8.1f} jobs/s, "
                    f"done {result.done_rate:8.1f} jobs/s",
                    flush=True,
                )
        return rounds
    finally:
        if postgres is not None:
            await asyncio.to_thread(postgres.stop)


def summarise(rounds: list[Round]) -> dict[str, dict[str, float]]:
    figures = {}
    for backend in BACKENDS:
        mine = [r for r in rounds if r.backend == backend]
        creates = [ms for r in mine for ms in r.create_ms]
        gets = [ms for r in mine for ms in r.get_ms]
        figures[backend] = {
            "create p50": percentile(creates, 50),
            "create p99": percentile(creates, 99),
            "get p50": percentile(gets, 50),
            "get p99": percentile(gets, 99),
            "create+get/s": statistics.median(r.calls_rate for r in mine),
            "done/s": statistics.median(r.done_rate for r in mine),
        }
    return figures


def print_table(figures: dict[str, dict[str, float]]) -> None:
    columns = ("create p50", "create p99", "get p50", "get p99", "create+get/s", "done/s")
    print(f"{'backend':<11}" + "".join(f"{name:>14}" for name in columns))
    print(f"{'':<11}" + "".join(f"{unit:>14}" for unit in ("ms",) * 4 + ("jobs/s",) * 2))
    for backend, values in figures.items():
        print(f"{backend:<11}" + "".join(f"{values[name]:14.2f}" for name in columns))
    sqlite, postgres = figures["sqlite"], figures["postgresql"]
    print(
        f"{'pg/sqlite':<11}"
        + "".join(
            f"{postgres[name] / sqlite[name] if sqlite[name] else float('nan'):14.2f}"
            for name in columns
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=200, help="jobs per round and backend")
    parser.add_argument("--callers", type=int, default=8, help="concurrent callers")
    parser.add_argument("--tenants", type=int, default=4, help="tenants the jobs are spread over")
    parser.add_argument("--repeat", type=int, default=1, help="timed rounds of each backend")
    parser.add_argument("--scenes", type=int, default=4, help="scenes per job")
    parser.add_argument("--in-flight", type=int, default=8, help="jobs the runner runs at once")
    parser.add_argument("--pool-size", type=int, default=10, help="PostgreSQL connections")
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to wait for a round's jobs"
    )
    parser.add_argument("--keep", type=Path, help="keep the work files (databases) here")
    args = parser.parse_args(argv)
    for name in ("jobs", "callers", "tenants", "repeat", "scenes", "in_flight", "pool_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")

    work = args.keep or Path(tempfile.mkdtemp(prefix="storyreel-bench-jobs-"))
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"{args.jobs} jobs of {args.scenes} no-op scenes from {args.callers} callers over "
        f"{args.tenants} tenants; {args.in_flight} jobs in flight; {args.repeat} round(s) "
        f"per backend; {os.cpu_count()} CPUs",
        flush=True,
    )
    try:
        rounds = asyncio.run(bench(args, work))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    figures = summarise(rounds)
    print_table(figures)
    print(f"load average: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    sqlite, postgres = figures["sqlite"], figures["postgresql"]
    print(f"postgresql/sqlite done ratio: {postgres['done/s'] / sqlite['done/s']:.2f}")
    print(f"postgresql/sqlite ratio: {postgres['create+get/s'] / sqlite['create+get/s']:.2f}")
    print(f"jobs/s (postgresql): {postgres['create+get/s']:.1f}")
    print(f"jobs/s: {sqlite['create+get/s']:.1f}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "gateway"))
    sys.exit(main())
