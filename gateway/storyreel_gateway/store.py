"""Jobs, their events and uploads in the database: every read and write of job state.

The database is the only source of job state: a replica keeps in memory
nothing another replica needs. Each method is one transaction.

* **Writes of a running job are fenced** on the claim (``lease_id``) that made
  this replica its owner: a replica that lost its claim (it stalled past its
  lease and another adopted the job) gets :class:`LeaseLost` and writes
  nothing more.
* **Events** are rows numbered per job (``job_events.seq``), written in the
  same transaction as the job they describe, under the job's row lock, so a
  reader that follows ``seq`` never misses one.
* **Rows that cannot be read** are not skipped: they come back as FAILED jobs
  whose error says what is wrong (:func:`damaged_record`).

Waiting for a change (a watcher, the scheduler, the owner of a cancelled job)
uses :class:`Signals`: set by this replica's own writes at once, and by other
replicas' writes through PostgreSQL's ``LISTEN/NOTIFY`` (or, on SQLite, which
one machine shares, by the callers' short polls).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import BigInteger, and_, case, cast, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from storyreel.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidInput,
    NotFound,
    Overloaded,
)
from storyreel_gateway.db import Database, job_events, jobs, uploads
from storyreel_gateway.jobs import (
    UNFINISHED,
    EventKind,
    JobError,
    JobEvent,
    JobRecord,
    JobSpec,
    JobState,
    Stage,
    now,
)

log = logging.getLogger(__name__)

#: PostgreSQL notification channel: payloads are a job id, or one of the topics below.
CHANNEL = "storyreel_gateway"
QUEUE_TOPIC = "queue"
CANCEL_TOPIC = "cancel"

_UNFINISHED = [state.value for state in UNFINISHED]


class LeaseLost(Exception):
    """This replica's claim on the job is gone: another replica runs it now."""


@dataclass(frozen=True)
class AdmissionLimits:
    """How many jobs may wait, in all and per tenant (0: no per-tenant limit)."""

    max_queued: int
    max_queued_per_tenant: int = 0


@dataclass(frozen=True)
class StoredEvent:
    seq: int
    generation: int
    kind: EventKind
    stage: Stage | None
    scene_index: int
    message: str


def _epoch(value: datetime) -> float:
    return value.timestamp()


def _datetime(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def damaged_record(job_id: str, tenant: str, created_at: float, problem: str) -> JobRecord:
    """A job whose stored record cannot be read, shown as FAILED with what is wrong."""
    return JobRecord(
        job_id=job_id,
        tenant=tenant,
        spec=JobSpec(prompt="", scene_count=0, seed=0, width=0, height=0, fps=0),
        state=JobState.FAILED,
        error=JobError(
            code="DATA_LOSS",
            message=f"the job's record in the database cannot be read ({problem}); "
            f"its artifacts, if any, are under jobs/{job_id}/ in the artifact store",
        ),
        created_at=_datetime(created_at),
        updated_at=_datetime(created_at),
    )


def _problem(exc: Exception) -> str:
    """A short description of why a record did not parse (never its content)."""
    if isinstance(exc, ValidationError):
        first = exc.errors(include_input=False, include_url=False)[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or "the record"
        return f"{first.get('type', 'invalid')} at {where}"[:200]
    return type(exc).__name__


def record_from_row(row) -> JobRecord:
    """The job a ``jobs`` row holds; the columns win over the JSON document."""
    try:
        record = JobRecord.model_validate_json(row.record)
        if record.job_id != row.job_id:
            raise ValueError("the record names another job")
    except (ValidationError, ValueError) as exc:
        return damaged_record(row.job_id, row.tenant, row.created_at, _problem(exc))
    record.tenant = row.tenant
    record.state = JobState(row.state)
    record.generation = row.generation
    record.owner = row.owner or ""
    record.cancel_requested = bool(row.cancel_requested)
    return record


def is_damaged(record: JobRecord) -> bool:
    return record.error is not None and record.error.code == "DATA_LOSS"


class Signals:
    """Wake-ups for waiters in this process: one per job id or topic."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}

    def current(self, key: str) -> asyncio.Event:
        """The event the next :meth:`fire` of ``key`` sets (take it before reading)."""
        event = self._events.get(key)
        if event is None:
            event = self._events[key] = asyncio.Event()
        return event

    def fire(self, key: str) -> None:
        event = self._events.pop(key, None)
        if event is not None:
            event.set()

    @staticmethod
    async def wait(event: asyncio.Event, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout_s)


@dataclass(frozen=True)
class StoredAudio:
    """A stored upload as the composer's probe found it (None: stored before probes)."""

    duration_s: float | None
    codec: str | None


class JobStore:
    """The job, event and upload tables, with the transactions the gateway needs."""

    def __init__(self, database: Database) -> None:
        self.db = database
        self.signals = Signals()
        self._listener: AsyncConnection | None = None

    # -- notifications --------------------------------------------------------------------

    async def listen(self) -> None:
        """Hear the other replicas' writes at once (PostgreSQL); a no-op on SQLite."""
        if not self.db.postgres or self._listener is not None:
            return
        conn = await self.db.engine.connect()
        raw = await conn.get_raw_connection()

        def heard(_connection, _pid, _channel, payload: str) -> None:
            self.signals.fire(payload)

        await raw.driver_connection.add_listener(CHANNEL, heard)
        self._listener = conn

    async def close(self) -> None:
        if self._listener is not None:
            listener, self._listener = self._listener, None
            try:
                await listener.close()
            except Exception as exc:  # the database may be gone already
                log.warning("could not close the notification listener: %s", exc)

    async def _notify(self, conn: AsyncConnection, *keys: str) -> None:
        """Tell every replica (delivered when the transaction commits) and this one."""
        if self.db.postgres:
            for key in keys:
                await conn.execute(select(func.pg_notify(CHANNEL, key)))

    def _fire(self, *keys: str) -> None:
        for key in keys:
            self.signals.fire(key)

    # -- creating jobs --------------------------------------------------------------------

    async def create(
        self,
        record: JobRecord,
        limits: AdmissionLimits,
        claim: tuple[str, float, int] | None = None,
    ) -> tuple[JobRecord, bool]:
        """Admit and store a new job; returns (job, created).

        With an idempotency key already used by the tenant, returns that job
        (created False); AlreadyExists when its request differs. Overloaded
        when the queue, in all or the tenant's share, is full.

        ``claim`` is (owner, lease_s, max_running_per_tenant) of a replica with a
        free slot: the job is claimed for it at once, unless other jobs are
        waiting (they go first) or the tenant runs its most already.
        """
        async with self.db.write() as conn:
            await self.db.lock(conn, "admission")
            if record.idempotency_key:
                existing = await self._by_idempotency_key(
                    conn, record.tenant, record.idempotency_key
                )
                if existing is not None:
                    return self._same_request(existing, record), False
            await self._check_admission(conn, record.tenant, limits)
            if record.spec.audio_uri:
                await self._use_upload(conn, record.tenant, record.spec.audio_uri, record.job_id)
            for uri in _reference_uris(record):
                await self._use_upload(conn, record.tenant, uri, record.job_id, "reference_uri")
            ownership: dict = {}
            if claim is not None and await self._may_run_now(conn, record.tenant, claim[2]):
                owner, lease_s, _ = claim
                record.lease_id = secrets.token_hex(8)
                record.owner = owner
                record.state = JobState.RUNNING
                ownership = {
                    "owner": owner,
                    "lease_id": record.lease_id,
                    "lease_until": self.db.now() + lease_s,
                }
            try:
                async with conn.begin_nested():
                    await conn.execute(
                        insert(jobs).values(
                            job_id=record.job_id,
                            tenant=record.tenant,
                            idempotency_key=record.idempotency_key or None,
                            request_hash=record.request_hash,
                            state=record.state.value,
                            **ownership,
                            generation=record.generation,
                            queued_seq=self._queue_position(),
                            cancel_requested=False,
                            event_seq=0,
                            created_at=_epoch(record.created_at),
                            updated_at=_epoch(record.updated_at),
                            record=record.model_dump_json(),
                        )
                    )
            except IntegrityError:
                # Another replica took the key between our read and our write.
                existing = await self._by_idempotency_key(
                    conn, record.tenant, record.idempotency_key
                )
                if existing is None:
                    raise
                return self._same_request(existing, record), False
            await self._notify(conn, QUEUE_TOPIC)
        self._fire(QUEUE_TOPIC)
        return record, True

    @staticmethod
    def _same_request(existing: JobRecord, record: JobRecord) -> JobRecord:
        if existing.request_hash != record.request_hash:
            raise AlreadyExists(
                f"idempotency_key {record.idempotency_key!r} was used for a different "
                f"request (job {existing.job_id})"
            )
        return existing

    async def _by_idempotency_key(
        self, conn: AsyncConnection, tenant: str, key: str
    ) -> JobRecord | None:
        row = (
            await conn.execute(
                select(jobs).where(jobs.c.tenant == tenant, jobs.c.idempotency_key == key)
            )
        ).first()
        return record_from_row(row) if row is not None else None

    async def _may_run_now(self, conn: AsyncConnection, tenant: str, max_running: int) -> bool:
        """Whether a new job of ``tenant`` may skip the queue: nothing waits, and the
        tenant runs fewer than ``max_running`` (0: no limit)."""
        clock = self.db.now()
        waiting = (
            await conn.execute(
                select(jobs.c.job_id)
                .where(
                    jobs.c.state.in_(_UNFINISHED),
                    or_(jobs.c.lease_until.is_(None), jobs.c.lease_until < clock),
                )
                .limit(1)
            )
        ).first()
        if waiting is not None:
            return False
        if not max_running:
            return True
        running = (
            await conn.execute(
                select(func.count()).where(
                    jobs.c.tenant == tenant,
                    jobs.c.state == JobState.RUNNING.value,
                    jobs.c.lease_until > clock,
                )
            )
        ).scalar_one()
        return running < max_running

    def _queue_position(self):
        """A job's place in the queue: the database clock in microseconds."""
        return cast(self.db.now() * 1_000_000, BigInteger)

    async def _check_admission(
        self, conn: AsyncConnection, tenant: str, limits: AdmissionLimits
    ) -> None:
        queued = (
            await conn.execute(
                select(
                    func.count(),
                    func.coalesce(func.sum(case((jobs.c.tenant == tenant, 1), else_=0)), 0),
                ).where(jobs.c.state == JobState.QUEUED.value)
            )
        ).one()
        total, mine = int(queued[0]), int(queued[1])
        if limits.max_queued_per_tenant and mine >= limits.max_queued_per_tenant:
            raise Overloaded(
                f"you have {mine} jobs waiting, the most one caller may have queued; "
                "try again when one has started"
            )
        if total >= limits.max_queued:
            raise Overloaded(f"{total} jobs are waiting (the gateway's limit); try again later")

    # -- reading jobs ---------------------------------------------------------------------

    async def get(self, job_id: str) -> JobRecord:
        async with self.db.read() as conn:
            row = (await conn.execute(select(jobs).where(jobs.c.job_id == job_id))).first()
        if row is None:
            raise NotFound(f"job {job_id!r} does not exist")
        return record_from_row(row)

    async def list(
        self, tenant: str, after: tuple[float, str] | None, count: int
    ) -> list[tuple[tuple[float, str], JobRecord]]:
        """Up to ``count`` of the tenant's jobs, newest first, after the cursor ``after``."""
        query = select(jobs).where(jobs.c.tenant == tenant)
        if after is not None:
            created, job_id = after
            query = query.where(
                or_(
                    jobs.c.created_at < created,
                    and_(jobs.c.created_at == created, jobs.c.job_id < job_id),
                )
            )
        query = query.order_by(jobs.c.created_at.desc(), jobs.c.job_id.desc()).limit(count)
        async with self.db.read() as conn:
            rows = (await conn.execute(query)).all()
        return [((row.created_at, row.job_id), record_from_row(row)) for row in rows]

    async def events_after(self, job_id: str, seq: int) -> tuple[JobRecord, list[StoredEvent]]:
        """The job now, and its events numbered above ``seq`` (none newer than the job)."""
        async with self.db.read() as conn:
            row = (await conn.execute(select(jobs).where(jobs.c.job_id == job_id))).first()
            if row is None:
                raise NotFound(f"job {job_id!r} does not exist")
            rows = (
                await conn.execute(
                    select(job_events)
                    .where(
                        job_events.c.job_id == job_id,
                        job_events.c.seq > seq,
                        job_events.c.seq <= row.event_seq,
                    )
                    .order_by(job_events.c.seq)
                )
            ).all()
        events = [
            StoredEvent(
                seq=e.seq,
                generation=e.generation,
                kind=EventKind(e.kind),
                stage=Stage(e.stage) if e.stage else None,
                scene_index=e.scene_index,
                message=e.message,
            )
            for e in rows
        ]
        return record_from_row(row), events

    async def last_event_seq(self, job_id: str) -> int:
        async with self.db.read() as conn:
            seq = (
                await conn.execute(select(jobs.c.event_seq).where(jobs.c.job_id == job_id))
            ).scalar()
        return int(seq or 0)

    # -- the owner's writes ---------------------------------------------------------------

    async def save(
        self,
        record: JobRecord,
        kind: EventKind | None = None,
        stage: Stage | None = None,
        scene_index: int = 0,
        message: str = "",
    ) -> JobEvent | None:
        """Write the job (and the event ``kind``, if any), fenced on its claim.

        LeaseLost when this replica's claim is gone. The job's watchers on
        every replica are woken once the transaction commits.
        """
        record.updated_at = now()
        record.estimate_eta()
        finished = kind is EventKind.JOB_FINISHED
        values = {
            "state": record.state.value,
            "updated_at": _epoch(record.updated_at),
            "record": record.model_dump_json(),
        }
        if record.cancel_requested:
            # Only ever set here: a request another replica wrote must not be undone.
            values["cancel_requested"] = True
        if kind is not None:
            values["event_seq"] = jobs.c.event_seq + 1
        if finished or record.state is JobState.REVIEW:
            # Done, or waiting for a person (REVIEW): nobody holds the job any more.
            values.update(lease_id=None, lease_until=None)
        async with self.db.write() as conn:
            seq = (
                await conn.execute(
                    update(jobs)
                    .where(jobs.c.job_id == record.job_id, jobs.c.lease_id == record.lease_id)
                    .values(**values)
                    .returning(jobs.c.event_seq)
                )
            ).scalar()
            if seq is None:
                raise LeaseLost(record.job_id)
            if kind is not None:
                await conn.execute(
                    insert(job_events).values(
                        job_id=record.job_id,
                        seq=seq,
                        generation=record.generation,
                        kind=kind.value,
                        stage=stage.value if stage else None,
                        scene_index=scene_index,
                        message=message[:2000],
                        created_at=_epoch(record.updated_at),
                    )
                )
                await self._notify(conn, record.job_id)
        if kind is None:
            return None
        self._fire(record.job_id)
        return JobEvent(kind, record.model_copy(deep=True), stage, scene_index, message)

    # -- ownership ------------------------------------------------------------------------

    async def claim_next(
        self, owner: str, lease_s: float, max_running_per_tenant: int = 0
    ) -> JobRecord | None:
        """Claim the next job to run, or None: fairly across tenants, then oldest first.

        Claimable: unfinished and nobody's (queued, handed back, or its owner's
        lease lapsed). The tenant with the fewest jobs running goes first, so
        one tenant's burst never keeps another's first job waiting for more
        than one job's turn.
        """
        clock = self.db.now()
        others = jobs.alias("others")
        running = (
            select(func.count())
            .where(
                others.c.tenant == jobs.c.tenant,
                others.c.state == JobState.RUNNING.value,
                others.c.lease_until > clock,
            )
            .scalar_subquery()
        )
        query = select(jobs).where(
            jobs.c.state.in_(_UNFINISHED),
            or_(jobs.c.lease_until.is_(None), jobs.c.lease_until < clock),
        )
        if max_running_per_tenant:
            query = query.where(running < max_running_per_tenant)
        query = (
            query.order_by(running, jobs.c.queued_seq)
            .limit(1)
            .with_for_update(skip_locked=True, of=jobs)
        )
        lease_id = secrets.token_hex(8)
        async with self.db.write() as conn:
            row = (await conn.execute(query)).first()
            if row is None:
                return None
            record = record_from_row(row)
            if is_damaged(record):
                # Nothing can run it: it ends FAILED, and says why wherever it is read.
                await conn.execute(
                    update(jobs)
                    .where(jobs.c.job_id == row.job_id)
                    .values(
                        state=JobState.FAILED.value, owner=None, lease_id=None, lease_until=None
                    )
                )
                log.error("unreadable job record", extra={"job_id": row.job_id})
                return record
            await conn.execute(
                update(jobs)
                .where(jobs.c.job_id == row.job_id)
                .values(
                    state=JobState.RUNNING.value,
                    owner=owner,
                    lease_id=lease_id,
                    lease_until=clock + lease_s,
                )
            )
        record.state = JobState.RUNNING
        record.owner = owner
        record.lease_id = lease_id
        return record

    async def renew(self, leases: dict[str, str], lease_s: float) -> set[str]:
        """Extend the claims ``{job_id: lease_id}``; returns the jobs whose claim held."""
        kept: set[str] = set()
        if not leases:
            return kept
        async with self.db.write() as conn:
            clock = self.db.now()
            for job_id, lease_id in leases.items():
                held = (
                    await conn.execute(
                        update(jobs)
                        .where(jobs.c.job_id == job_id, jobs.c.lease_id == lease_id)
                        .values(lease_until=clock + lease_s)
                        .returning(jobs.c.job_id)
                    )
                ).scalar()
                if held is not None:
                    kept.add(job_id)
        return kept

    async def release(self, leases: dict[str, str]) -> None:
        """Hand claimed jobs back (this replica is stopping): any replica may take them."""
        if not leases:
            return
        async with self.db.write() as conn:
            for job_id, lease_id in leases.items():
                await conn.execute(
                    update(jobs)
                    .where(
                        jobs.c.job_id == job_id,
                        jobs.c.lease_id == lease_id,
                        jobs.c.state.in_(_UNFINISHED),
                    )
                    .values(
                        state=JobState.QUEUED.value, owner=None, lease_id=None, lease_until=None
                    )
                )
            await self._notify(conn, QUEUE_TOPIC)

    async def release_owner(self, owner: str) -> int:
        """Hand back every job ``owner`` holds: an earlier process with this instance id."""
        async with self.db.write() as conn:
            result = await conn.execute(
                update(jobs)
                .where(jobs.c.owner == owner, jobs.c.state.in_(_UNFINISHED))
                .values(state=JobState.QUEUED.value, owner=None, lease_id=None, lease_until=None)
            )
            if result.rowcount:
                await self._notify(conn, QUEUE_TOPIC)
        return result.rowcount or 0

    # -- cancel and regenerate ------------------------------------------------------------

    async def _locked_job(
        self, conn: AsyncConnection, tenant: str, job_id: str
    ) -> tuple[Any, JobRecord]:
        """The row of ``tenant``'s job ``job_id``, locked until the transaction ends, and its
        record; NotFound for a job that does not exist or is another tenant's."""
        row = (
            await conn.execute(select(jobs).where(jobs.c.job_id == job_id).with_for_update())
        ).first()
        if row is None or row.tenant != tenant:
            raise NotFound(f"job {job_id!r} does not exist")
        return row, record_from_row(row)

    async def request_cancel(self, tenant: str, job_id: str) -> tuple[JobRecord, bool]:
        """Ask for the job's end; returns (job, ended here).

        A job nobody runs (queued, or its owner gone) ends CANCELLED at once in
        this transaction. A running one gets the request in its row, and its
        owner (on any replica) is told.
        """
        async with self.db.write() as conn:
            row, record = await self._locked_job(conn, tenant, job_id)
            if record.state.finished:
                raise FailedPrecondition(f"job {job_id} already ended {record.state.value}")
            clock = await self.db.clock(conn)
            unowned = row.lease_until is None or row.lease_until < clock
            record.cancel_requested = True
            if not unowned:
                await conn.execute(
                    update(jobs).where(jobs.c.job_id == job_id).values(cancel_requested=True)
                )
                await self._notify(conn, CANCEL_TOPIC)
                ended = False
            else:
                record.finish(JobState.CANCELLED)
                record.updated_at = now()
                seq = row.event_seq + 1
                await conn.execute(
                    update(jobs)
                    .where(jobs.c.job_id == job_id)
                    .values(
                        state=JobState.CANCELLED.value,
                        cancel_requested=True,
                        owner=None,
                        lease_id=None,
                        lease_until=None,
                        event_seq=seq,
                        updated_at=_epoch(record.updated_at),
                        record=record.model_dump_json(),
                    )
                )
                await conn.execute(
                    insert(job_events).values(
                        job_id=job_id,
                        seq=seq,
                        generation=record.generation,
                        kind=EventKind.JOB_FINISHED.value,
                        stage=record.stage.value if record.stage else None,
                        created_at=_epoch(record.updated_at),
                    )
                )
                await self._notify(conn, job_id)
                ended = True
        self._fire(CANCEL_TOPIC, job_id)
        return record, ended

    async def cancel_requests(self, owner: str) -> list[tuple[str, int]]:
        """(job_id, generation) of this owner's jobs whose cancel was asked for."""
        async with self.db.read() as conn:
            rows = (
                await conn.execute(
                    select(jobs.c.job_id, jobs.c.generation).where(
                        jobs.c.owner == owner,
                        jobs.c.cancel_requested.is_(True),
                        jobs.c.state.in_(_UNFINISHED),
                    )
                )
            ).all()
        return [(row.job_id, row.generation) for row in rows]

    async def requeue(
        self,
        tenant: str,
        job_id: str,
        change: Callable[[JobRecord], None],
        limits: AdmissionLimits,
    ) -> JobRecord:
        """Apply ``change`` to a finished job and queue it to run again (RegenerateScene)."""
        async with self.db.write() as conn:
            await self.db.lock(conn, "admission")
            _, record = await self._locked_job(conn, tenant, job_id)
            if is_damaged(record):
                raise FailedPrecondition(record.error.message)
            if not record.state.finished:
                raise FailedPrecondition(
                    f"job {job_id} is still {record.state.value}; wait or cancel"
                )
            change(record)  # raises InvalidInput / FailedPrecondition for a bad request
            await self._check_admission(conn, tenant, limits)
            await conn.execute(
                update(jobs)
                .where(jobs.c.job_id == job_id)
                .values(
                    state=JobState.QUEUED.value,
                    generation=record.generation,
                    queued_seq=self._queue_position(),
                    owner=None,
                    lease_id=None,
                    lease_until=None,
                    cancel_requested=False,
                    updated_at=_epoch(record.updated_at),
                    record=record.model_dump_json(),
                )
            )
            await self._notify(conn, QUEUE_TOPIC)
        self._fire(QUEUE_TOPIC)
        return record

    async def revise(
        self,
        tenant: str,
        job_id: str,
        change: Callable[[JobRecord], bool],
        limits: AdmissionLimits,
    ) -> JobRecord:
        """Apply ``change`` to the job under its row lock (UpdateStoryboard,
        ApproveStoryboard); queue it to run when ``change`` returns True.

        ``change`` raises (FailedPrecondition, Aborted, InvalidInput) to refuse, and
        then nothing is written. Queueing meets the queue limits (Overloaded), as
        CreateVideo does.
        """
        async with self.db.write() as conn:
            await self.db.lock(conn, "admission")
            _, record = await self._locked_job(conn, tenant, job_id)
            if is_damaged(record):
                raise FailedPrecondition(record.error.message)
            queue = change(record)
            if queue:
                await self._check_admission(conn, tenant, limits)
            # Reference images the edited storyboard names are tied to the job (no expiry).
            board = record.storyboard
            for uri in dict.fromkeys(c.reference_uri for c in (board.characters if board else ())):
                if uri:
                    await self._use_upload(conn, tenant, uri, job_id, "reference_uri")
            values: dict[str, Any] = {
                "updated_at": _epoch(record.updated_at),
                "record": record.model_dump_json(),
            }
            if queue:
                values.update(
                    state=JobState.QUEUED.value,
                    generation=record.generation,
                    queued_seq=self._queue_position(),
                    owner=None,
                    lease_id=None,
                    lease_until=None,
                    cancel_requested=False,
                )
            await conn.execute(update(jobs).where(jobs.c.job_id == job_id).values(**values))
            if queue:
                await self._notify(conn, QUEUE_TOPIC)
        if queue:
            self._fire(QUEUE_TOPIC)
        return record

    # -- import ---------------------------------------------------------------------------

    async def import_record(self, record: JobRecord) -> bool:
        """Store a job read from an older manifest, as it was; False if it exists already.

        An unfinished job is queued to be resumed.
        """
        waits = record.state.finished or record.state is JobState.REVIEW
        state = record.state if waits else JobState.QUEUED
        async with self.db.write() as conn:
            exists = (
                await conn.execute(select(jobs.c.job_id).where(jobs.c.job_id == record.job_id))
            ).first()
            if exists is not None:
                return False
            key_taken = record.idempotency_key and (
                await self._by_idempotency_key(conn, record.tenant, record.idempotency_key)
            )
            await conn.execute(
                insert(jobs).values(
                    job_id=record.job_id,
                    tenant=record.tenant,
                    idempotency_key=None if key_taken else (record.idempotency_key or None),
                    request_hash=record.request_hash,
                    state=state.value,
                    generation=record.generation,
                    queued_seq=int(_epoch(record.created_at) * 1_000_000),
                    cancel_requested=record.cancel_requested,
                    event_seq=0,
                    created_at=_epoch(record.created_at),
                    updated_at=_epoch(record.updated_at),
                    record=record.model_dump_json(),
                )
            )
            if state is JobState.QUEUED:
                await self._notify(conn, QUEUE_TOPIC)
        return True

    # -- uploads --------------------------------------------------------------------------

    async def begin_upload(
        self, tenant: str, owner: str, max_concurrent: int, stale_after_s: float
    ) -> str:
        """Register an upload being received; Overloaded if the tenant has too many."""
        upload_id = secrets.token_hex(16)
        async with self.db.write() as conn:
            await self.db.lock(conn, f"uploads:{tenant}")
            clock = self.db.now()
            if max_concurrent:
                receiving = (
                    await conn.execute(
                        select(func.count()).where(
                            uploads.c.tenant == tenant,
                            uploads.c.state == "receiving",
                            uploads.c.heartbeat_at > clock - stale_after_s,
                        )
                    )
                ).scalar_one()
                if receiving >= max_concurrent:
                    raise Overloaded(
                        f"{receiving} uploads of yours are in progress, the most allowed "
                        "at once; wait for one to finish"
                    )
            await conn.execute(
                insert(uploads).values(
                    upload_id=upload_id,
                    tenant=tenant,
                    state="receiving",
                    owner=owner,
                    size_bytes=0,
                    heartbeat_at=clock,
                    created_at=clock,
                )
            )
        return upload_id

    async def upload_progress(
        self, upload_id: str, tenant: str, size: int, quota: int, stale_after_s: float
    ) -> None:
        """Record an upload's size so far; Overloaded once the tenant's bytes exceed ``quota``."""
        async with self.db.write() as conn:
            clock = self.db.now()
            await conn.execute(
                update(uploads)
                .where(uploads.c.upload_id == upload_id)
                .values(size_bytes=size, heartbeat_at=clock)
            )
            if quota:
                used = await self._bytes_used(conn, tenant, clock, stale_after_s)
                if used > quota:
                    raise Overloaded(
                        f"your uploads would take {used} bytes; the limit is {quota} bytes "
                        "(unused uploads expire)"
                    )

    async def _bytes_used(
        self, conn: AsyncConnection, tenant: str, clock, stale_after_s: float
    ) -> int:
        return int(
            (
                await conn.execute(
                    select(func.coalesce(func.sum(uploads.c.size_bytes), 0)).where(
                        uploads.c.tenant == tenant,
                        or_(
                            uploads.c.state == "stored",
                            and_(
                                uploads.c.state == "receiving",
                                uploads.c.heartbeat_at > clock - stale_after_s,
                            ),
                        ),
                    )
                )
            ).scalar_one()
        )

    async def finish_upload(
        self,
        upload_id: str,
        uri: str,
        size: int,
        ttl_s: float,
        duration_s: float | None = None,
        codec: str | None = None,
    ) -> bool:
        """Mark an upload stored, with what its probe found; False if its row is gone."""
        async with self.db.write() as conn:
            clock = self.db.now()
            result = await conn.execute(
                update(uploads)
                .where(uploads.c.upload_id == upload_id, uploads.c.state == "receiving")
                .values(
                    state="stored",
                    uri=uri,
                    size_bytes=size,
                    heartbeat_at=clock,
                    expires_at=clock + ttl_s,
                    duration_s=duration_s,
                    codec=codec[:64] if codec is not None else None,
                )
            )
        return result.rowcount == 1

    async def abort_upload(self, upload_id: str) -> None:
        async with self.db.write() as conn:
            await conn.execute(delete(uploads).where(uploads.c.upload_id == upload_id))

    async def _use_upload(
        self, conn: AsyncConnection, tenant: str, uri: str, job_id: str, field: str = "audio_uri"
    ) -> None:
        """Tie a stored upload to a job (it no longer expires); InvalidInput if there is none."""
        row = (
            await conn.execute(
                select(uploads.c.upload_id, uploads.c.job_id).where(
                    uploads.c.tenant == tenant, uploads.c.uri == uri, uploads.c.state == "stored"
                )
            )
        ).first()
        if row is None:
            raise InvalidInput(f"{field} {uri} does not exist; upload it first")
        if row.job_id is None:
            await conn.execute(
                update(uploads)
                .where(uploads.c.upload_id == row.upload_id)
                .values(job_id=job_id, expires_at=None)
            )

    async def stored_audio(self, tenant: str, uri: str) -> StoredAudio | None:
        """The tenant's stored upload at ``uri`` with what its probe found; None if none."""
        async with self.db.read() as conn:
            row = (
                await conn.execute(
                    select(uploads.c.duration_s, uploads.c.codec).where(
                        uploads.c.tenant == tenant,
                        uploads.c.uri == uri,
                        uploads.c.state == "stored",
                    )
                )
            ).first()
        if row is None:
            return None
        return StoredAudio(duration_s=row.duration_s, codec=row.codec)

    async def has_upload(self, tenant: str, uri: str) -> bool:
        async with self.db.read() as conn:
            row = (
                await conn.execute(
                    select(uploads.c.upload_id).where(
                        uploads.c.tenant == tenant,
                        uploads.c.uri == uri,
                        uploads.c.state == "stored",
                    )
                )
            ).first()
        return row is not None

    async def expired_uploads(
        self, stale_after_s: float, limit: int = 100
    ) -> list[tuple[str, str]]:
        """(upload_id, uri) of uploads no job used before they expired, and of dead receivers."""
        async with self.db.read() as conn:
            clock = self.db.now()
            rows = (
                await conn.execute(
                    select(uploads.c.upload_id, uploads.c.uri)
                    .where(
                        or_(
                            and_(uploads.c.state == "stored", uploads.c.expires_at < clock),
                            and_(
                                uploads.c.state == "receiving",
                                uploads.c.heartbeat_at < clock - stale_after_s,
                            ),
                        )
                    )
                    .limit(limit)
                )
            ).all()
        return [(row.upload_id, row.uri or "") for row in rows]

    async def forget_uploads(self, upload_ids: Sequence[str]) -> None:
        if not upload_ids:
            return
        async with self.db.write() as conn:
            await conn.execute(delete(uploads).where(uploads.c.upload_id.in_(list(upload_ids))))


def _reference_uris(record: JobRecord) -> list[str]:
    """The uploaded reference images of a job's own storyboard's characters."""
    board = record.spec.storyboard
    if board is None:
        return []
    return list(dict.fromkeys(c.reference_uri for c in board.characters if c.reference_uri))


def manifest_json(record: JobRecord) -> bytes:
    """The job as an export beside its artifacts (nothing reads job state from it)."""
    data = json.loads(record.model_dump_json())
    data["exported_at"] = now().isoformat()
    return json.dumps(data, indent=2).encode()
