"""Small objects in the artifact store that let gateway replicas share their jobs.

The store is the only thing replicas share (no database), so everything one
replica must learn from another is an object beside the job manifests:

``active/<job_id>``
    One per unfinished job: written before the job's manifest, removed when
    the job ends. Replicas list these to find jobs whose owner died.
``cancel/<job_id>/<generation>``
    A cancel request for one run of a job, made on a replica that does not
    run it. The owner lists this folder every ``cancel_poll_s``.
``index/<tenant digest>/<inverted time>-<job_id>``
    The per-tenant listing: the keys sort newest first, so ListJobs is a
    paged listing of one folder.
``idempotency/<tenant digest>/<key digest>``
    Which job an idempotency key started, and the request's fingerprint.

Keys hold digests and ids storyreel generated, never user text.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from storyreel.errors import InvalidInput, NotFound
from storyreel.ids import check_job_id
from storyreel.storage import ArtifactStore

log = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: Listing entries start with this minus the creation time in microseconds (17 digits
#: last until the year 5138), so that the newest job has the smallest key.
_NEWEST_FIRST = 10**17 - 1
_ENTRY_RE = re.compile(r"^\d{17}-[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def tenant_digest(tenant: str) -> str:
    """A tenant's folder name in object keys (a digest: keys never hold names)."""
    return hashlib.sha256(tenant.encode()).hexdigest()[:16]


def listing_entry(job_id: str, created_at: datetime) -> str:
    """Name of a job's entry in its tenant's listing; entries sort newest first."""
    micros = (created_at - _EPOCH) // timedelta(microseconds=1)
    return f"{_NEWEST_FIRST - micros:017d}-{check_job_id(job_id)}"


def check_listing_entry(entry: str) -> str:
    if not _ENTRY_RE.match(entry):
        raise InvalidInput("page_token is not one this gateway returned")
    return entry


@dataclass(frozen=True)
class IdempotencyClaim:
    job_id: str
    request_hash: str
    claimed_at: datetime


class JobIndex:
    """Reads and writes the shared objects described in the module docstring."""

    ACTIVE = "active/"
    CANCEL = "cancel/"
    LISTING = "index/"
    IDEMPOTENCY = "idempotency/"

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store

    async def _put(self, key: str, payload: dict | None = None) -> None:
        data = json.dumps(payload).encode() if payload is not None else b""
        await asyncio.to_thread(self.store.put_bytes, key, data, "application/json")

    async def _read(self, key: str) -> dict | None:
        try:
            data = await asyncio.to_thread(self.store.get_bytes, self.store.uri_for(key))
        except NotFound:
            return None
        try:
            loaded = json.loads(data)
        except ValueError:
            log.error("unreadable index object %s", key)
            return None
        return loaded if isinstance(loaded, dict) else None

    async def _delete(self, key: str) -> None:
        await asyncio.to_thread(self.store.delete, self.store.uri_for(key))

    async def _keys(self, prefix: str, start_after: str = "", limit: int | None = None):
        def read() -> list[str]:
            uris = self.store.list(prefix, start_after=start_after)
            return [self.store.key_of(uri)[len(prefix) :] for uri in itertools.islice(uris, limit)]

        return await asyncio.to_thread(read)

    # -- unfinished jobs -----------------------------------------------------------------

    async def mark_active(self, job_id: str) -> None:
        await self._put(self.ACTIVE + check_job_id(job_id), {"since": _now().isoformat()})

    async def active_since(self, job_id: str) -> datetime | None:
        """When the marker was first written (None if it is gone or unreadable)."""
        payload = await self._read(self.ACTIVE + check_job_id(job_id))
        try:
            return datetime.fromisoformat(payload["since"]) if payload else None
        except (KeyError, TypeError, ValueError):
            return None

    async def active_jobs(self) -> list[str]:
        return [job_id for job_id in await self._keys(self.ACTIVE) if "/" not in job_id]

    async def unmark_active(self, job_id: str) -> None:
        await self._delete(self.ACTIVE + check_job_id(job_id))

    # -- cancel requests -----------------------------------------------------------------

    async def request_cancel(self, job_id: str, generation: int) -> None:
        await self._put(f"{self.CANCEL}{check_job_id(job_id)}/{generation}", {})

    async def cancel_requests(self) -> list[tuple[str, int]]:
        """Every pending request as (job_id, generation)."""
        found = []
        for name in await self._keys(self.CANCEL):
            job_id, _, generation = name.partition("/")
            if generation.isdigit():
                found.append((job_id, int(generation)))
        return found

    async def cancel_requested(self, job_id: str, generation: int) -> bool:
        key = f"{self.CANCEL}{check_job_id(job_id)}/{generation}"
        return await asyncio.to_thread(self.store.exists, self.store.uri_for(key))

    async def clear_cancel(self, job_id: str, generation: int) -> None:
        await self._delete(f"{self.CANCEL}{check_job_id(job_id)}/{generation}")

    async def retire(self, job_id: str, generation: int) -> None:
        """Forget a run that ended: it is no longer active, nor to be cancelled."""
        await self.unmark_active(job_id)
        await self.clear_cancel(job_id, generation)

    # -- listing ---------------------------------------------------------------------------

    def _listing_folder(self, tenant: str) -> str:
        return f"{self.LISTING}{tenant_digest(tenant)}/"

    async def add_to_listing(self, tenant: str, job_id: str, created_at: datetime) -> None:
        await self._put(self._listing_folder(tenant) + listing_entry(job_id, created_at))

    async def listing(self, tenant: str, after: str, count: int) -> list[tuple[str, str]]:
        """Up to ``count`` (entry, job_id) of the tenant, newest first, after entry ``after``."""
        folder = self._listing_folder(tenant)
        start = folder + check_listing_entry(after) if after else ""
        entries = await self._keys(folder, start_after=start, limit=count)
        return [(entry, entry[18:]) for entry in entries if _ENTRY_RE.match(entry)]

    # -- idempotency -------------------------------------------------------------------------

    def _idempotency_key(self, tenant: str, key: str) -> str:
        digest = hashlib.sha256(key.encode()).hexdigest()[:32]
        return f"{self.IDEMPOTENCY}{tenant_digest(tenant)}/{digest}"

    async def idempotency_claim(self, tenant: str, key: str) -> IdempotencyClaim | None:
        payload = await self._read(self._idempotency_key(tenant, key))
        try:
            return (
                IdempotencyClaim(
                    job_id=check_job_id(payload["job_id"]),
                    request_hash=str(payload["request_hash"]),
                    claimed_at=datetime.fromisoformat(payload["claimed_at"]),
                )
                if payload
                else None
            )
        except (KeyError, TypeError, ValueError, InvalidInput):
            log.error("unreadable idempotency claim; treating the key as unused")
            return None

    async def claim_idempotency_key(
        self, tenant: str, key: str, job_id: str, request_hash: str, confirm_s: float
    ) -> str:
        """Write that ``key`` started ``job_id``; returns the job id that holds the key.

        The store has no compare-and-set, so the claim is written, left for
        ``confirm_s`` and read back: when two replicas claim one key at once,
        the later write wins and both read the same winner.
        """
        payload = {"job_id": job_id, "request_hash": request_hash, "claimed_at": _now().isoformat()}
        await self._put(self._idempotency_key(tenant, key), payload)
        await asyncio.sleep(confirm_s)
        claim = await self.idempotency_claim(tenant, key)
        return claim.job_id if claim is not None else job_id


def _now() -> datetime:
    return datetime.now(UTC)
