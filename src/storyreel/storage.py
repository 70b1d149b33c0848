"""Artifact storage: one interface, a backend chosen by URL.

* ``file:///abs/dir`` keeps artifacts in a local folder (single machine).
* ``s3://bucket[/prefix]`` keeps them in MinIO or any S3 server.

Artifacts are addressed by URI (``file:///abs/dir/jobs/x/scene-001.png`` or
``s3://bucket/prefix/jobs/x/scene-001.png``); that URI is what travels in
protobuf messages. Writes are atomic: a reader sees the whole object or none.
A store only reads URIs under its own root, so a caller cannot make a service
read arbitrary files.
"""

from __future__ import annotations

import abc
import mimetypes
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from urllib.parse import unquote, urlparse

from storyreel.errors import InvalidInput, NotFound, UpstreamFailed
from storyreel.ids import shown
from storyreel.settings import StorageSettings

# Matched with fullmatch: "$" alone would also accept a trailing newline.
_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*")

#: Longest object key (S3 allows 1024 bytes; keys are ASCII), and longest part of one
#: (most file systems allow 255 bytes in a name).
MAX_KEY_CHARS = 1024
MAX_KEY_PART_CHARS = 255


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative object key, else raise InvalidInput.

    Keys are built by storyreel from ids it generated, never from user text;
    this check is the backstop that keeps ``..``, absolute paths, and names no file
    system or object store would take out. The message shows only the start of a
    long key.
    """
    if not isinstance(key, str):
        raise InvalidInput(f"invalid object key {shown(key)}: not a string")
    if len(key) > MAX_KEY_CHARS:
        raise InvalidInput(
            f"invalid object key {shown(key)}: longer than {MAX_KEY_CHARS} characters"
        )
    parts = key.split("/")
    if any(len(part) > MAX_KEY_PART_CHARS for part in parts):
        raise InvalidInput(
            f"invalid object key {shown(key)}: a name in it is longer than "
            f"{MAX_KEY_PART_CHARS} characters"
        )
    if not _KEY_RE.fullmatch(key) or any(part in {".", ".."} for part in parts):
        raise InvalidInput(f"invalid object key {shown(key)}")
    return key


def guess_content_type(key: str) -> str:
    return mimetypes.guess_type(key)[0] or "application/octet-stream"


#: Bytes per read of :meth:`ArtifactStore.open_read` unless the caller says otherwise.
READ_CHUNK_BYTES = 256 * 1024


class ArtifactReader:
    """An artifact opened for reading, a chunk at a time (:meth:`ArtifactStore.open_read`).

    ``size`` is the whole object's size and ``content_type`` its media type,
    both known before any byte is read. Never holds more than one chunk in
    memory. Close it (or use ``with``) to free the file or connection early.
    """

    def __init__(
        self,
        size: int,
        content_type: str,
        read: Callable[[], bytes],
        close: Callable[[], None],
    ) -> None:
        self.size = size
        self.content_type = content_type
        self._read = read
        self._close = close
        self.closed = False

    def read_chunk(self) -> bytes:
        """The next bytes (at most the chunk size); b"" at the end."""
        if self.closed:
            return b""
        chunk = self._read()
        if not chunk:
            self.close()
        return chunk

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._close()

    def __enter__(self) -> ArtifactReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_offset(offset: int, size: int, uri: str) -> None:
    if not 0 <= offset <= size:
        raise InvalidInput(f"offset must be between 0 and the size of {uri}, {size} (got {offset})")


class ArtifactStore(abc.ABC):
    """Where images, audio, video and job manifests are kept."""

    #: URI prefix every artifact of this store starts with, ending in "/".
    root_uri: str

    def uri_for(self, key: str) -> str:
        return self.root_uri + check_key(key)

    def key_of(self, uri: str) -> str:
        """Object key of ``uri``; InvalidInput if the URI is not in this store."""
        if not isinstance(uri, str) or not uri.startswith(self.root_uri):
            raise InvalidInput(f"URI {shown(uri)} is not in the artifact store {self.root_uri!r}")
        # Percent-escapes aside, the rest is a key: refuse what cannot be one unread.
        if len(uri) - len(self.root_uri) > 3 * MAX_KEY_CHARS:
            raise InvalidInput(
                f"URI {shown(uri)} is too long: object keys are at most {MAX_KEY_CHARS} characters"
            )
        return check_key(unquote(uri[len(self.root_uri) :]))

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> str:
        """Store ``data`` under ``key`` and return its URI."""

    @abc.abstractmethod
    def put_file(self, key: str, path: Path, content_type: str | None = None) -> str:
        """Store the file at ``path`` under ``key`` and return its URI."""

    @abc.abstractmethod
    def get_bytes(self, uri: str) -> bytes:
        """Return the whole object; NotFound if it does not exist."""

    @abc.abstractmethod
    def download(self, uri: str, path: Path) -> Path:
        """Copy the object to ``path`` and return ``path``; NotFound if missing."""

    @abc.abstractmethod
    def open_read(
        self, uri: str, offset: int = 0, chunk_size: int = READ_CHUNK_BYTES
    ) -> ArtifactReader:
        """Open the object to stream it from byte ``offset``, ``chunk_size`` bytes a read.

        NotFound if it does not exist (raised here, before any byte is read);
        InvalidInput for an offset outside 0..size.
        """

    @abc.abstractmethod
    def exists(self, uri: str) -> bool: ...

    @abc.abstractmethod
    def delete(self, uri: str) -> None:
        """Remove the object; removing a missing object is not an error."""

    @abc.abstractmethod
    def list(self, prefix: str = "", start_after: str = "") -> Iterator[str]:
        """URIs of every object whose key starts with ``prefix``.

        The objects of one folder come in key order (S3 servers disagree on how
        to order nested folders among themselves). With ``start_after`` (a key)
        only keys after it are listed: a caller pages through a long folder by
        passing the last key it saw.
        """

    @abc.abstractmethod
    def public_url(self, uri: str) -> str:
        """Where a caller outside the cluster can fetch the object."""

    def check_ready(self) -> None:  # noqa: B027 - optional hook
        """Raise UpstreamFailed if the store cannot be used (checked at start-up)."""


class FileStore(ArtifactStore):
    """Artifacts in a local directory, for one machine."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.root_uri = self.root.as_uri().rstrip("/") + "/"

    def path_of(self, uri: str) -> Path:
        return self.root / self.key_of(uri)

    def _write(self, key: str, writer) -> str:
        target = self.root / check_key(key)
        for attempt in range(3):
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd, tmp = tempfile.mkstemp(
                    dir=target.parent, prefix=f".{target.name}.", suffix=".part"
                )
                break
            except FileNotFoundError:
                # A delete removed the folder, empty, between the two calls: make it again.
                if attempt == 2:
                    raise
        try:
            with os.fdopen(fd, "wb") as fh:
                writer(fh)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self.uri_for(key)

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> str:
        return self._write(key, lambda fh: fh.write(data))

    def put_file(self, key: str, path: Path, content_type: str | None = None) -> str:
        def copy(fh):
            with open(path, "rb") as src:
                shutil.copyfileobj(src, fh, 1024 * 1024)

        return self._write(key, copy)

    def get_bytes(self, uri: str) -> bytes:
        try:
            return self.path_of(uri).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"artifact {uri} does not exist") from None

    def download(self, uri: str, path: Path) -> Path:
        try:
            shutil.copyfile(self.path_of(uri), path)
        except FileNotFoundError:
            raise NotFound(f"artifact {uri} does not exist") from None
        return Path(path)

    def open_read(
        self, uri: str, offset: int = 0, chunk_size: int = READ_CHUNK_BYTES
    ) -> ArtifactReader:
        path = self.path_of(uri)
        try:
            fh = open(path, "rb")  # noqa: SIM115 - closed by the reader
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"artifact {uri} does not exist") from None
        try:
            size = os.fstat(fh.fileno()).st_size
            _check_offset(offset, size, uri)
            fh.seek(offset)
        except BaseException:
            fh.close()
            raise
        return ArtifactReader(
            size, guess_content_type(path.name), lambda: fh.read(chunk_size), fh.close
        )

    def exists(self, uri: str) -> bool:
        return self.path_of(uri).is_file()

    def delete(self, uri: str) -> None:
        path = self.path_of(uri)
        path.unlink(missing_ok=True)
        # The folders the object was alone in go with it, as in an object store (which has
        # no folders): a refused or expired upload leaves no empty folder behind.
        folder = path.parent
        while folder != self.root and folder.is_relative_to(self.root):
            try:
                folder.rmdir()
            except OSError:  # not empty, or already gone
                break
            folder = folder.parent

    def list(self, prefix: str = "", start_after: str = "") -> Iterator[str]:
        # Walk only the folder the prefix names, not the whole store.
        folder = self.root / prefix.rpartition("/")[0]
        if not folder.is_dir():
            return
        keys = sorted(
            key
            for path in folder.rglob("*")
            if path.is_file()
            and not path.name.startswith(".")
            and (key := path.relative_to(self.root).as_posix()).startswith(prefix)
            and key > start_after
        )
        for key in keys:
            yield self.root_uri + key

    def public_url(self, uri: str) -> str:
        return str(self.path_of(uri))


class S3Store(ArtifactStore):
    """Artifacts in a bucket of MinIO or any S3-compatible server."""

    def __init__(self, bucket: str, prefix: str, settings: StorageSettings) -> None:
        from minio import Minio

        self.bucket = bucket
        self.endpoint = settings.s3_endpoint
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.root_uri = f"s3://{bucket}/{self.prefix}"
        self.presign_expiry = timedelta(seconds=settings.presign_expiry_s)

        def client(endpoint: str, secure: bool) -> Minio:
            return Minio(
                endpoint,
                access_key=settings.s3_access_key or None,
                secret_key=settings.s3_secret_key.get_secret_value() or None,
                secure=secure,
                # A fixed region lets presigning work without asking the server.
                region=settings.s3_region or "us-east-1",
            )

        self.client = client(settings.s3_endpoint, settings.s3_secure)
        public_secure = (
            settings.s3_secure if settings.s3_public_secure is None else settings.s3_public_secure
        )
        self.public_client = (
            client(settings.s3_public_endpoint, public_secure)
            if settings.s3_public_endpoint
            else self.client
        )

    def _object(self, uri: str) -> str:
        return self.prefix + self.key_of(uri)

    def _call(self, what: str, fn, *args, **kwargs):
        from minio.error import S3Error
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, **kwargs)
        except S3Error as exc:
            if exc.code in {"NoSuchKey", "NoSuchObject", "NotFound"}:
                raise NotFound(f"artifact {what} does not exist") from None
            raise UpstreamFailed(f"object store refused {what}: {exc.code}: {exc.message}") from exc
        except (OSError, ValueError, HTTPError) as exc:
            raise UpstreamFailed(
                f"object store at {self.endpoint} unreachable for {what}: {exc}"
            ) from exc

    def check_ready(self) -> None:
        if not self._call(f"bucket {self.bucket}", self.client.bucket_exists, self.bucket):
            raise UpstreamFailed(f"bucket {self.bucket!r} does not exist")

    def ensure_bucket(self) -> None:
        if not self._call(f"bucket {self.bucket}", self.client.bucket_exists, self.bucket):
            self._call(f"bucket {self.bucket}", self.client.make_bucket, self.bucket)

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> str:
        import io

        uri = self.uri_for(key)
        self._call(
            uri,
            self.client.put_object,
            self.bucket,
            self.prefix + key,
            io.BytesIO(data),
            len(data),
            content_type=content_type or guess_content_type(key),
        )
        return uri

    def put_file(self, key: str, path: Path, content_type: str | None = None) -> str:
        uri = self.uri_for(key)
        self._call(
            uri,
            self.client.fput_object,
            self.bucket,
            self.prefix + key,
            str(path),
            content_type=content_type or guess_content_type(key),
        )
        return uri

    def get_bytes(self, uri: str) -> bytes:
        def read() -> bytes:
            response = self.client.get_object(self.bucket, self._object(uri))
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return self._call(uri, read)

    def download(self, uri: str, path: Path) -> Path:
        self._call(uri, self.client.fget_object, self.bucket, self._object(uri), str(path))
        return Path(path)

    def open_read(
        self, uri: str, offset: int = 0, chunk_size: int = READ_CHUNK_BYTES
    ) -> ArtifactReader:
        name = self._object(uri)
        stat = self._call(uri, self.client.stat_object, self.bucket, name)
        size = int(stat.size or 0)
        _check_offset(offset, size, uri)
        content_type = stat.content_type or guess_content_type(name)
        if offset == size:  # nothing left to send (S3 refuses an empty range)
            return ArtifactReader(size, content_type, lambda: b"", lambda: None)
        # The body is streamed as it is read (minio does not preload it).
        response = self._call(uri, self.client.get_object, self.bucket, name, offset=offset)

        def read() -> bytes:
            return self._call(uri, response.read, chunk_size)

        def close() -> None:
            response.close()
            response.release_conn()

        return ArtifactReader(size, content_type, read, close)

    def exists(self, uri: str) -> bool:
        try:
            self._call(uri, self.client.stat_object, self.bucket, self._object(uri))
        except NotFound:
            return False
        return True

    def delete(self, uri: str) -> None:
        self._call(uri, self.client.remove_object, self.bucket, self._object(uri))

    def list(self, prefix: str = "", start_after: str = "") -> Iterator[str]:
        objects = self._call(
            prefix,
            self.client.list_objects,
            self.bucket,
            prefix=self.prefix + prefix,
            recursive=True,
            start_after=self.prefix + start_after if start_after else None,
        )
        while True:
            # The listing is fetched page by page as it is iterated.
            obj = self._call(f"listing {prefix!r}", next, objects, None)
            if obj is None:
                return
            yield f"s3://{self.bucket}/{obj.object_name}"

    def public_url(self, uri: str) -> str:
        return self._call(
            uri,
            self.public_client.presigned_get_object,
            self.bucket,
            self._object(uri),
            expires=self.presign_expiry,
        )


def open_store(settings: StorageSettings | None = None) -> ArtifactStore:
    """Build the store that ``settings.url`` names."""
    settings = settings or StorageSettings()
    parsed = urlparse(settings.url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise InvalidInput(
                f"file storage URL must be file:///absolute/path, got {settings.url}"
            )
        return FileStore(Path(unquote(parsed.path)))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise InvalidInput(f"s3 storage URL must be s3://bucket[/prefix], got {settings.url}")
        return S3Store(parsed.netloc, parsed.path, settings)
    raise InvalidInput(f"unsupported storage URL {settings.url!r}: use file:///dir or s3://bucket")
