"""Uploads (audio tracks and reference images): received within limits, stored, and
deleted when no job used them. Both kinds share every limit below; what differs is
how a file is recognised and checked (:class:`Uploads.receive` for audio,
:class:`Uploads.receive_image` for images, :mod:`storyreel_gateway.images`), and its
kind is the name of its object (``uploads/<tenant>/<id>/audio.<ext>`` or
``.../image.<ext>``, :func:`upload_kind`).

* **Limits.** Each audio file is at most ``max_upload_bytes``, each image
  ``max_image_upload_bytes`` and ``max_image_pixels`` (checked from its header
  before it is decoded). Each tenant has a quota
  of bytes kept (uploads in progress and stored ones not yet expired) and of
  uploads at once, counted in the database over every replica.
* **Idle streams.** A stream that sends nothing for ``upload_idle_timeout_s``
  is cut off (DEADLINE_EXCEEDED) and its place freed.
* **Spool files.** An upload is spooled to a file in this process's own folder
  under ``upload_tmp_dir``, locked while the process lives. At start, the
  folders of processes that died (their lock is free) are removed, so a
  SIGKILL never leaves a file behind for good.
* **Probed before it is reported.** Once stored, the file is read by the
  composer (``ProbeAudio``) exactly as a job's Compose would read it. Audio the
  composer would refuse (not audio behind a valid header, a playlist, corrupt
  or truncated data, too long) is deleted, object and row, and the upload
  answers INVALID_ARGUMENT with the composer's reason; what the probe found
  (length, codec) is kept with the upload, so admission can check a job's
  audio against its scenes before the job exists.
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
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from storyreel.errors import DeadlineExceeded, InvalidInput, NotFound
from storyreel.ids import shown
from storyreel.limits import AUDIO_FORMATS_TEXT
from storyreel.storage import ArtifactStore
from storyreel_gateway.audio import SNIFF_BYTES, sniff_audio
from storyreel_gateway.images import ImageFacts, inspect_image
from storyreel_gateway.settings import GatewaySettings
from storyreel_gateway.store import JobStore

log = logging.getLogger(__name__)

#: Progress is written to the database at most this often (bytes or seconds).
_PROGRESS_BYTES = 4 * 1024 * 1024
_LOCK = ".lock"
#: The first bytes of an upload kept to recognise it.
_HEAD_BYTES = 64
#: Most characters of a caller's file name repeated in a message.
_SHOWN_NAME_CHARS = 120


@dataclass(frozen=True)
class ProbedAudio:
    """What the composer found in an upload (ComposerService.ProbeAudio)."""

    duration_s: float
    codec: str
    sample_rate: int = 0
    channels: int = 0
    format: str = ""


@dataclass(frozen=True)
class StoredUpload:
    """An upload that was stored and passed the composer's probe."""

    uri: str
    size_bytes: int
    #: None only when the Uploads has no prober (benchmarks, core tests).
    audio: ProbedAudio | None = None


@dataclass(frozen=True)
class StoredImage:
    """An image upload that was stored after its header and pixels were checked."""

    uri: str
    size_bytes: int
    image: ImageFacts


class AudioProber(Protocol):
    """Reads a stored upload as the composer would (``clients.ComposerClient``).

    Raises InvalidInput with the composer's reason for audio it would refuse.
    """

    async def probe_audio(self, uri: str) -> ProbedAudio: ...


def tenant_digest(tenant: str) -> str:
    """A tenant's folder name in object keys (a digest: keys never hold names)."""
    return hashlib.sha256(tenant.encode()).hexdigest()[:16]


def upload_prefix(tenant: str) -> str:
    """Folder of a tenant's uploads in the artifact store."""
    return f"uploads/{tenant_digest(tenant)}/"


def upload_kind(key: str) -> str:
    """ "audio" or "image" for an upload's object key (its file name says it), else ""."""
    name = key.rsplit("/", 1)[-1]
    kind = name.split(".", 1)[0]
    return kind if kind in ("audio", "image") and "." in name else ""


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
    """Receives, stores and expires uploads (audio and images)."""

    def __init__(
        self,
        settings: GatewaySettings,
        store: ArtifactStore,
        jobs: JobStore,
        owner: str,
        prober: AudioProber | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.jobs = jobs
        self.owner = owner
        self.prober = prober
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

    async def receive(
        self,
        tenant: str,
        chunks: AsyncIterable[bytes],
        *,
        filename: Callable[[], str] = str,
    ) -> StoredUpload:
        """Store an uploaded audio file and have the composer probe it.

        Nothing is kept on failure: audio the composer refuses is deleted,
        object and row, and InvalidInput carries the composer's reason, said of
        the caller's ``filename()`` (the name its stream began with; read once
        the chunks are, bounded in the message) rather than of our object.
        """

        async def probe(upload_id: str, tenant: str, uri: str, size: int) -> ProbedAudio | None:
            return await self._probe(upload_id, tenant, uri, size, filename())

        async def recognise(head: bytes, _path: Path) -> tuple[str, None]:
            ext = sniff_audio(head[:SNIFF_BYTES])
            if ext is None:
                raise InvalidInput(
                    f"upload is not audio in a supported format ({AUDIO_FORMATS_TEXT})"
                )
            return ext, None

        uri, size, audio = await self._receive(
            tenant, chunks, "audio", self.settings.max_upload_bytes, recognise, probe
        )
        log.info(
            "audio uploaded",
            extra={
                "uri": uri,
                "bytes": size,
                "duration_s": audio.duration_s if audio else None,
                "codec": audio.codec if audio else None,
            },
        )
        return StoredUpload(uri, size, audio)

    async def receive_image(self, tenant: str, chunks: AsyncIterable[bytes]) -> StoredImage:
        """Store an uploaded PNG, JPEG or WebP image after checking it.

        Its pixel count is checked from the header before anything is decoded, then
        it is decoded once, whole; InvalidInput says why it is refused, and nothing
        is kept.
        """
        max_pixels = self.settings.max_image_pixels

        async def recognise(_head: bytes, path: Path) -> tuple[str, ImageFacts]:
            facts = await asyncio.to_thread(inspect_image, path, max_pixels)
            return facts.extension, facts

        uri, size, facts = await self._receive(
            tenant, chunks, "image", self.settings.max_image_upload_bytes, recognise, None
        )
        log.info(
            "image uploaded",
            extra={"uri": uri, "bytes": size, "size": f"{facts.width}x{facts.height}"},
        )
        return StoredImage(uri, size, facts)

    async def _receive(
        self,
        tenant: str,
        chunks: AsyncIterable[bytes],
        kind: str,
        max_bytes: int,
        recognise: Callable[[bytes, Path], Awaitable[tuple[str, Any]]],
        probe: Callable[[str, str, str, int], Awaitable[ProbedAudio | None]] | None,
    ) -> tuple[str, int, Any]:
        """Spool, check and store one upload of ``kind``; returns (uri, size, facts).

        ``recognise`` reads the spooled file (its first bytes and its path) and returns
        the extension to store it with and what it found, or raises InvalidInput;
        ``probe`` (audio) checks the stored object. Nothing is kept on failure.
        """
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
                    if size > max_bytes:
                        raise InvalidInput(f"{kind} upload is larger than {max_bytes} bytes")
                    if len(head) < _HEAD_BYTES:
                        head += chunk[: _HEAD_BYTES - len(head)]
                    fh.write(chunk)
                    if size - reported >= _PROGRESS_BYTES or loop.time() - last_report >= 1.0:
                        await self.jobs.upload_progress(
                            upload_id, tenant, size, s.max_upload_bytes_per_tenant, stale_s
                        )
                        reported, last_report = size, loop.time()
            if size == 0:
                raise InvalidInput(f"{kind} upload is empty")
            ext, facts = await recognise(head, path)
            await self.jobs.upload_progress(
                upload_id, tenant, size, s.max_upload_bytes_per_tenant, stale_s
            )
            key = f"{upload_prefix(tenant)}{uuid.uuid4().hex}/{kind}.{ext}"
            uri = await asyncio.to_thread(self.store.put_file, key, path)
            path.unlink(missing_ok=True)
            try:
                if probe is not None:
                    facts = await probe(upload_id, tenant, uri, size)
                audio = facts if isinstance(facts, ProbedAudio) else None
                if not await self.jobs.finish_upload(
                    upload_id,
                    uri,
                    size,
                    s.upload_ttl_s,
                    audio.duration_s if audio else None,
                    audio.codec if audio else None,
                ):
                    raise DeadlineExceeded(
                        "the upload took too long to be checked and was given up; send it again"
                    )
            except BaseException:
                await asyncio.shield(self._delete(uri))
                raise
            stored = True
        finally:
            path.unlink(missing_ok=True)
            if not stored:
                await asyncio.shield(self.jobs.abort_upload(upload_id))
        return uri, size, facts

    async def _probe(
        self, upload_id: str, tenant: str, uri: str, size: int, filename: str = ""
    ) -> ProbedAudio | None:
        """The composer's reading of the stored upload; its row is kept alive meanwhile."""
        if self.prober is None:
            return None
        heartbeat = asyncio.create_task(self._keep_alive(upload_id, tenant, size))
        try:
            return await self.prober.probe_audio(uri)
        except InvalidInput as exc:
            raise InvalidInput(_refusal(exc.message, uri, filename)) from None
        finally:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)

    async def _keep_alive(self, upload_id: str, tenant: str, size: int) -> None:
        """Beat the upload's heartbeat while the composer reads it (a slow probe is not dead)."""
        s = self.settings
        while True:
            await asyncio.sleep(s.upload_idle_timeout_s / 2)
            try:
                await self.jobs.upload_progress(
                    upload_id, tenant, size, 0, s.upload_idle_timeout_s * 2
                )
            except Exception as exc:  # the next beat tries again; the probe goes on
                log.warning("upload heartbeat failed", extra={"error": str(exc)})

    async def _delete(self, uri: str) -> None:
        try:
            await asyncio.to_thread(self.store.delete, uri)
        except NotFound:
            pass
        except Exception as exc:  # the row goes; expiry cannot find the object again
            log.error("could not delete a refused upload", extra={"uri": uri, "error": str(exc)})

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


def _refusal(message: str, uri: str, filename: str = "") -> str:
    """The composer's reason for refusing an upload, said of the caller's file.

    The composer names the object (``audio_uri <uri> is not usable audio: ...``);
    the object is deleted, and is no name the caller knows, so the message names
    the upload by the caller's own file name (:func:`storyreel.ids.shown`: quoted,
    and cut when long), or "the upload" when it sent none. Our object's URI is
    never in the answer.
    """
    upload = f"the upload {shown(filename, _SHOWN_NAME_CHARS)}" if filename else "the upload"
    prefix = f"audio_uri {uri} "
    if message.startswith(prefix):
        return f"{upload} {message[len(prefix) :].replace(uri, 'it')}"
    return f"{upload} was refused by the composer: {message.replace(uri, 'it')}"


async def _idle_limited(chunks: AsyncIterable[bytes], idle_s: float) -> AsyncIterator[bytes]:
    """The chunks, cut off with DeadlineExceeded when none arrives for ``idle_s``.

    ``asyncio.timeout``, not ``wait_for``: the chunk is read in the caller's own task, so a
    cancellation of the call (gRPC cancels it when a message is over its size limit, just
    as the stream reads as ended) is never lost to a read that finished at the same time,
    and the part received is never stored.
    """
    iterator = aiter(chunks)
    while True:
        try:
            async with asyncio.timeout(idle_s):
                chunk = await anext(iterator)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise DeadlineExceeded(
                f"the upload sent nothing for {idle_s:g} s and was cut off; send it again"
            ) from None
        yield chunk
