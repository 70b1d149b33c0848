"""The gateway's database: schema, engines, the database clock and migrations.

Job state lives here; images, audio, video and captions stay in the artifact
store. Two engines are supported through SQLAlchemy's asyncio extension:

* **SQLite** (aiosqlite), the embedded default: one file in the data folder,
  in WAL mode. SQLite has one writer at a time, so the writes of this process
  take turns on an asyncio lock (rather than SQLite's sleep-and-retry busy
  handler), and each starts with ``BEGIN IMMEDIATE`` so that a writer in
  another process is waited for before anything is read, never half-way;
  reads use a second engine with plain ``BEGIN`` and never wait for a writer.
* **PostgreSQL** (asyncpg), for several gateway replicas. Claims lock rows
  with ``SELECT ... FOR UPDATE SKIP LOCKED``; admission (the queue limits)
  serialises on one transaction-scoped advisory lock, and upload quotas on
  one per tenant.

Every time that compares replicas (lease expiry, upload heartbeats) comes from
the database clock (:meth:`Database.now`), never from a replica's own clock.
The schema is versioned with Alembic (``storyreel_gateway/migrations``) and
brought up to date at start, under an advisory lock on PostgreSQL so that
replicas starting together migrate once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    event,
    func,
    literal_column,
    select,
    text,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")

#: Advisory lock id that serialises migrations across replicas (PostgreSQL).
_MIGRATION_LOCK = 0x5707_4EE1

metadata = MetaData()

# One row per job. The columns are what queries select and order on; ``record``
# is the rest of the job (spec, storyboard, stages, images, versions) as JSON.
jobs = Table(
    "jobs",
    metadata,
    Column("job_id", String(64), primary_key=True),
    Column("tenant", String(256), nullable=False),
    # Null when the request had no idempotency key (nulls never collide).
    Column("idempotency_key", String(128)),
    Column("request_hash", String(64), nullable=False, server_default=""),
    Column("state", String(16), nullable=False),
    # Runs started by the user: 0 for CreateVideo, +1 for each RegenerateScene.
    Column("generation", Integer, nullable=False, server_default="0"),
    # Order of the queue: a job's place (creation, or the start of a new run).
    Column("queued_seq", BigInteger, nullable=False),
    # The replica running the job, the claim's id, and until when (database clock,
    # seconds since the epoch) the claim holds. Null: nobody runs it.
    Column("owner", String(128)),
    Column("lease_id", String(32)),
    Column("lease_until", Float),
    Column("cancel_requested", Boolean, nullable=False, server_default="0"),
    # Number of the job's last event (job_events.seq).
    Column("event_seq", Integer, nullable=False, server_default="0"),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("record", Text, nullable=False),
    UniqueConstraint("tenant", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
    Index("ix_jobs_tenant_created", "tenant", "created_at"),
    Index("ix_jobs_state_queue", "state", "queued_seq"),
    Index("ix_jobs_owner", "owner"),
)

# What happened to each job, in order; WatchJob replays and follows these.
job_events = Table(
    "job_events",
    metadata,
    Column("job_id", String(64), ForeignKey("jobs.job_id", ondelete="CASCADE"), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("generation", Integer, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("stage", String(16)),
    Column("scene_index", Integer, nullable=False, server_default="0"),
    Column("message", Text, nullable=False, server_default=""),
    Column("created_at", Float, nullable=False),
)

# Audio uploads: being received (with a heartbeat), then stored until a job uses
# them or they expire.
uploads = Table(
    "uploads",
    metadata,
    Column("upload_id", String(32), primary_key=True),
    Column("tenant", String(256), nullable=False),
    Column("state", String(16), nullable=False),
    Column("uri", Text),
    Column("size_bytes", BigInteger, nullable=False, server_default="0"),
    Column("owner", String(128)),
    Column("heartbeat_at", Float, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float),
    # The first job that used the upload (it then lives as long as the job).
    Column("job_id", String(64)),
    # What the composer's probe found (ProbeAudio, when the upload arrived): the exact
    # length in seconds and the codec. Null for uploads stored before revision 0002.
    Column("duration_s", Float),
    Column("codec", String(64)),
    Index("ix_uploads_tenant_state", "tenant", "state"),
    Index("ix_uploads_uri", "uri"),
    Index("ix_uploads_expires", "expires_at"),
)


def default_url(data_dir: Path | None = None) -> str:
    """SQLite in the data folder (``data/gateway.db`` under the working directory)."""
    folder = (data_dir or Path.cwd() / "data").resolve()
    return f"sqlite+aiosqlite:///{folder / 'gateway.db'}"


def _async_url(url: str) -> URL:
    """Accept plain ``postgresql://`` and ``sqlite://`` URLs: pick the asyncio driver."""
    parsed = make_url(url)
    driver = {"postgresql": "postgresql+asyncpg", "sqlite": "sqlite+aiosqlite"}
    if parsed.drivername in driver:
        parsed = parsed.set(drivername=driver[parsed.drivername])
    if parsed.get_backend_name() not in ("postgresql", "sqlite"):
        raise ValueError(f"database must be SQLite or PostgreSQL (got {parsed.drivername})")
    return parsed


def describe(url: str) -> str:
    """The URL without its password, for logs and error messages."""
    return _async_url(url).render_as_string(hide_password=True)


class Database:
    """Engines, transactions and the clock of one SQLite or PostgreSQL database."""

    def __init__(self, url: str, pool_size: int = 10) -> None:
        parsed = _async_url(url)
        self.url = parsed
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            self.engine = _sqlite_engine(parsed, "BEGIN IMMEDIATE")
            self.read_engine = _sqlite_engine(parsed, "BEGIN")
            self._writer: asyncio.Lock | None = asyncio.Lock()
        else:
            self.engine = create_async_engine(
                parsed, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True
            )
            self.read_engine = self.engine
            self._writer = None

    @property
    def postgres(self) -> bool:
        return self.dialect == "postgresql"

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A transaction that may write; committed when the block ends without error."""
        if self._writer is None:
            async with self.engine.begin() as conn:
                yield conn
            return
        async with self._writer, self.engine.begin() as conn:
            yield conn

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        async with self.read_engine.connect() as conn:
            yield conn

    def now(self):
        """The database clock in seconds since the epoch, as a SQL expression."""
        if self.postgres:
            return literal_column("extract(epoch from clock_timestamp())::float8", Float)
        return literal_column("((julianday('now') - 2440587.5) * 86400.0)", Float)

    async def clock(self, conn: AsyncConnection) -> float:
        return float((await conn.execute(select(self.now()))).scalar_one())

    async def lock(self, conn: AsyncConnection, name: str) -> None:
        """Serialise transactions on ``name`` until this one ends.

        PostgreSQL takes an advisory lock; SQLite needs none, since every write
        transaction already holds the database lock from its first statement.
        """
        if self.postgres:
            await conn.execute(select(func.pg_advisory_xact_lock(func.hashtext(name))))

    async def migrate(self) -> None:
        """Bring the schema up to date (Alembic), once even if replicas start together."""
        async with self.engine.begin() as conn:
            if self.postgres:
                await conn.execute(text(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})"))
            await conn.run_sync(_upgrade)

    async def close(self) -> None:
        await self.engine.dispose()
        if self.read_engine is not self.engine:
            await self.read_engine.dispose()


def _sqlite_engine(url: URL, begin: str) -> AsyncEngine:
    engine = create_async_engine(url, connect_args={"timeout": 30})

    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_connection, _record) -> None:
        # The driver's own BEGIN handling is off; the "begin" hook below issues ours.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(conn) -> None:
        conn.exec_driver_sql(begin)

    return engine


def _upgrade(connection) -> None:
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")
