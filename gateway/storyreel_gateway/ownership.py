"""Which replica runs which job: claims, leases, adoption, cancel and hand-back.

Any number of gateway replicas share one database. A job waits in the
``jobs`` table until a replica with a free slot claims it
(:meth:`~storyreel_gateway.store.JobStore.claim_next`: one transaction, rows
locked with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, fair across tenants).
The claim is a lease on the database clock, renewed every ``lease_s / 3``;
every write of the run is fenced on it. So:

* a replica that dies stops renewing, its leases lapse, and any replica with a
  free slot adopts its jobs within about ``lease_s``, resuming each where its
  record says it is;
* a replica that stalls past its lease and comes back finds its claim gone
  (LeaseLost) and stops the run without writing anything more;
* a replica that stops gracefully hands its jobs back at once;
* a restarted container with the same instance id (a pod name) takes back
  what it left without waiting for the leases.

A cancel asked on another replica is written in the job's row; the owner
hears of it through the database (a notification on PostgreSQL, else its
poll every ``cancel_poll_s``) and ends the run CANCELLED.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import secrets
import socket
from collections.abc import Awaitable, Callable

from storyreel.errors import StoryreelError
from storyreel.ids import job_key
from storyreel.storage import ArtifactStore
from storyreel_gateway.jobs import JobRecord, JobState
from storyreel_gateway.pipeline import JobPipeline
from storyreel_gateway.settings import GatewaySettings
from storyreel_gateway.store import (
    CANCEL_TOPIC,
    QUEUE_TOPIC,
    JobStore,
    LeaseLost,
    Signals,
    is_damaged,
    manifest_json,
)

log = logging.getLogger(__name__)


def default_instance_id() -> str:
    """Host name (the pod name in Kubernetes), process id and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class Replica:
    """Claims and runs jobs on this gateway process, up to ``max_jobs_in_flight`` at once."""

    def __init__(
        self,
        settings: GatewaySettings,
        jobs: JobStore,
        pipeline: JobPipeline,
        artifacts: ArtifactStore,
        instance_id: str = "",
    ) -> None:
        self.settings = settings
        self.jobs = jobs
        self.pipeline = pipeline
        self.artifacts = artifacts
        self.instance_id = instance_id or settings.instance_id or default_instance_id()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._records: dict[str, JobRecord] = {}
        # Slots promised to jobs being created here (claimed in the same transaction).
        self._reserved = 0
        self._claiming = False
        self._loops: list[asyncio.Task[None]] = []
        self._exports: set[asyncio.Task[None]] = set()

    # -- slots ------------------------------------------------------------------------------

    @property
    def free_slots(self) -> int:
        return self.settings.max_jobs_in_flight - len(self._tasks) - self._reserved

    def reserve(self) -> bool:
        """Hold a slot for a job about to be created here; False when none is free."""
        if not self._claiming or self.free_slots <= 0:
            return False
        self._reserved += 1
        return True

    def unreserve(self) -> None:
        self._reserved -= 1

    def runs(self, job_id: str) -> bool:
        return job_id in self._tasks

    # -- start and stop ---------------------------------------------------------------------

    async def start(self) -> None:
        """Take back what an earlier process with this id left, then claim, renew, cancel."""
        taken = await self.jobs.release_owner(self.instance_id)
        if taken:
            log.info("took back jobs left by an earlier process", extra={"count": taken})
        self._claiming = True
        s = self.settings
        self._loops = [
            asyncio.create_task(self._claim_loop(), name="claim-jobs"),
            asyncio.create_task(
                _every(s.lease_renew_s, self.renew_leases, first_after=True), name="renew-leases"
            ),
            asyncio.create_task(self._cancel_loop(), name="cancel-requests"),
        ]
        log.info("replica started", extra={"instance": self.instance_id})

    def stop_claiming(self) -> None:
        """Claim no more jobs (the replica is stopping); running ones go on."""
        self._claiming = False

    async def close(self, release: bool = True) -> None:
        """Stop every loop and running job without ending the jobs.

        With ``release`` (a graceful stop) the jobs are handed back, so another
        replica claims them at once; without it they are left as a killed
        process leaves them, to be adopted when their leases lapse.
        """
        self._claiming = False
        loops, self._loops = self._loops, []
        for loop in loops:
            loop.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        records = dict(self._records)
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*self._exports, return_exceptions=True)
        if not release:
            return
        leases = {
            job_id: record.lease_id
            for job_id, record in records.items()
            if not record.state.finished and record.lease_id
        }
        try:
            await self.jobs.release(leases)
        except Exception as exc:  # their leases lapse instead
            log.warning("could not hand back jobs", extra={"error": str(exc)})

    # -- claiming -----------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        s = self.settings
        while True:
            wake = self.jobs.signals.current(QUEUE_TOPIC)
            try:
                await self.claim_jobs()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("claiming jobs failed; trying again")
            jitter = random.uniform(1 - s.claim_jitter, 1 + s.claim_jitter)
            await Signals.wait(wake, s.claim_poll_s * jitter)

    async def claim_jobs(self) -> int:
        """Claim jobs while this replica has free slots; returns how many it started."""
        started = 0
        while self._claiming and self.free_slots > 0:
            record = await self.jobs.claim_next(
                self.instance_id, self.settings.lease_s, self.settings.max_jobs_running_per_tenant
            )
            if record is None:
                break
            if is_damaged(record):
                continue  # the store marked it FAILED; it says why wherever it is read
            if record.owner != self.instance_id:
                continue
            log.info("job claimed", extra={"job_id": record.job_id, "stage": record.stage})
            self.launch(record)
            started += 1
        return started

    def launch(self, record: JobRecord) -> None:
        """Run a job this replica holds the claim of."""
        task = asyncio.create_task(self._run(record), name=f"job-{record.job_id}")
        self._tasks[record.job_id] = task
        self._records[record.job_id] = record

    async def _run(self, record: JobRecord) -> None:
        try:
            if record.cancel_requested:
                await self.pipeline.end(record, JobState.CANCELLED, None)
            else:
                await self.pipeline.run(record)
        except LeaseLost:
            log.warning(
                "job claimed by another replica; stopped here", extra={"job_id": record.job_id}
            )
        except asyncio.CancelledError:
            # Cancelled before the run began: a cancel still ends the job.
            if record.cancel_requested and not record.state.finished:
                await self.pipeline.end(record, JobState.CANCELLED, None)
            raise
        finally:
            self._tasks.pop(record.job_id, None)
            self._records.pop(record.job_id, None)
            self.jobs.signals.fire(QUEUE_TOPIC)  # a slot is free
            if record.state.finished and self.settings.export_manifests:
                export = asyncio.create_task(self._export(record.model_copy(deep=True)))
                self._exports.add(export)
                export.add_done_callback(self._exports.discard)

    async def _export(self, record: JobRecord) -> None:
        try:
            key = job_key(record.job_id, "manifest.json")
            await asyncio.to_thread(
                self.artifacts.put_bytes, key, manifest_json(record), "application/json"
            )
        except Exception as exc:  # an export only; the database has the job
            log.warning(
                "manifest export failed", extra={"job_id": record.job_id, "error": str(exc)}
            )

    # -- leases -------------------------------------------------------------------------------

    async def renew_leases(self) -> None:
        """Extend the claim of every job running here; stop the runs whose claim is gone."""
        leases = {
            job_id: record.lease_id
            for job_id, record in self._records.items()
            if not record.state.finished
        }
        kept = await self.jobs.renew(leases, self.settings.lease_s)
        for job_id in leases.keys() - kept:
            await self._let_go(job_id)

    async def _let_go(self, job_id: str) -> None:
        """Stop running a job here without ending it: another replica runs it."""
        log.warning("lost the claim on a job; stopping its run", extra={"job_id": job_id})
        task = self._tasks.get(job_id)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # -- cancel -------------------------------------------------------------------------------

    async def _cancel_loop(self) -> None:
        while True:
            wake = self.jobs.signals.current(CANCEL_TOPIC)
            try:
                if self._tasks:
                    await self.honour_cancel_requests()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reading cancel requests failed; trying again")
            await Signals.wait(wake, self.settings.cancel_poll_s)

    async def honour_cancel_requests(self) -> None:
        """Cancel the jobs running here that a cancel was asked for, on any replica."""
        for job_id, generation in await self.jobs.cancel_requests(self.instance_id):
            record = self._records.get(job_id)
            if record is not None and record.generation == generation:
                log.info("cancel requested", extra={"job_id": job_id})
                await self.cancel_here(record)

    async def cancel_here(self, record: JobRecord) -> None:
        """End a job running here CANCELLED, in whatever stage it is."""
        record.cancel_requested = True
        task = self._tasks.get(record.job_id)
        if task is None:
            return
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    def local(self, job_id: str) -> JobRecord | None:
        return self._records.get(job_id)


async def _every(
    interval_s: float, step: Callable[[], Awaitable[object]], first_after: bool = False
) -> None:
    if first_after:
        await asyncio.sleep(interval_s)
    while True:
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except StoryreelError as exc:
            log.warning("%s failed: %s", getattr(step, "__name__", "step"), exc.message)
        except Exception:
            log.exception("%s failed; trying again", getattr(step, "__name__", "step"))
        await asyncio.sleep(interval_s)
