"""The gateway's core: admits jobs, runs them, and answers for them.

No gRPC types here: the servicer converts messages to these calls.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import tempfile
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path

from storyreel.errors import InvalidInput, Overloaded
from storyreel.ids import new_job_id
from storyreel.storage import ArtifactStore
from storyreel_gateway.audio import SNIFF_BYTES, sniff_audio
from storyreel_gateway.jobs import JobEvent, JobRecord, JobSpec, JobStore
from storyreel_gateway.pipeline import JobPipeline
from storyreel_gateway.settings import GatewaySettings

log = logging.getLogger(__name__)


class JobRunner:
    """Admits video jobs within the configured limits and runs each in the background."""

    def __init__(
        self, settings: GatewaySettings, store: ArtifactStore, jobs: JobStore, pipeline: JobPipeline
    ) -> None:
        self.settings = settings
        self.store = store
        self.jobs = jobs
        self.pipeline = pipeline
        self._slots = asyncio.Semaphore(settings.max_jobs_in_flight)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._waiting = 0

    # -- requests ---------------------------------------------------------------------------

    def validate(self, spec: JobSpec) -> JobSpec:
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
            self.store.key_of(spec.audio_uri)  # InvalidInput when not one of our artifacts
            if not self.store.exists(spec.audio_uri):
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

    async def create(self, spec: JobSpec) -> JobRecord:
        """Validate, admit and start a job; returns its record (QUEUED or RUNNING)."""
        spec = await asyncio.to_thread(self.validate, spec)
        if self._slots.locked() and self._waiting >= self.settings.max_jobs_queued:
            raise Overloaded(
                f"{self.settings.max_jobs_in_flight} jobs are running and "
                f"{self._waiting} are queued; try again later"
            )
        record = JobRecord(job_id=new_job_id(), spec=spec)
        await self.jobs.add(record)
        log.info("job created", extra={"job_id": record.job_id, "scenes": spec.scene_count})
        self._waiting += 1
        task = asyncio.create_task(self._run(record), name=f"job-{record.job_id}")
        self._tasks[record.job_id] = task
        task.add_done_callback(lambda _t, job_id=record.job_id: self._tasks.pop(job_id, None))
        return record

    async def _run(self, record: JobRecord) -> None:
        try:
            async with self._slots:
                self._waiting -= 1
                await self.pipeline.run(record)
        except asyncio.CancelledError:
            if not record.state.finished:
                raise

    def get(self, job_id: str) -> JobRecord:
        return self.jobs.get(job_id)

    def watch(self, job_id: str) -> AsyncIterator[JobEvent]:
        return self.jobs.watch(job_id)

    def public_url(self, uri: str) -> str:
        return self.store.public_url(uri) if uri else ""

    async def upload_audio(self, chunks: AsyncIterable[bytes]) -> tuple[str, int]:
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
            key = f"uploads/{uuid.uuid4().hex}/audio.{ext}"
            uri = await asyncio.to_thread(self.store.put_file, key, path)
        log.info("audio uploaded", extra={"uri": uri, "bytes": size})
        return uri, size

    async def close(self) -> None:
        """Cancel running jobs (each ends CANCELLED in its manifest)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
