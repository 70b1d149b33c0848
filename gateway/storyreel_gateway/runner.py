"""The gateway's core: admits jobs, has them run, and answers for them.

No gRPC types here: the servicer converts messages to these calls. Every call
names the tenant making it; a job of another tenant is reported as not found,
so tenants cannot even learn each other's job ids.

The work is split by concern (see gateway/README.md):
:mod:`~storyreel_gateway.admission` checks requests,
:mod:`~storyreel_gateway.store` keeps every job in the database,
:mod:`~storyreel_gateway.ownership` decides which replica runs which job,
:mod:`~storyreel_gateway.pipeline` runs one job through the stages, and
:mod:`~storyreel_gateway.uploads` takes audio uploads.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import struct
from collections.abc import AsyncIterable, AsyncIterator, Callable

from storyreel.errors import FailedPrecondition, InvalidInput, NotFound
from storyreel.ids import new_job_id
from storyreel.image_prompts import PromptTooLong, reassemble_prompts
from storyreel.narration_language import load_detector
from storyreel.storage import READ_CHUNK_BYTES, ArtifactReader, ArtifactStore
from storyreel.storyboard import Storyboard
from storyreel_gateway.admission import (
    Admission,
    ComposerFacts,
    VoiceCatalog,
    check_storyboard_version,
)
from storyreel_gateway.jobs import (
    EventKind,
    JobError,
    JobEvent,
    JobRecord,
    JobSpec,
    JobState,
)
from storyreel_gateway.ownership import Replica
from storyreel_gateway.pipeline import JobPipeline
from storyreel_gateway.settings import GatewaySettings
from storyreel_gateway.store import JobStore, is_damaged
from storyreel_gateway.uploads import StoredImage, StoredUpload, Uploads

log = logging.getLogger(__name__)


class JobRunner:
    """The gateway's operations on jobs and uploads, for one tenant at a time."""

    def __init__(
        self,
        settings: GatewaySettings,
        store: ArtifactStore,
        jobs: JobStore,
        pipeline: JobPipeline,
        instance_id: str = "",
        composer: ComposerFacts | None = None,
    ) -> None:
        """``composer`` answers for voices and uploads (admission refuses what it would
        refuse); without it (benchmarks) voices and uploads are not checked with it."""
        self.settings = settings
        self.store = store
        self.jobs = jobs
        self.pipeline = pipeline
        voices = VoiceCatalog(composer) if composer is not None else None
        self.admission = Admission(settings, store, voices, jobs)
        if voices is not None and pipeline.narration_check is None:
            # A generated storyboard's language is known only once it is written: the
            # pipeline checks it with the same rule before drawing anything.
            pipeline.narration_check = self.admission.check_narration_language
        self.replica = Replica(settings, jobs, pipeline, store, instance_id)
        self.uploads = Uploads(settings, store, jobs, self.replica.instance_id, composer)
        self._housekeeping: asyncio.Task[None] | None = None
        self._detector: asyncio.Task[None] | None = None

    @property
    def instance_id(self) -> str:
        return self.replica.instance_id

    async def start(self) -> None:
        # The language model admission uses (about a second) loads in the background, so
        # that start-up does not wait for it; a CreateVideo that needs it first waits.
        self._detector = asyncio.create_task(
            asyncio.to_thread(load_detector), name="load-language-model"
        )
        self.uploads.open()
        await self.jobs.listen()
        await self.replica.start()
        self._housekeeping = asyncio.create_task(self._expire_uploads(), name="expire-uploads")

    async def stop_claiming(self) -> None:
        """Claim no more jobs (the replica is stopping); running ones go on."""
        self.replica.stop_claiming()

    async def close(self, release: bool = True) -> None:
        if self._detector is not None:
            await asyncio.gather(self._detector, return_exceptions=True)
            self._detector = None
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            await asyncio.gather(self._housekeeping, return_exceptions=True)
            self._housekeeping = None
        await self.replica.close(release)
        await self.jobs.close()
        self.uploads.close()

    async def _expire_uploads(self) -> None:
        interval = min(60.0, self.settings.upload_ttl_s / 4)
        while True:
            try:
                await self.uploads.expire()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("expiring uploads failed; trying again")
            await asyncio.sleep(interval)

    # -- creating jobs ----------------------------------------------------------------------

    async def create(self, tenant: str, spec: JobSpec, idempotency_key: str = "") -> JobRecord:
        """Validate, admit and queue a job; returns its record (QUEUED or RUNNING).

        With an idempotency key, a repeated request returns the job it started
        before (on any replica); a different request under the same key is
        AlreadyExists.
        """
        self.admission.check_idempotency_key(idempotency_key)
        fingerprint = self.admission.request_hash(spec)
        checked = await self.admission.admit(spec, tenant)
        record = JobRecord(
            job_id=new_job_id(),
            spec=checked,
            tenant=tenant,
            idempotency_key=idempotency_key,
            request_hash=fingerprint,
        )
        s = self.settings
        reserved = self.replica.reserve()
        try:
            claim = (self.instance_id, s.lease_s, s.max_jobs_running_per_tenant)
            stored, created = await self.jobs.create(
                record, self.admission.limits, claim if reserved else None
            )
            if created:
                log.info(
                    "job created", extra={"job_id": stored.job_id, "scenes": checked.scene_count}
                )
                if stored.lease_id:
                    self.replica.launch(stored)
        finally:
            if reserved:
                self.replica.unreserve()
        return stored

    # -- reading jobs -----------------------------------------------------------------------

    async def get(self, tenant: str, job_id: str) -> JobRecord:
        """The job as the database has it; NotFound for another tenant's."""
        if not _JOB_ID.fullmatch(job_id):
            raise NotFound(f"job {_shown(job_id)} does not exist")
        record = await self.jobs.get(job_id)
        if record.tenant != tenant:
            raise NotFound(f"job {_shown(job_id)} does not exist")
        return await self._checked(record)

    async def _checked(self, record: JobRecord) -> JobRecord:
        """A DONE job whose video is gone from the store is shown FAILED, saying so."""
        if record.state is not JobState.DONE or not record.video_uri:
            return record
        try:
            present = await asyncio.to_thread(self.store.exists, record.video_uri)
        except Exception as exc:  # the store is unreachable: say nothing we do not know
            log.warning(
                "could not check a video", extra={"job_id": record.job_id, "error": str(exc)}
            )
            return record
        if present:
            return record
        damaged = record.model_copy(deep=True)
        damaged.state = JobState.FAILED
        damaged.error = JobError(
            stage=None,
            code="DATA_LOSS",
            message=f"the job's video {record.video_uri} is missing from the artifact store; "
            "regenerate a scene to make it again",
        )
        return damaged

    async def watch(self, tenant: str, job_id: str) -> AsyncIterator[JobEvent]:
        """A snapshot of the job, then its events from the database until it finishes.

        The stream also ends when the job reaches REVIEW (its REVIEW event; of a job
        already in REVIEW, the snapshot): nothing happens until it is approved.
        """
        record = await self.get(tenant, job_id)
        seq = await self.jobs.last_event_seq(job_id)
        # The snapshot is read after the sequence number: no event between them is lost.
        record = await self.get(tenant, job_id)
        yield JobEvent(EventKind.SNAPSHOT, record, record.stage)
        if record.state.finished or is_damaged(record):
            # A finished job's stream still ends as every stream does.
            yield JobEvent(EventKind.JOB_FINISHED, record, record.stage)
            return
        if record.state is JobState.REVIEW:
            return
        generation = record.generation
        while True:
            wake = self.jobs.signals.current(job_id)
            record, events = await self.jobs.events_after(job_id, seq)
            for event in events:
                seq = event.seq
                if event.generation != generation:
                    # A new run began (RegenerateScene) after this one ended.
                    return
                yield JobEvent(event.kind, record, event.stage, event.scene_index, event.message)
                if event.kind in (EventKind.JOB_FINISHED, EventKind.REVIEW):
                    return
            if record.state is JobState.REVIEW and not events:
                return  # in review: nothing happens until it is approved
            if record.state.finished and not events:
                # Ended without an event of this run (its row was damaged, say).
                yield JobEvent(EventKind.JOB_FINISHED, record, record.stage)
                return
            await self.jobs.signals.wait(wake, self.settings.watch_poll_s)

    async def list(
        self, tenant: str, page_size: int, page_token: str
    ) -> tuple[list[JobRecord], str]:
        """The tenant's jobs, newest first; returns (page, next_page_token)."""
        s = self.settings
        size = page_size or s.default_page_size
        if not 1 <= size <= s.max_page_size:
            raise InvalidInput(f"page_size must be between 1 and {s.max_page_size} (got {size})")
        cursor = _decode_token(page_token) if page_token else None
        # One job more than a page tells whether another page follows.
        rows = await self.jobs.list(tenant, cursor, size + 1)
        more = len(rows) > size
        rows = rows[:size]
        token = _encode_token(rows[-1][0]) if more else ""
        records = await asyncio.gather(*(self._checked(record) for _, record in rows))
        return list(records), token

    # -- acting on jobs ---------------------------------------------------------------------

    async def cancel(self, tenant: str, job_id: str) -> JobRecord:
        """Stop the job in whatever stage it is, on whichever replica; it ends CANCELLED."""
        if not _JOB_ID.fullmatch(job_id):
            # Never a job: answered before the database sees it (PostgreSQL refuses a NUL).
            raise NotFound(f"job {_shown(job_id)} does not exist")
        local = self.replica.local(job_id)
        if local is not None and local.tenant == tenant and not local.state.finished:
            await self.replica.cancel_here(local)
            return await self.get(tenant, job_id)
        record, ended = await self.jobs.request_cancel(tenant, job_id)
        if ended:
            log.info("job cancelled while nobody ran it", extra={"job_id": job_id})
            return record
        log.info("cancel requested", extra={"job_id": job_id, "owner": record.owner})
        return await self._wait_until_finished(tenant, job_id, self.settings.cancel_wait_s)

    async def _wait_until_finished(self, tenant: str, job_id: str, timeout_s: float) -> JobRecord:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            wake = self.jobs.signals.current(job_id)
            record = await self.get(tenant, job_id)
            if record.state.finished or loop.time() >= deadline:
                return record
            await self.jobs.signals.wait(
                wake, min(self.settings.watch_poll_s, max(0.0, deadline - loop.time()))
            )

    async def regenerate(
        self, tenant: str, job_id: str, index: int, prompt: str | None, seed: int | None
    ) -> JobRecord:
        """Draw one scene again (new prompt and/or seed) and compose the video again.

        The job is queued for a new run (any replica may run it); the scene's
        old image and the old video stay readable under their own URIs.
        """

        # The video is composed again with the job's voice: the composer must still have it.
        await self.admission.check_voice((await self.get(tenant, job_id)).spec.voice)

        def change(record: JobRecord) -> None:
            cleaned = self.admission.check_regeneration(record, index, prompt, seed)
            record.reset_scene(index, cleaned, seed)

        record = await self.jobs.requeue(tenant, job_id, change, self.admission.limits)
        log.info(
            "scene regenerating",
            extra={"job_id": job_id, "scene": index, "seed": record.requested_seed(index)},
        )
        return record

    async def update_storyboard(
        self,
        tenant: str,
        job_id: str,
        board: Storyboard,
        hints: list[int],
        version: int,
    ) -> JobRecord:
        """Replace the job's storyboard (UpdateStoryboard), its scenes numbered 1..N.

        In REVIEW the job stays in REVIEW. A DONE or FAILED job is queued for a new
        run (:meth:`JobRecord.replace_storyboard`: only scenes whose picture changed
        are drawn again; the video is composed again under new URIs, the old ones
        stay readable). FailedPrecondition while it is queued or running, or once
        cancelled; Aborted for a stale ``version``; InvalidInput for a bad storyboard.
        """
        current = await self.get(tenant, job_id)  # NotFound first, for another's job
        # A scene whose shot or cast changed but whose prompt the editor left alone gets
        # its prompt assembled again, as the LLM service assembles its own.
        try:
            board = reassemble_prompts(current.storyboard, board, hints)
        except PromptTooLong as exc:
            raise InvalidInput(f"storyboard.{exc}") from None
        self.admission.check_edited_storyboard(board)
        # Its language as at CreateVideo: a voice of the composer's must speak it.
        await self.admission.check_narration_language(current.spec, board)
        # Reference images, checked as at CreateVideo (the job's consistency mode).
        edited_spec = current.spec.model_copy(update={"storyboard": board})
        self.admission.check_references(edited_spec, tenant)
        await self.admission._check_reference_uploads(edited_spec, tenant)
        if current.state in (JobState.DONE, JobState.FAILED):
            # A new run composes again with the job's voice: the composer must still have it.
            await self.admission.check_voice(current.spec.voice)

        def change(record: JobRecord) -> bool:
            _check_editable(record)
            check_storyboard_version(record, version)
            redraw = record.replace_storyboard(board, hints)
            if record.state is JobState.REVIEW:
                return False
            log.info("storyboard edited; new run", extra={"job_id": job_id, "redraw": redraw})
            return True

        return await self.jobs.revise(tenant, job_id, change, self.admission.limits)

    async def approve_storyboard(self, tenant: str, job_id: str, version: int) -> JobRecord:
        """Let a job in REVIEW go on (ApproveStoryboard): it is queued to render and compose.

        FailedPrecondition for a job not in REVIEW; Aborted for a stale ``version``.
        """
        current = await self.get(tenant, job_id)
        await self.admission.check_voice(current.spec.voice)
        if current.storyboard is not None:
            # The written story's language, before anything is drawn for it.
            await self.admission.check_narration_language(current.spec, current.storyboard)

        def change(record: JobRecord) -> bool:
            if record.state is not JobState.REVIEW:
                raise FailedPrecondition(
                    f"job {job_id} is {record.state.value}, not in review: only a job created "
                    "with review waits for approval"
                )
            check_storyboard_version(record, version)
            record.approve()
            return True

        record = await self.jobs.revise(tenant, job_id, change, self.admission.limits)
        log.info("storyboard approved", extra={"job_id": job_id, "version": version})
        return record

    def public_url(self, uri: str) -> str:
        return self.store.public_url(uri) if uri else ""

    # -- results ----------------------------------------------------------------------------

    async def open_artifact(
        self, tenant: str, job_id: str, uri: str, offset: int = 0
    ) -> ArtifactReader:
        """Open one artifact of the tenant's job to stream it (:meth:`artifact_chunks`).

        Only the URIs the job lists (:func:`artifact_uris`) can be read. Another
        tenant's job, a URI the job does not list and an artifact gone from the
        store all raise the same NotFound, so the answer never tells whether an
        object exists outside what the caller already knows.
        """
        if offset < 0:
            raise InvalidInput(f"offset must not be negative (got {offset})")
        record = await self.get(tenant, job_id)
        missing = NotFound(f"job {_shown(job_id)} has no artifact {_shown_uri(uri)}")
        if uri not in artifact_uris(record):
            raise missing
        try:
            return await asyncio.to_thread(self.store.open_read, uri, offset, READ_CHUNK_BYTES)
        except NotFound:
            raise missing from None

    @staticmethod
    async def artifact_chunks(reader: ArtifactReader) -> AsyncIterator[bytes]:
        """The reader's bytes, a chunk at a time (one chunk in memory); closes it."""
        try:
            while chunk := await asyncio.to_thread(reader.read_chunk):
                yield chunk
        finally:
            reader.close()

    # -- uploads ----------------------------------------------------------------------------

    async def upload_audio(
        self,
        tenant: str,
        chunks: AsyncIterable[bytes],
        *,
        filename: Callable[[], str] = str,
    ) -> StoredUpload:
        """Store an uploaded audio file the composer accepts, with what its probe found.

        Nothing is kept on failure; a refusal names the caller's ``filename()``.
        """
        return await self.uploads.receive(tenant, chunks, filename=filename)

    async def upload_image(self, tenant: str, chunks: AsyncIterable[bytes]) -> StoredImage:
        """Store an uploaded PNG, JPEG or WebP image (a character's reference image).

        Nothing is kept on failure.
        """
        return await self.uploads.receive_image(tenant, chunks)


def _check_editable(record: JobRecord) -> None:
    """UpdateStoryboard is for a job in REVIEW or a finished one that may run again."""
    if record.state in (JobState.REVIEW, JobState.DONE, JobState.FAILED):
        return
    if record.state is JobState.CANCELLED:
        raise FailedPrecondition(
            f"job {record.job_id} was cancelled; its storyboard can no longer change"
        )
    raise FailedPrecondition(
        f"job {record.job_id} is {record.state.value}; its storyboard can change once it "
        "ends (or cancel it)"
    )


_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def _shown(job_id: str) -> str:
    """A job id as it may appear in a message: quoted, and cut short."""
    return repr(job_id[:64]) + ("..." if len(job_id) > 64 else "")


def _shown_uri(uri: str) -> str:
    """A URI as it may appear in a message: quoted, and cut short."""
    return repr(uri[:256]) + ("..." if len(uri) > 256 else "")


def artifact_uris(record: JobRecord) -> set[str]:
    """Every artifact URI the job lists, which ReadArtifact may stream.

    Its current images (and their reference portraits), video, captions,
    poster and contact sheet, every earlier version, and its own upload.
    """
    uris = {
        record.video_uri,
        record.captions_srt_uri,
        record.captions_vtt_uri,
        record.poster_uri,
        record.contact_sheet_uri,
        record.spec.audio_uri,
    }
    for image in record.images:
        uris.add(image.uri)
        uris.update(image.reference_uris)
    uris.update(version.uri for version in record.versions)
    uris.discard("")
    return uris


def _encode_token(cursor: tuple[float, str]) -> str:
    created, job_id = cursor
    return base64.urlsafe_b64encode(struct.pack(">d", created) + job_id.encode()).decode()


def _decode_token(token: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(token.encode())
        created = struct.unpack(">d", raw[:8])[0]
        job_id = raw[8:].decode("ascii")
    except (ValueError, TypeError, struct.error, UnicodeDecodeError):
        raise InvalidInput("page_token is not one this gateway returned") from None
    if not _JOB_ID.fullmatch(job_id):
        raise InvalidInput("page_token is not one this gateway returned")
    return created, job_id
