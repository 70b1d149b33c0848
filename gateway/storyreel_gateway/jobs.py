"""Job records, their manifests in the artifact store, and live job events.

A job's record is written to ``jobs/<id>/manifest.json`` at every transition,
so the artifact store always holds the latest state of every job.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from pydantic import BaseModel, Field

from storyreel.errors import NotFound
from storyreel.ids import job_key
from storyreel.storage import ArtifactStore

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
    width: int
    height: int
    fps: int


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
    # Seeds chosen for single scenes by RegenerateScene (scene index -> seed).
    seed_overrides: dict[int, int] = Field(default_factory=dict)
    # Set by CancelJob: a job interrupted without it (the gateway stopping) resumes later.
    cancel_requested: bool = False
    created_at: datetime = Field(default_factory=now)
    updated_at: datetime = Field(default_factory=now)
    # When the current run began (a resumed or regenerated job runs again).
    run_started_at: datetime | None = None
    eta_s: float = 0.0

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


class JobStore:
    """Every job this gateway knows, persisted as manifests, with live events."""

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store
        self._jobs: dict[str, JobRecord] = {}
        self._watchers: dict[str, set[asyncio.Queue[JobEvent]]] = {}

    def manifest_key(self, job_id: str) -> str:
        return job_key(job_id, "manifest.json")

    async def add(self, record: JobRecord) -> None:
        self._jobs[record.job_id] = record
        await self._persist(record)

    def get(self, job_id: str) -> JobRecord:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise NotFound(f"job {job_id!r} does not exist") from None

    def all(self) -> list[JobRecord]:
        return list(self._jobs.values())

    async def load_manifests(self) -> list[JobRecord]:
        """Read every job manifest in the store (at start-up); returns the records read."""

        def read() -> list[JobRecord]:
            records = []
            for uri in self.store.list("jobs/"):
                if not uri.endswith("/manifest.json"):
                    continue
                try:
                    records.append(JobRecord.model_validate_json(self.store.get_bytes(uri)))
                except (ValueError, NotFound) as exc:
                    log.error("unreadable job manifest %s: %s", uri, exc)
            return records

        records = await asyncio.to_thread(read)
        for record in records:
            self._jobs[record.job_id] = record
        return records

    async def update(
        self,
        record: JobRecord,
        kind: EventKind,
        stage: Stage | None = None,
        scene_index: int = 0,
        message: str = "",
    ) -> None:
        """Persist ``record`` and tell every watcher what happened."""
        record.updated_at = now()
        record.estimate_eta()
        await self._persist(record)
        event = JobEvent(kind, record.model_copy(deep=True), stage, scene_index, message)
        for queue in self._watchers.get(record.job_id, ()):
            queue.put_nowait(event)

    async def _persist(self, record: JobRecord) -> None:
        data = record.model_dump_json(indent=2).encode()
        await asyncio.to_thread(
            self.store.put_bytes, self.manifest_key(record.job_id), data, "application/json"
        )

    async def watch(self, job_id: str) -> AsyncIterator[JobEvent]:
        """A snapshot of the job, then every event until the job finishes."""
        record = self.get(job_id)
        queue: asyncio.Queue[JobEvent] = asyncio.Queue()
        self._watchers.setdefault(job_id, set()).add(queue)
        try:
            yield JobEvent(EventKind.SNAPSHOT, record.model_copy(deep=True), record.stage)
            if record.state.finished:
                return
            while True:
                event = await queue.get()
                yield event
                if event.kind is EventKind.JOB_FINISHED:
                    return
        finally:
            watchers = self._watchers.get(job_id)
            if watchers is not None:
                watchers.discard(queue)
                if not watchers:
                    del self._watchers[job_id]
