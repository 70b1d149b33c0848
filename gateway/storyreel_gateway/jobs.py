"""Job records, their manifests in the artifact store, and live job events.

A job's record is written to ``jobs/<id>/manifest.json`` at every transition,
so the artifact store always holds the latest state of every job. The manifest
also says which gateway replica runs the job (``owner``) and until when that
replica's claim holds (``lease_until``); see :mod:`storyreel_gateway.runner`.

A replica keeps in memory only the jobs it runs. Any other job is read from
its manifest, and watching it means following the manifest: the events are
derived from the differences between two reads (:func:`events_between`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

from storyreel.errors import InvalidInput, NotFound
from storyreel.ids import job_key
from storyreel.storage import ArtifactStore

if TYPE_CHECKING:
    from storyreel_gateway.index import JobIndex

log = logging.getLogger(__name__)


def now() -> datetime:
    return datetime.now(UTC)


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


class Stage(StrEnum):
    STORYBOARD = "storyboard"
    RENDER = "render"
    COMPOSE = "compose"


#: Share of the progress bar each stage covers (they add up to 100).
STAGE_WEIGHTS = {Stage.STORYBOARD: 15.0, Stage.RENDER: 60.0, Stage.COMPOSE: 25.0}


class Character(BaseModel):
    name: str
    appearance: str


class StoryScene(BaseModel):
    index: int
    narration: str
    image_prompt: str
    characters: list[str] = Field(default_factory=list)


class Storyboard(BaseModel):
    title: str
    characters: list[Character] = Field(default_factory=list)
    scenes: list[StoryScene]
    style: str = ""
    degraded: bool = False


class SceneImage(BaseModel):
    index: int
    uri: str
    seed: int


class StageRecord(BaseModel):
    stage: Stage
    state: JobState
    started_at: datetime
    finished_at: datetime | None = None
    duration_s: float | None = None


class JobError(BaseModel):
    stage: Stage | None = None
    # gRPC status code name, e.g. DEADLINE_EXCEEDED.
    code: str
    message: str


class JobSpec(BaseModel):
    """What the caller asked for; fixed once the job exists."""

    prompt: str
    scene_count: int
    style: str = ""
    seed: int
    audio_uri: str = ""
    # 0 x 0 when the shape is asked for by aspect and resolution instead.
    width: int
    height: int
    fps: int
    # Frame shape and short side of the video; "" leaves width and height to decide.
    aspect: Literal["", "16:9", "9:16", "1:1"] = ""
    resolution: Literal["", "480p", "720p", "1080p"] = ""
    # How the images keep each character's look; "" is the render service's default.
    consistency: Literal[
        "", "none", "seed_lock", "consistent_self_attention", "reference_images"
    ] = ""
    captions: Literal["", "burned", "sidecar", "off"] = ""
    # What audio_uri is: the whole sound track, or music under the narration.
    audio_mode: Literal["", "narration", "soundtrack", "music"] = ""
    voice: str = ""


class JobRecord(BaseModel):
    job_id: str
    spec: JobSpec
    # Who owns the job; every read and action is checked against it.
    tenant: str = ""
    idempotency_key: str = ""
    # Fingerprint of the original request, to tell a retry from a different request.
    request_hash: str = ""
    state: JobState = JobState.QUEUED
    stage: Stage | None = None
    progress: float = 0.0
    stages: list[StageRecord] = Field(default_factory=list)
    error: JobError | None = None
    storyboard: Storyboard | None = None
    images: list[SceneImage] = Field(default_factory=list)
    video_uri: str = ""
    duration_s: float = 0.0
    scene_starts_s: list[float] = Field(default_factory=list)
    # What the composer made besides the video, and the video's size.
    video_width: int = 0
    video_height: int = 0
    video_fps: int = 0
    captions_srt_uri: str = ""
    captions_vtt_uri: str = ""
    poster_uri: str = ""
    contact_sheet_uri: str = ""
    # Seeds chosen for single scenes by RegenerateScene (scene index -> seed).
    seed_overrides: dict[int, int] = Field(default_factory=dict)
    # Set by CancelJob: a job interrupted without it (the gateway stopping) resumes later.
    cancel_requested: bool = False
    created_at: datetime = Field(default_factory=now)
    updated_at: datetime = Field(default_factory=now)
    # When the current run began (a resumed or regenerated job runs again).
    run_started_at: datetime | None = None
    eta_s: float = 0.0
    # The gateway replica running the job, and until when its claim holds. A replica
    # renews the lease of each job it runs; once it lapses another replica may adopt it.
    owner: str = ""
    lease_until: datetime | None = None
    # Random id of the claim that made ``owner`` the owner (two claims by one replica differ).
    lease_id: str = ""
    # Runs started by the user: 0 for CreateVideo, +1 for each RegenerateScene.
    generation: int = 0

    def lease_expired(self, at: datetime) -> bool:
        return self.lease_until is None or self.lease_until <= at

    def estimate_eta(self) -> None:
        """Extrapolate the time left from the progress made since this run began."""
        if self.state.finished or not self.run_started_at or self.progress <= 0:
            self.eta_s = 0.0
            return
        elapsed = (now() - self.run_started_at).total_seconds()
        self.eta_s = round(elapsed * (100.0 - self.progress) / self.progress, 1)


class EventKind(StrEnum):
    SNAPSHOT = "snapshot"
    STAGE_STARTED = "stage_started"
    STAGE_FINISHED = "stage_finished"
    SCENE_RENDERED = "scene_rendered"
    JOB_FINISHED = "job_finished"
    RETRYING = "retrying"


@dataclass(frozen=True)
class JobEvent:
    kind: EventKind
    job: JobRecord
    stage: Stage | None = None
    scene_index: int = 0
    message: str = ""


def events_between(before: JobRecord, after: JobRecord) -> list[JobEvent]:
    """The events that took ``before`` to ``after`` (two reads of one job's manifest).

    Stage records that appeared are STAGE_STARTED, stages that closed DONE are
    STAGE_FINISHED, new images are SCENE_RENDERED (placed in the latest render
    stage) and the end of the job is JOB_FINISHED. Retries leave no trace in
    the manifest, so they are not reported. A new run (RegenerateScene) between
    the two reads is reported as a SNAPSHOT.
    """
    snapshot = after.model_copy(deep=True)
    if after.generation != before.generation:
        return [JobEvent(EventKind.SNAPSHOT, snapshot, after.stage)]
    events: list[JobEvent] = []
    drawn = {image.index for image in before.images}
    new_images = [image for image in after.images if image.index not in drawn]
    renders = [i for i, record in enumerate(after.stages) if record.stage is Stage.RENDER]
    last_render = renders[-1] if renders else None
    for i, record in enumerate(after.stages):
        was = before.stages[i] if i < len(before.stages) else None
        if was is None:
            events.append(JobEvent(EventKind.STAGE_STARTED, snapshot, record.stage))
        if i == last_render:
            events += [
                JobEvent(EventKind.SCENE_RENDERED, snapshot, Stage.RENDER, image.index)
                for image in new_images
            ]
            new_images = []
        closed_now = record.finished_at is not None and (was is None or was.finished_at is None)
        if closed_now and record.state is JobState.DONE:
            events.append(JobEvent(EventKind.STAGE_FINISHED, snapshot, record.stage))
    events += [
        JobEvent(EventKind.SCENE_RENDERED, snapshot, Stage.RENDER, image.index)
        for image in new_images
    ]
    if after.state.finished and not before.state.finished:
        events.append(JobEvent(EventKind.JOB_FINISHED, snapshot, after.stage))
    return events


#: Tells the watchers of a job that this replica stopped running it.
_HANDED_OFF = object()


class JobStore:
    """The jobs this replica runs, every job's manifest, and live events.

    ``local`` holds the records of the jobs running (or queued) here; they are
    the freshest copy and every change to them is persisted. Jobs of other
    replicas, and finished ones, are read from their manifests.
    """

    def __init__(self, store: ArtifactStore, index: JobIndex, watch_poll_s: float = 0.5) -> None:
        self.store = store
        self.index = index
        self.watch_poll_s = watch_poll_s
        self.local: dict[str, JobRecord] = {}
        self._watchers: dict[str, set[asyncio.Queue]] = {}
        # Writes of one job go through one lock, so the last write holds the newest state.
        self._write_locks: dict[str, asyncio.Lock] = {}

    def manifest_key(self, job_id: str) -> str:
        return job_key(job_id, "manifest.json")

    async def add(self, record: JobRecord) -> None:
        """A new job of this replica: keep it and write its first manifest."""
        self.local[record.job_id] = record
        await self.persist(record)

    def adopt(self, record: JobRecord) -> None:
        """A job this replica took over (its manifest already names this replica)."""
        self.local[record.job_id] = record

    def forget(self, record: JobRecord) -> None:
        """This replica no longer runs this run of the job; watchers follow the manifest."""
        if self.local.get(record.job_id) is not record:
            return  # already forgotten, or a later run of the job took its place
        del self.local[record.job_id]
        self._write_locks.pop(record.job_id, None)
        for queue in self._watchers.get(record.job_id, ()):
            queue.put_nowait(_HANDED_OFF)

    async def read(self, job_id: str) -> JobRecord:
        """The job as its manifest says; NotFound if there is none."""
        try:
            key = self.manifest_key(job_id)
        except InvalidInput:
            raise NotFound(f"job {job_id!r} does not exist") from None
        try:
            data = await asyncio.to_thread(self.store.get_bytes, self.store.uri_for(key))
        except NotFound:
            raise NotFound(f"job {job_id!r} does not exist") from None
        try:
            return JobRecord.model_validate_json(data)
        except ValueError as exc:
            log.error("unreadable job manifest %s: %s", key, exc)
            raise NotFound(f"job {job_id!r} does not exist") from None

    async def current(self, job_id: str) -> JobRecord:
        """The freshest record: this replica's own, else the manifest."""
        record = self.local.get(job_id)
        return record if record is not None else await self.read(job_id)

    async def update(
        self,
        record: JobRecord,
        kind: EventKind,
        stage: Stage | None = None,
        scene_index: int = 0,
        message: str = "",
    ) -> None:
        """Persist ``record`` and tell every watcher what happened.

        When the job ended, its shared markers are removed before the watchers
        hear of it, so a caller that saw the end sees no trace of the run left.
        """
        record.updated_at = now()
        record.estimate_eta()
        await self.persist(record)
        if kind is EventKind.JOB_FINISHED:
            try:
                await self.index.retire(record.job_id, record.generation)
            except Exception as exc:  # the replicas' scan removes what is left
                log.warning("could not remove the markers of a finished job: %s", exc)
        event = JobEvent(kind, record.model_copy(deep=True), stage, scene_index, message)
        for queue in self._watchers.get(record.job_id, ()):
            queue.put_nowait(event)

    async def persist(self, record: JobRecord) -> None:
        """Write the manifest (no event): the record as it is when the write starts."""
        lock = self._write_locks.setdefault(record.job_id, asyncio.Lock())
        async with lock:
            data = record.model_dump_json(indent=2).encode()
            write = asyncio.ensure_future(
                asyncio.to_thread(
                    self.store.put_bytes, self.manifest_key(record.job_id), data, "application/json"
                )
            )
            try:
                await asyncio.shield(write)
            except asyncio.CancelledError:
                # A write in flight still lands: keep the lock until it has, so that no
                # later write (a lease handed back, say) can land before it.
                await asyncio.gather(write, return_exceptions=True)
                raise

    async def watch(self, job_id: str) -> AsyncIterator[JobEvent]:
        """A snapshot of the job, then every event until the job finishes.

        A job running here is followed through its live events; a job running
        on another replica (or one that leaves this replica) through its
        manifest, read every ``watch_poll_s``.
        """
        last: JobRecord
        local = self.local.get(job_id)
        if local is not None:
            queue: asyncio.Queue = asyncio.Queue()
            self._watchers.setdefault(job_id, set()).add(queue)
            try:
                last = local.model_copy(deep=True)
                yield JobEvent(EventKind.SNAPSHOT, last, last.stage)
                if last.state.finished:
                    return
                while True:
                    event = await queue.get()
                    if event is _HANDED_OFF:
                        break
                    yield event
                    last = event.job
                    if event.kind is EventKind.JOB_FINISHED:
                        return
            finally:
                watchers = self._watchers.get(job_id)
                if watchers is not None:
                    watchers.discard(queue)
                    if not watchers:
                        del self._watchers[job_id]
        else:
            last = await self.read(job_id)
            yield JobEvent(EventKind.SNAPSHOT, last.model_copy(deep=True), last.stage)
            if last.state.finished:
                return
        while True:
            await asyncio.sleep(self.watch_poll_s)
            current = (await self.current(job_id)).model_copy(deep=True)
            for event in events_between(last, current):
                yield event
            last = current
            if current.state.finished:
                return
