"""The gateway's core: admits jobs, runs them, and answers for them.

No gRPC types here: the servicer converts messages to these calls. Every call
names the tenant making it; a job of another tenant is reported as not found,
so tenants cannot even learn each other's job ids.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import secrets
import tempfile
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path

from storyreel.errors import AlreadyExists, FailedPrecondition, InvalidInput, NotFound, Overloaded
from storyreel.ids import new_job_id
from storyreel.storage import ArtifactStore
from storyreel_gateway.audio import SNIFF_BYTES, sniff_audio
from storyreel_gateway.jobs import EventKind, JobEvent, JobRecord, JobSpec, JobState, JobStore
from storyreel_gateway.pipeline import JobPipeline, scene_seed
from storyreel_gateway.settings import GatewaySettings

log = logging.getLogger(__name__)


class JobRunner:
    """Admits video jobs within the configured limits and runs each in the background."""

    def __init__(
        self,
        settings: GatewaySettings,
        store: ArtifactStore,
        jobs: JobStore,
        pipeline: JobPipeline,
    ) -> None:
        self.settings = settings
        self.store = store
        self.jobs = jobs
        self.pipeline = pipeline
        self._slots = asyncio.Semaphore(settings.max_jobs_in_flight)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._waiting = 0
        self._running = 0
        self._admission = asyncio.Lock()
        self._idempotency: dict[tuple[str, str], str] = {}

    # -- admission ------------------------------------------------------------------------

    @staticmethod
    def upload_prefix(tenant: str) -> str:
        """Folder of a tenant's uploads (a digest: object keys never hold names)."""
        return f"uploads/{hashlib.sha256(tenant.encode()).hexdigest()[:16]}/"

    def validate(self, spec: JobSpec, tenant: str) -> JobSpec:
        """Apply defaults and limits; InvalidInput names the first problem found."""
        s = self.settings
        prompt = spec.prompt.strip()
        if not prompt:
            raise InvalidInput("prompt must not be empty")
        if len(prompt) > s.max_prompt_chars:
            raise InvalidInput(
                f"prompt is {len(prompt)} characters; the limit is {s.max_prompt_chars}"
            )
        scene_count = spec.scene_count or s.default_scenes
        if not s.min_scenes <= scene_count <= s.max_scenes:
            raise InvalidInput(
                f"scene_count must be between {s.min_scenes} and {s.max_scenes} (got {scene_count})"
            )
        if len(spec.style) > s.max_style_chars:
            raise InvalidInput(f"style is longer than {s.max_style_chars} characters")
        width = spec.width or s.video_width
        height = spec.height or s.video_height
        for name, value in (("width", width), ("height", height)):
            if value < 64 or value > s.max_video_side or value % 8:
                raise InvalidInput(
                    f"{name} must be a multiple of 8 between 64 and {s.max_video_side} "
                    f"(got {value})"
                )
        fps = spec.fps or s.video_fps
        if not 1 <= fps <= 60:
            raise InvalidInput(f"fps must be between 1 and 60 (got {fps})")
        if spec.audio_uri:
            key = self.store.key_of(spec.audio_uri)  # InvalidInput: not one of our artifacts
            if not key.startswith(self.upload_prefix(tenant)) or not self.store.exists(
                spec.audio_uri
            ):
                raise InvalidInput(f"audio_uri {spec.audio_uri} does not exist; upload it first")
        seed = spec.seed or secrets.randbits(62)
        return spec.model_copy(
            update={
                "prompt": prompt,
                "scene_count": scene_count,
                "width": width,
                "height": height,
                "fps": fps,
                "seed": seed,
            }
        )

    @staticmethod
    def request_hash(spec: JobSpec) -> str:
        return hashlib.sha256(spec.model_dump_json().encode()).hexdigest()

    def _admit(self) -> None:
        if self._running + self._waiting >= (
            self.settings.max_jobs_in_flight + self.settings.max_jobs_queued
        ):
            raise Overloaded(
                f"{self._running} jobs are running and {self._waiting} are queued "
                "(the gateway's limit); try again later"
            )

    async def create(self, tenant: str, spec: JobSpec, idempotency_key: str = "") -> JobRecord:
        """Validate, admit and start a job; returns its record (QUEUED or RUNNING).

        With an idempotency key, a repeated request returns the job it started
        before; a different request under the same key is AlreadyExists.
        """
        if len(idempotency_key) > self.settings.max_idempotency_key_chars:
            raise InvalidInput(
                f"idempotency_key is longer than {self.settings.max_idempotency_key_chars} "
                "characters"
            )
        fingerprint = self.request_hash(spec)
        async with self._admission:
            if idempotency_key:
                existing_id = self._idempotency.get((tenant, idempotency_key))
                if existing_id is not None:
                    existing = self.jobs.get(existing_id)
                    if existing.request_hash != fingerprint:
                        raise AlreadyExists(
                            f"idempotency_key {idempotency_key!r} was used for a different "
                            f"request (job {existing_id})"
                        )
                    return existing
            checked = await asyncio.to_thread(self.validate, spec, tenant)
            self._admit()
            record = JobRecord(
                job_id=new_job_id(),
                spec=checked,
                tenant=tenant,
                idempotency_key=idempotency_key,
                request_hash=fingerprint,
            )
            await self.jobs.add(record)
            if idempotency_key:
                self._idempotency[(tenant, idempotency_key)] = record.job_id
        log.info("job created", extra={"job_id": record.job_id, "scenes": checked.scene_count})
        self._start(record)
        return record

    def _start(self, record: JobRecord) -> None:
        self._waiting += 1
        task = asyncio.create_task(self._run(record), name=f"job-{record.job_id}")
        self._tasks[record.job_id] = task
        task.add_done_callback(lambda _t, job_id=record.job_id: self._tasks.pop(job_id, None))

    async def _run(self, record: JobRecord) -> None:
        waiting = True
        try:
            async with self._slots:
                self._waiting -= 1
                waiting = False
                self._running += 1
                try:
                    await self.pipeline.run(record)
                finally:
                    self._running -= 1
        except asyncio.CancelledError:
            if waiting:
                self._waiting -= 1
                if record.cancel_requested and not record.state.finished:
                    await self.pipeline.end(record, JobState.CANCELLED, None)

    async def resume(self) -> int:
        """Load every manifest and restart the jobs that had not finished; returns how many."""
        records = await self.jobs.load_manifests()
        for record in records:
            if record.idempotency_key:
                self._idempotency[(record.tenant, record.idempotency_key)] = record.job_id
        unfinished = sorted(
            (r for r in records if not r.state.finished), key=lambda r: r.created_at
        )
        for record in unfinished:
            log.info("resuming job", extra={"job_id": record.job_id, "stage": record.stage})
            self._start(record)
        return len(unfinished)

    # -- per-job actions ------------------------------------------------------------------

    def get(self, tenant: str, job_id: str) -> JobRecord:
        record = self.jobs.get(job_id)
        if record.tenant != tenant:
            raise NotFound(f"job {job_id!r} does not exist")
        return record

    def watch(self, tenant: str, job_id: str) -> AsyncIterator[JobEvent]:
        self.get(tenant, job_id)
        return self.jobs.watch(job_id)

    def list(self, tenant: str, page_size: int, page_token: str) -> tuple[list[JobRecord], str]:
        """The tenant's jobs, newest first; returns (page, next_page_token)."""
        s = self.settings
        size = page_size or s.default_page_size
        if not 1 <= size <= s.max_page_size:
            raise InvalidInput(f"page_size must be between 1 and {s.max_page_size} (got {size})")
        jobs = sorted(
            (r for r in self.jobs.all() if r.tenant == tenant),
            key=lambda r: (r.created_at, r.job_id),
            reverse=True,
        )
        if page_token:
            after = _decode_token(page_token)
            jobs = [r for r in jobs if (r.created_at.isoformat(), r.job_id) < after]
        page = jobs[:size]
        more = len(jobs) > size
        token = _encode_token(page[-1]) if more and page else ""
        return page, token

    async def cancel(self, tenant: str, job_id: str) -> JobRecord:
        """Stop the job in whatever stage it is; it ends CANCELLED."""
        record = self.get(tenant, job_id)
        if record.state.finished:
            raise FailedPrecondition(f"job {job_id} already ended {record.state.value}")
        record.cancel_requested = True
        task = self._tasks.get(job_id)
        if task is None:
            await self.pipeline.end(record, JobState.CANCELLED, None)
            return record
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if not record.state.finished:  # cancelled before it ever ran
            await self.pipeline.end(record, JobState.CANCELLED, None)
        return record

    async def regenerate(
        self, tenant: str, job_id: str, index: int, prompt: str | None, seed: int | None
    ) -> JobRecord:
        """Draw one scene again (new prompt and/or seed) and compose the video again."""
        record = self.get(tenant, job_id)
        if not record.state.finished:
            raise FailedPrecondition(f"job {job_id} is still {record.state.value}; wait or cancel")
        if record.storyboard is None:
            raise FailedPrecondition(f"job {job_id} has no storyboard to regenerate from")
        indices = [scene.index for scene in record.storyboard.scenes]
        if index not in indices:
            raise InvalidInput(
                f"index must be between {min(indices)} and {max(indices)} (got {index})"
            )
        if prompt is not None:
            prompt = prompt.strip()
            if not prompt:
                raise InvalidInput("prompt, when given, must not be empty")
            if len(prompt) > self.settings.max_prompt_chars:
                raise InvalidInput(f"prompt is longer than {self.settings.max_prompt_chars}")
        if seed is not None and not 0 <= seed < 2**63:
            raise InvalidInput("seed must be between 0 and 2**63-1")
        async with self._admission:
            self._admit()
            scene = next(s for s in record.storyboard.scenes if s.index == index)
            if prompt is not None:
                scene.image_prompt = prompt
            if seed is not None:
                record.seed_overrides[index] = seed
            record.images = [i for i in record.images if i.index != index]
            record.video_uri = ""
            record.state = JobState.QUEUED
            record.error = None
            record.cancel_requested = False
            await self.jobs.update(record, EventKind.SNAPSHOT)
        log.info(
            "scene regenerating",
            extra={
                "job_id": job_id,
                "scene": index,
                "seed": record.seed_overrides.get(index, scene_seed(record.spec.seed, index)),
            },
        )
        self._start(record)
        return record

    def public_url(self, uri: str) -> str:
        return self.store.public_url(uri) if uri else ""

    # -- uploads --------------------------------------------------------------------------

    async def upload_audio(self, tenant: str, chunks: AsyncIterable[bytes]) -> tuple[str, int]:
        """Store an uploaded audio file; returns (uri, size). Nothing is kept on failure."""
        limit = self.settings.max_upload_bytes
        size = 0
        head = b""
        with tempfile.TemporaryDirectory(prefix="storyreel-upload-") as tmp:
            path = Path(tmp) / "upload"
            with path.open("wb") as fh:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise InvalidInput(f"audio upload is larger than {limit} bytes")
                    if len(head) < SNIFF_BYTES:
                        head += chunk[: SNIFF_BYTES - len(head)]
                    fh.write(chunk)
            if size == 0:
                raise InvalidInput("audio upload is empty")
            ext = sniff_audio(head)
            if ext is None:
                raise InvalidInput(
                    "upload is not audio in a supported format (wav, mp3, ogg, flac, m4a, aac)"
                )
            key = f"{self.upload_prefix(tenant)}{uuid.uuid4().hex}/audio.{ext}"
            uri = await asyncio.to_thread(self.store.put_file, key, path)
        log.info("audio uploaded", extra={"uri": uri, "bytes": size})
        return uri, size

    async def close(self) -> None:
        """Stop running jobs without ending them: the next gateway resumes them."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _encode_token(record: JobRecord) -> str:
    raw = json.dumps([record.created_at.isoformat(), record.job_id]).encode()
    return base64.urlsafe_b64encode(raw).decode()


def _decode_token(token: str) -> tuple[str, str]:
    try:
        created, job_id = json.loads(base64.urlsafe_b64decode(token.encode()))
        return str(created), str(job_id)
    except (ValueError, TypeError):
        raise InvalidInput("page_token is not one this gateway returned") from None
