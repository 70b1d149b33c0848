"""Audio uploads: received within limits, stored, and deleted when no job used them.

* **Limits.** Each file is at most ``max_upload_bytes``. Each tenant has a quota
  of bytes kept (uploads in progress and stored ones not yet expired) and of
  uploads at once, counted in the database over every replica.
* **Idle streams.** A stream that sends nothing for ``upload_idle_timeout_s``
  is cut off (DEADLINE_EXCEEDED) and its place freed.
* **Spool files.** An upload is spooled to a file in this process's own folder
  under ``upload_tmp_dir``, locked while the process lives. At start, the
  folders of processes that died (their lock is free) are removed, so a
  SIGKILL never leaves a file behind for good.
* **Expiry.** An upload that no job used within ``upload_ttl_s`` is deleted,
  object and row; one that a job used lives as long as the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path

from storyreel.errors import DeadlineExceeded, InvalidInput, NotFound
from storyreel.storage import ArtifactStore
from storyreel_gateway.audio import SNIFF_BYTES, sniff_audio
from storyreel_gateway.settings import GatewaySettings
from storyreel_gateway.store import JobStore

log = logging.getLogger(__name__)

#: Progress is written to the database at most this often (bytes or seconds).
_PROGRESS_BYTES = 4 * 1024 * 1024
_LOCK = ".lock"


def tenant_digest(tenant: str) -> str:
    """A tenant's folder name in object keys (a digest: keys never hold names)."""
    return hashlib.sha256(tenant.encode()).hexdigest()[:16]


def upload_prefix(tenant: str) -> str:
    """Folder of a tenant's uploads in the artifact store."""
    return f"uploads/{tenant_digest(tenant)}/"


class SpoolFolder:
    """This process's folder for upload spool files, locked for as long as it lives."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path: Path | None = None
        self._lock_fd: int | None = None

    def open(self) -> int:
        """Create this process's folder; returns how many dead processes' folders were removed."""
        self.root.mkdir(parents=True, exist_ok=True)
        removed = 0
        for folder in self.root.iterdir():
            if folder.is_dir() and _owner_is_gone(folder):
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        self.path = Path(tempfile.mkdtemp(prefix="spool-", dir=self.root))
        self._lock_fd = os.open(self.path / _LOCK, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return removed

    def close(self) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _owner_is_gone(folder: Path) -> bool:
    """Whether the process that made ``folder`` has ended (its lock is free)."""
    try:
        fd = os.open(folder / _LOCK, os.O_RDWR)
    except FileNotFoundError:
        return True  # it never took its lock, or it is being removed
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


class Uploads:
    """Receives, stores and expires audio uploads."""

    def __init__(
        self, settings: GatewaySettings, store: ArtifactStore, jobs: JobStore, owner: str
    ) -> None:
        self.settings = settings
        self.store = store
        self.jobs = jobs
        self.owner = owner
        root = settings.upload_tmp_dir or Path(tempfile.gettempdir()) / "storyreel-gateway-uploads"
        self.spool = SpoolFolder(root)

    def open(self) -> None:
        removed = self.spool.open()
        if removed:
            log.info(
                "removed upload spool folders left by stopped gateways", extra={"count": removed}
            )

    def close(self) -> None:
        self.spool.close()

    async def receive(self, tenant: str, chunks: AsyncIterable[bytes]) -> tuple[str, int]:
        """Store an uploaded audio file; returns (uri, size). Nothing is kept on failure."""
        s = self.settings
        stale_s = s.upload_idle_timeout_s * 2
        upload_id = await self.jobs.begin_upload(
            tenant, self.owner, s.max_uploads_per_tenant, stale_s
        )
        assert self.spool.path is not None, "Uploads.open() was not called"
        path = self.spool.path / f"{upload_id}.part"
        stored = False
        try:
            size = 0
            reported = 0
            head = b""
            loop = asyncio.get_running_loop()
            last_report = loop.time()
            with path.open("wb") as fh:
                async for chunk in _idle_limited(chunks, s.upload_idle_timeout_s):
                    size += len(chunk)
                    if size > s.max_upload_bytes:
                        raise InvalidInput(
                            f"audio upload is larger than {s.max_upload_bytes} bytes"
                        )
                    if len(head) < SNIFF_BYTES:
                        head += chunk[: SNIFF_BYTES - len(head)]
                    fh.write(chunk)
                    if size - reported >= _PROGRESS_BYTES or loop.time() - last_report >= 1.0:
                        await self.jobs.upload_progress(
                            upload_id, tenant, size, s.max_upload_bytes_per_tenant, stale_s
                        )
                        reported, last_report = size, loop.time()
            if size == 0:
                raise InvalidInput("audio upload is empty")
            ext = sniff_audio(head)
            if ext is None:
                raise InvalidInput(
                    "upload is not audio in a supported format (wav, mp3, ogg, flac, m4a, aac)"
                )
            await self.jobs.upload_progress(
                upload_id, tenant, size, s.max_upload_bytes_per_tenant, stale_s
            )
            key = f"{upload_prefix(tenant)}{uuid.uuid4().hex}/audio.{ext}"
            uri = await asyncio.to_thread(self.store.put_file, key, path)
            await self.jobs.finish_upload(upload_id, uri, size, s.upload_ttl_s)
            stored = True
        finally:
            path.unlink(missing_ok=True)
            if not stored:
                await asyncio.shield(self.jobs.abort_upload(upload_id))
        log.info("audio uploaded", extra={"uri": uri, "bytes": size})
        return uri, size

    async def expire(self) -> int:
        """Delete uploads no job used in time, and rows of receivers that died; returns how many."""
        stale_s = self.settings.upload_idle_timeout_s * 2
        expired = await self.jobs.expired_uploads(stale_s)
        for _upload_id, uri in expired:
            if uri:
                with contextlib.suppress(NotFound):
                    await asyncio.to_thread(self.store.delete, uri)
        await self.jobs.forget_uploads([upload_id for upload_id, _ in expired])
        if expired:
            log.info("expired uploads deleted", extra={"count": len(expired)})
        return len(expired)


async def _idle_limited(chunks: AsyncIterable[bytes], idle_s: float) -> AsyncIterator[bytes]:
    """The chunks, cut off with DeadlineExceeded when none arrives for ``idle_s``."""
    iterator = aiter(chunks)
    while True:
        try:
            chunk = await asyncio.wait_for(anext(iterator), idle_s)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise DeadlineExceeded(
                f"the upload sent nothing for {idle_s:g} s and was cut off; send it again"
            ) from None
        yield chunk
