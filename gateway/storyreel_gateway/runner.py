"""The gateway's core: admits jobs, runs them, and answers for them.

No gRPC types here: the servicer converts messages to these calls. Every call
names the tenant making it; a job of another tenant is reported as not found,
so tenants cannot even learn each other's job ids.

Several replicas, one store
---------------------------
Any number of gateway processes may serve behind one load balancer, sharing
only the artifact store (no database, no replica-to-replica calls). Whichever
replica a call lands on answers it:

* **Ownership.** Each process has an instance id. The replica that runs a job
  is its ``owner`` in the manifest, with a lease (``lease_until``) that it
  renews every ``lease_s / 3`` while the job runs. Before renewing, it reads
  the manifest back: if another replica has claimed the job meanwhile, it
  stops its own run and lets go, so at most one replica keeps running a job.
* **Adoption replaces resume-at-start.** Every unfinished job has a marker
  (:mod:`storyreel_gateway.index`). Every ``lease_s / 3`` (with jitter) each
  replica lists the markers and adopts the unfinished jobs whose lease has
  lapsed, while it has a free slot: a replica that died, or one that stopped
  and handed its jobs back, is replaced within about ``lease_s``. Adopting
  resumes the job where its manifest says it is. A job that names this
  replica's instance id but was last renewed before this process started was
  left by an earlier process with the same id (a restarted container keeps its
  pod name) and is taken back at once; instance ids must therefore be unique
  among running replicas (the default, with a random suffix, always is).
* **Claims without compare-and-set.** S3 gives last-writer-wins and nothing
  more, so a claim (adopting a job, regenerating one, taking an idempotency
  key) is written with a fresh random id, left for ``claim_confirm_s``, then
  read back; the replica whose write is read back won, the others let go.
  Two claims overlap only if one replica takes longer than ``claim_confirm_s``
  between reading the lease and writing its claim; even then the next lease
  renewal makes the loser let go. Lease expiry compares clocks, so replicas'
  clocks must agree to well within ``lease_s`` (NTP does).
* **Reads.** GetJob, WatchJob and ListJobs of a job running elsewhere read its
  manifest; a watch follows it every ``watch_poll_s``. ListJobs pages through
  the tenant's listing folder, whose keys sort newest first.
* **Cancel.** A job running here is cancelled directly. For one running
  elsewhere a cancel request object is written; its owner lists the requests
  every ``cancel_poll_s`` and ends the job CANCELLED, and the caller waits up
  to ``cancel_wait_s`` to answer with the final record. A job whose owner is
  gone is claimed and cancelled on the spot. A request names the run
  (``generation``) it cancels, so a late one never cancels a regenerated job.
* **Idempotency.** A claim object per (tenant, key digest) holds the job id and
  the request's fingerprint; it is checked before a job is created.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import random
import re
import secrets
import socket
import tempfile
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path

from storyreel.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidInput,
    NotFound,
    Overloaded,
    StoryreelError,
)
from storyreel.ids import new_job_id
from storyreel.storage import ArtifactStore
from storyreel_gateway.audio import SNIFF_BYTES, sniff_audio
from storyreel_gateway.index import JobIndex, check_listing_entry, tenant_digest
from storyreel_gateway.jobs import JobEvent, JobRecord, JobSpec, JobState, JobStore, now
from storyreel_gateway.pipeline import JobPipeline, scene_seed
from storyreel_gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

#: Locks that serialise the requests of one idempotency key within a replica.
_KEY_LOCKS = 64
#: A voice name (empty: the composer's default voice).
_VOICE = re.compile(r"[A-Za-z0-9_.-]*")


def default_instance_id() -> str:
    """Host name (the pod name in Kubernetes), process id and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class JobRunner:
    """Admits video jobs within the configured limits and runs each in the background."""

    def __init__(
        self,
        settings: GatewaySettings,
        store: ArtifactStore,
        jobs: JobStore,
        pipeline: JobPipeline,
        index: JobIndex,
        instance_id: str = "",
    ) -> None:
        self.settings = settings
        self.store = store
        self.jobs = jobs
        self.pipeline = pipeline
        self.index = index
        self.instance_id = instance_id or settings.instance_id or default_instance_id()
        self._slots = asyncio.Semaphore(settings.max_jobs_in_flight)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._waiting = 0
        self._running = 0
        # Admitted jobs not started yet (their objects are being written).
        self._reserved = 0
        self._key_locks = [asyncio.Lock() for _ in range(_KEY_LOCKS)]
        self._idempotency: dict[tuple[str, str], str] = {}
        self._loops: list[asyncio.Task[None]] = []
        # Every lease this process writes starts after this moment.
        self._started_at = now()
        self._adopting = True
        # Adoptions under way; each runs to its end even if the loop is cancelled.
        self._adoptions: set[asyncio.Future[bool]] = set()

    @property
    def lease(self) -> timedelta:
        return timedelta(seconds=self.settings.lease_s)

    # -- admission ------------------------------------------------------------------------

    @staticmethod
    def upload_prefix(tenant: str) -> str:
        """Folder of a tenant's uploads (a digest: object keys never hold names)."""
        return f"uploads/{tenant_digest(tenant)}/"

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
        if spec.aspect or spec.resolution:
            if spec.width or spec.height:
                raise InvalidInput("set aspect and resolution, or width and height, not both")
            width = height = 0  # the composer sizes the video from aspect and resolution
        else:
            width = spec.width or s.video_width
            height = spec.height or s.video_height
            for name, value in (("width", width), ("height", height)):
                if value < 64 or value > s.max_video_side or value % 8:
                    raise InvalidInput(
                        f"{name} must be a multiple of 8 between 64 and {s.max_video_side} "
                        f"(got {value})"
                    )
        if spec.audio_mode in ("soundtrack", "music") and not spec.audio_uri:
            raise InvalidInput(f"audio_mode {spec.audio_mode} needs an audio_uri (upload it first)")
        if spec.audio_mode == "narration" and spec.audio_uri:
            raise InvalidInput("audio_mode narration takes no audio_uri")
        if len(spec.voice) > s.max_voice_chars or not _VOICE.fullmatch(spec.voice):
            raise InvalidInput(
                f"voice must be a voice name of at most {s.max_voice_chars} letters, digits, "
                "'-', '_' or '.'"
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

    def _busy(self) -> int:
        return self._running + self._waiting + self._reserved

    def _reserve(self) -> None:
        """Take a place in this replica's admission limit, or raise Overloaded."""
        if self._busy() >= self.settings.max_jobs_in_flight + self.settings.max_jobs_queued:
            raise Overloaded(
                f"{self._running} jobs are running and {self._waiting + self._reserved} are "
                "queued (the gateway's limit); try again later"
            )
        self._reserved += 1

    async def create(self, tenant: str, spec: JobSpec, idempotency_key: str = "") -> JobRecord:
        """Validate, admit and start a job; returns its record (QUEUED or RUNNING).

        With an idempotency key, a repeated request returns the job it started
        before (on any replica); a different request under the same key is
        AlreadyExists.
        """
        if len(idempotency_key) > self.settings.max_idempotency_key_chars:
            raise InvalidInput(
                f"idempotency_key is longer than {self.settings.max_idempotency_key_chars} "
                "characters"
            )
        fingerprint = self.request_hash(spec)
        if not idempotency_key:
            return await self._create(tenant, spec, "", fingerprint)
        lock = self._key_locks[hash((tenant, idempotency_key)) % _KEY_LOCKS]
        async with lock:
            existing = await self._idempotent_job(tenant, idempotency_key, fingerprint)
            if existing is not None:
                return existing
            return await self._create(tenant, spec, idempotency_key, fingerprint)

    async def _create(
        self, tenant: str, spec: JobSpec, idempotency_key: str, fingerprint: str
    ) -> JobRecord:
        checked = await asyncio.to_thread(self.validate, spec, tenant)
        self._reserve()
        started = False
        try:
            record = JobRecord(
                job_id=new_job_id(),
                spec=checked,
                tenant=tenant,
                idempotency_key=idempotency_key,
                request_hash=fingerprint,
                owner=self.instance_id,
                lease_id=secrets.token_hex(8),
                lease_until=now() + self.lease,
            )
            if idempotency_key:
                holder = await self.index.claim_idempotency_key(
                    tenant,
                    idempotency_key,
                    record.job_id,
                    fingerprint,
                    self.settings.claim_confirm_s,
                )
                if holder != record.job_id:
                    # Another replica took the key at the same moment: its job is the answer.
                    existing = await self._idempotent_job(tenant, idempotency_key, fingerprint)
                    if existing is None:
                        raise FailedPrecondition(
                            f"idempotency_key {idempotency_key!r} is being used by another "
                            "request; retry"
                        )
                    return existing
            # The marker first: a job with a manifest but no marker would never be adopted.
            await self.index.mark_active(record.job_id)
            await self.index.add_to_listing(tenant, record.job_id, record.created_at)
            await self.jobs.add(record)
            if idempotency_key:
                self._idempotency[(tenant, idempotency_key)] = record.job_id
            log.info("job created", extra={"job_id": record.job_id, "scenes": checked.scene_count})
            self._start(record)
            started = True
        finally:
            if not started:
                self._reserved -= 1
        return record

    async def _idempotent_job(
        self, tenant: str, idempotency_key: str, fingerprint: str
    ) -> JobRecord | None:
        """The job an earlier request with this key started, if any (AlreadyExists if the
        request differs). Waits a moment for a job another replica is still writing."""
        job_id = self._idempotency.get((tenant, idempotency_key))
        claim = None
        if job_id is None:
            claim = await self.index.idempotency_claim(tenant, idempotency_key)
            if claim is None:
                return None
            job_id = claim.job_id
        while True:
            try:
                existing = await self.jobs.current(job_id)
                break
            except NotFound:
                # The claim's job is not written yet, or its replica died before writing it.
                if claim is None or now() - claim.claimed_at > self.lease:
                    return None
                await asyncio.sleep(max(self.settings.claim_confirm_s, 0.05))
        if existing.tenant != tenant:
            return None
        if existing.request_hash != fingerprint:
            raise AlreadyExists(
                f"idempotency_key {idempotency_key!r} was used for a different "
                f"request (job {job_id})"
            )
        self._idempotency[(tenant, idempotency_key)] = job_id
        return existing

    def _start(self, record: JobRecord) -> None:
        """Run an admitted job (its reservation becomes a place in the queue)."""
        self._reserved -= 1
        self._waiting += 1
        task = asyncio.create_task(self._run(record), name=f"job-{record.job_id}")
        self._tasks[record.job_id] = task

        def done(finished: asyncio.Task[None], job_id: str = record.job_id) -> None:
            if self._tasks.get(job_id) is finished:  # not a later run of the same job
                del self._tasks[job_id]

        task.add_done_callback(done)

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
        finally:
            self.jobs.forget(record)

    # -- ownership --------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the background work: adopting orphaned jobs, renewing leases, cancels."""
        s = self.settings
        self._loops = [
            asyncio.create_task(
                self._every(s.lease_renew_s, s.adopt_jitter, self.adopt_orphans),
                name="adopt-orphans",
            ),
            asyncio.create_task(
                self._every(s.lease_renew_s, 0.0, self.renew_leases, first_after=True),
                name="renew-leases",
            ),
            asyncio.create_task(
                self._every(s.cancel_poll_s, 0.0, self.honour_cancel_requests),
                name="cancel-requests",
            ),
        ]
        log.info("replica started", extra={"instance": self.instance_id})

    async def stop_adopting(self) -> None:
        """Adopt no more jobs (the replica is stopping); running ones go on."""
        self._adopting = False

    @staticmethod
    async def _every(
        interval_s: float,
        jitter: float,
        step: Callable[[], Awaitable[object]],
        first_after: bool = False,
    ) -> None:
        if first_after:
            await asyncio.sleep(interval_s)
        while True:
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("%s failed; trying again", getattr(step, "__name__", "step"))
            await asyncio.sleep(interval_s * random.uniform(1 - jitter, 1 + jitter))

    async def _claim(self, record: JobRecord) -> bool:
        """Make this replica the job's owner; True if the claim held (see the module doc)."""
        record.owner = self.instance_id
        record.lease_id = secrets.token_hex(8)
        record.lease_until = now() + self.lease
        await self.jobs.persist(record)
        await asyncio.sleep(self.settings.claim_confirm_s)
        try:
            stored = await self.jobs.read(record.job_id)
        except NotFound:
            return False
        return stored.lease_id == record.lease_id

    async def adopt_orphans(self) -> int:
        """One pass over the unfinished jobs: adopt those whose owner stopped renewing.

        Adopts only while this replica has a free slot, so orphans go to the
        replicas with room. Also removes markers and cancel requests left by
        runs that ended. Returns how many jobs were adopted.
        """
        orphans: list[JobRecord] = []
        for job_id in await self.index.active_jobs():
            if job_id in self._tasks:
                continue
            try:
                record = await self.jobs.read(job_id)
            except NotFound:
                # Written moments ago (the manifest follows), or its replica died first.
                since = await self.index.active_since(job_id)
                if since is None or now() - since > self.lease:
                    await self.index.unmark_active(job_id)
                continue
            if record.state.finished:
                # Left by a replica that stopped between the two writes (a regenerated
                # job's owner writes its marker again at the next renewal).
                await self.index.unmark_active(job_id)
            elif record.lease_expired(now()) or self._left_by_earlier_self(record):
                orphans.append(record)
        adopted = 0
        for record in sorted(orphans, key=lambda r: r.created_at):
            if not self._adopting or self._busy() >= self.settings.max_jobs_in_flight:
                break
            # Shielded: a claim cut short would leave a lease that nobody renews.
            adoption = asyncio.ensure_future(self._adopt(record))
            self._adoptions.add(adoption)
            adoption.add_done_callback(self._adoptions.discard)
            if await asyncio.shield(adoption):
                adopted += 1
        await self._sweep_cancel_requests()
        return adopted

    def _left_by_earlier_self(self, record: JobRecord) -> bool:
        """Whether an earlier process with this instance id (now gone) ran the job."""
        return (
            record.owner == self.instance_id
            and record.lease_until is not None
            and record.lease_until - self.lease < self._started_at
        )

    async def _adopt(self, record: JobRecord) -> bool:
        previous = record.owner
        self._reserve()
        started = False
        try:
            if not await self._claim(record):
                return False
            if await self.index.cancel_requested(record.job_id, record.generation):
                record.cancel_requested = True
                await self.pipeline.end(record, JobState.CANCELLED, None)
                return False
            log.info(
                "job adopted",
                extra={"job_id": record.job_id, "previous_owner": previous, "stage": record.stage},
            )
            self.jobs.adopt(record)
            self._start(record)
            started = True
            return True
        finally:
            if not started:
                self._reserved -= 1

    async def renew_leases(self) -> None:
        """Extend the lease of every job running here, letting go of any claimed elsewhere."""
        for job_id, record in list(self.jobs.local.items()):
            if record.state.finished or job_id not in self._tasks:
                continue
            try:
                stored = await self.jobs.read(job_id)
                if stored.lease_id != record.lease_id:
                    await self._let_go(job_id, f"claimed by {stored.owner}")
                    continue
                record.lease_until = now() + self.lease
                await self.jobs.persist(record)
                # Again, in case a late clean-up of the previous run removed it.
                await self.index.mark_active(job_id)
            except StoryreelError as exc:
                if record.lease_expired(now()):
                    await self._let_go(job_id, f"lease lapsed: {exc.message}")
                else:
                    log.warning("lease renewal failed", extra={"job_id": job_id, "error": str(exc)})

    async def _let_go(self, job_id: str, reason: str) -> None:
        """Stop running a job here without ending it: another replica runs it."""
        log.warning("letting go of job", extra={"job_id": job_id, "reason": reason})
        task = self._tasks.get(job_id)
        if task is not None:
            task.cancel()  # the run forgets the job as it ends, writing nothing more
            await asyncio.gather(task, return_exceptions=True)

    async def honour_cancel_requests(self) -> None:
        """Cancel the jobs running here that a replica was asked to cancel."""
        if not self._tasks:
            return
        for job_id, generation in await self.index.cancel_requests():
            record = self.jobs.local.get(job_id)
            if record is None or job_id not in self._tasks:
                continue
            if generation < record.generation:
                await self.index.clear_cancel(job_id, generation)
            elif generation == record.generation and not record.state.finished:
                log.info("cancel requested on another replica", extra={"job_id": job_id})
                await self._cancel_here(record)

    async def _sweep_cancel_requests(self) -> None:
        for job_id, generation in await self.index.cancel_requests():
            if job_id in self._tasks:
                continue
            try:
                record = await self.jobs.read(job_id)
            except NotFound:
                await self.index.clear_cancel(job_id, generation)
                continue
            if generation < record.generation or (
                generation == record.generation and record.state.finished
            ):
                await self.index.clear_cancel(job_id, generation)

    async def close(self, release: bool = True) -> None:
        """Stop every loop and running job without ending the jobs.

        With ``release`` (a graceful stop) their leases are handed back, so
        another replica adopts them at its next scan; without it they are left
        as a killed process leaves them, to be adopted when the leases lapse.
        """
        self._adopting = False
        loops, self._loops = self._loops, []
        for loop in loops:
            loop.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        await asyncio.gather(*self._adoptions, return_exceptions=True)
        tasks = dict(self._tasks)
        records = {job_id: self.jobs.local.get(job_id) for job_id in tasks}
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        if not release:
            return
        for job_id, record in records.items():
            if record is None or record.state.finished:
                continue
            try:
                if (await self.jobs.read(job_id)).lease_id != record.lease_id:
                    continue  # claimed by another replica meanwhile
                record.lease_until = now()
                await self.jobs.persist(record)
            except StoryreelError as exc:
                log.warning(
                    "could not hand back a job", extra={"job_id": job_id, "error": str(exc)}
                )

    # -- per-job actions ------------------------------------------------------------------

    async def get(self, tenant: str, job_id: str) -> JobRecord:
        """The job's freshest record, wherever it runs; NotFound for another tenant's."""
        record = await self.jobs.current(job_id)
        if record.tenant != tenant:
            raise NotFound(f"job {job_id!r} does not exist")
        return record

    async def watch(self, tenant: str, job_id: str) -> AsyncIterator[JobEvent]:
        await self.get(tenant, job_id)
        async for event in self.jobs.watch(job_id):
            yield event

    async def list(
        self, tenant: str, page_size: int, page_token: str
    ) -> tuple[list[JobRecord], str]:
        """The tenant's jobs on every replica, newest first; returns (page, next_page_token)."""
        s = self.settings
        size = page_size or s.default_page_size
        if not 1 <= size <= s.max_page_size:
            raise InvalidInput(f"page_size must be between 1 and {s.max_page_size} (got {size})")
        cursor = _decode_token(page_token) if page_token else ""
        page: list[tuple[str, JobRecord]] = []
        # One entry more than a page tells whether another page follows.
        while len(page) <= size:
            entries = await self.index.listing(tenant, cursor, size + 1 - len(page))
            if not entries:
                break
            cursor = entries[-1][0]
            records = await asyncio.gather(*(self._listed(tenant, job_id) for _, job_id in entries))
            page += [(e, r) for (e, _), r in zip(entries, records, strict=True) if r is not None]
        more = len(page) > size
        page = page[:size]
        token = _encode_token(page[-1][0]) if more else ""
        return [record for _, record in page], token

    async def _listed(self, tenant: str, job_id: str) -> JobRecord | None:
        try:
            record = await self.jobs.current(job_id)
        except NotFound:  # its creation did not get as far as the manifest
            return None
        return record if record.tenant == tenant else None

    async def cancel(self, tenant: str, job_id: str) -> JobRecord:
        """Stop the job in whatever stage it is, on whichever replica; it ends CANCELLED."""
        record = await self.get(tenant, job_id)
        if record.state.finished:
            raise FailedPrecondition(f"job {job_id} already ended {record.state.value}")
        if job_id in self._tasks:
            return await self._cancel_here(record)
        if record.lease_expired(now()) and await self._claim(record):
            # Nobody ran it: it ends here.
            record.cancel_requested = True
            await self.pipeline.end(record, JobState.CANCELLED, None)
            return record
        await self.index.request_cancel(job_id, record.generation)
        log.info("cancel requested", extra={"job_id": job_id, "owner": record.owner})
        return await self._wait_until_finished(job_id, self.settings.cancel_wait_s)

    async def _cancel_here(self, record: JobRecord) -> JobRecord:
        record.cancel_requested = True
        task = self._tasks.get(record.job_id)
        if task is None:
            await self.pipeline.end(record, JobState.CANCELLED, None)
            return record
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if not record.state.finished:  # cancelled before it ever ran
            await self.pipeline.end(record, JobState.CANCELLED, None)
        return record

    async def _wait_until_finished(self, job_id: str, timeout_s: float) -> JobRecord:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            record = await self.jobs.current(job_id)
            if record.state.finished or loop.time() >= deadline:
                return record
            await asyncio.sleep(self.settings.watch_poll_s)

    async def regenerate(
        self, tenant: str, job_id: str, index: int, prompt: str | None, seed: int | None
    ) -> JobRecord:
        """Draw one scene again (new prompt and/or seed) and compose the video again.

        Runs on the replica that receives the call, which becomes the job's owner.
        """
        task = self._tasks.get(job_id)
        local = self.jobs.local.get(job_id)
        if task is not None and local is not None and local.state.finished:
            await asyncio.wait({task})  # the run that just ended here is still tidying up
        record = await self.get(tenant, job_id)
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
        self._reserve()
        try:
            record = record.model_copy(deep=True)
            scene = next(s for s in record.storyboard.scenes if s.index == index)
            if prompt is not None:
                scene.image_prompt = prompt
            if seed is not None:
                record.seed_overrides[index] = seed
            record.images = [i for i in record.images if i.index != index]
            record.video_uri = ""
            record.captions_srt_uri = record.captions_vtt_uri = ""
            record.poster_uri = record.contact_sheet_uri = ""
            record.state = JobState.QUEUED
            record.error = None
            record.cancel_requested = False
            record.generation += 1
            record.updated_at = now()
            await self.index.mark_active(job_id)
            if not await self._claim(record):
                raise FailedPrecondition(
                    f"job {job_id} is being regenerated by another request; watch it"
                )
        except BaseException:
            self._reserved -= 1
            raise
        log.info(
            "scene regenerating",
            extra={
                "job_id": job_id,
                "scene": index,
                "seed": record.seed_overrides.get(index, scene_seed(record.spec.seed, index)),
            },
        )
        self.jobs.adopt(record)
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


def _encode_token(entry: str) -> str:
    return base64.urlsafe_b64encode(entry.encode()).decode()


def _decode_token(token: str) -> str:
    try:
        entry = base64.urlsafe_b64decode(token.encode()).decode()
    except (ValueError, TypeError):
        raise InvalidInput("page_token is not one this gateway returned") from None
    return check_listing_entry(entry)
