"""Fuzzing every public RPC of storyreel.gateway.v1.StoryReelService (issue 11, item 12).

Hypothesis generates requests for each public call, some
nearly valid and some hostile: huge strings, control characters, newlines and any Unicode; path
tricks in URIs (``..``, ``%2e%2e``, double encoding, another tenant's URIs, files
outside the store); negative and huge numbers; enum values the contract lacks;
bytes that are no valid message at all (sent as they are, through the channel's
generic methods); and authorization headers that are missing, wrong, doubled or
malformed. Every request is sent twice: with tenant alpha's key, and with another
authorization drawn for the example (none, a wrong key, tenant bravo's key, two
headers, a malformed one...).

Every answer must be OK or a code the contract documents for that call, never
INTERNAL or UNKNOWN; its message is bounded and never carries a key; a caller
without a valid key gets UNAUTHENTICATED whatever it sent; a tenant never reaches
another tenant's jobs. And a request that is refused (or only reads) writes
nothing: the artifact store's listing (and the upload spool folder) and every
database row are compared before and after it.

One gateway per call, with the upstream doubles and API keys, serves all the
examples of that call. Its replica stops claiming jobs once a few have finished
(as a gateway whose slots are all busy), so accepted jobs wait in the queue and
nothing runs in the background between two requests: what a request wrote is
exactly what changed. The queue limits are lifted so accepted CreateVideos never
fill it. Hypothesis runs derandomized, so CI sees the same requests every time.

Each call gets REQUESTS_PER_RPC requests on SQLite, and a shorter run on
PostgreSQL, which refuses what SQLite takes (a NUL in a text column). The
summary of each run (requests and status codes) is printed at the end of its
test (``pytest -s``) and kept in the test report's user properties.
STORYREEL_FUZZ_REQUESTS=N runs longer.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import operator
import os
import re
import sqlite3
import struct
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from storyreel_gateway.auth import key_digest
from storyreel_gateway.uploads import upload_prefix
from support import manifest_written, new_postgres_database, upload_audio, wav_bytes

from storyreel.gateway.v1 import gateway_pb2 as pb
from storyreel.logs import JsonFormatter
from storyreel.types.v1 import types_pb2

#: Requests each call gets in one run (each example sends two); more with
#: STORYREEL_FUZZ_REQUESTS=N for a longer run.
REQUESTS_PER_RPC = int(os.environ.get("STORYREEL_FUZZ_REQUESTS", "2000"))
#: The same on PostgreSQL, where every row is read before and after each request.
POSTGRES_REQUESTS_PER_RPC = max(REQUESTS_PER_RPC // 8, 100)

KEY_ALPHA = "fuzz-alpha-key-7f3a9c2e"
KEY_BRAVO = "fuzz-bravo-key-41d8b6f0"
WRONG_KEY = "fuzz-wrong-key-0c5e1d97"
KEYS = (KEY_ALPHA, KEY_BRAVO, WRONG_KEY)

SERVICE = "/storyreel.gateway.v1.StoryReelService/"
#: The server's largest message (ServiceSettings.max_message_bytes): gRPC answers a larger
#: one RESOURCE_EXHAUSTED before the gateway sees it.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: Longest error message accepted (the gateway cuts at 1,000 characters plus a marker).
MAX_DETAILS = 1100
#: Longest log line accepted (a crash's traceback is cut to 20,000 characters).
MAX_LOG_LINE = 30_000
#: Upload streams idle this long are cut off; a few examples stall longer on purpose.
UPLOAD_IDLE_S = 1.0
CALL_TIMEOUT_S = 30.0

Code = grpc.StatusCode
RPCS = (
    "CreateVideo",
    "GetJob",
    "WatchJob",
    "UploadAudio",
    "ListJobs",
    "CancelJob",
    "RegenerateScene",
    "ReadArtifact",
    "UpdateStoryboard",
    "ApproveStoryboard",
    "UploadImage",
)
#: Calls that need jobs waiting in REVIEW (made only for them: the others' fuzz is unchanged).
REVIEW_RPCS = {"UpdateStoryboard", "ApproveStoryboard"}
_METHODS = pb.DESCRIPTOR.services_by_name["StoryReelService"].methods_by_name
REQUEST_TYPES = {rpc: getattr(pb, _METHODS[rpc].input_type.name) for rpc in RPCS}
RESPONSE_TYPES = {rpc: getattr(pb, _METHODS[rpc].output_type.name) for rpc in RPCS}
KINDS = {
    rpc: ("stream_" if _METHODS[rpc].client_streaming else "unary_")
    + ("stream" if _METHODS[rpc].server_streaming else "unary")
    for rpc in RPCS
}

#: What each call may answer besides OK: the codes gateway.proto and docs/clients.md give it
#: (UNAUTHENTICATED for every call; INVALID_ARGUMENT for every call, since a malformed
#: message is refused so). RESOURCE_EXHAUSTED on any call for a message over the size limit
#: is checked apart; DEADLINE_EXCEEDED only for an upload stream that went idle.
DOCUMENTED = {
    # FAILED_PRECONDITION: a prompt clearly in a language no voice speaks ("日本語の物語").
    "CreateVideo": {
        Code.INVALID_ARGUMENT,
        Code.RESOURCE_EXHAUSTED,
        Code.ALREADY_EXISTS,
        Code.FAILED_PRECONDITION,
    },
    "GetJob": {Code.NOT_FOUND, Code.INVALID_ARGUMENT},
    "WatchJob": {Code.NOT_FOUND, Code.INVALID_ARGUMENT},
    "UploadAudio": {Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED, Code.DEADLINE_EXCEEDED},
    "ListJobs": {Code.INVALID_ARGUMENT},
    "CancelJob": {Code.NOT_FOUND, Code.FAILED_PRECONDITION, Code.INVALID_ARGUMENT},
    "RegenerateScene": {
        Code.NOT_FOUND,
        Code.FAILED_PRECONDITION,
        Code.INVALID_ARGUMENT,
        Code.RESOURCE_EXHAUSTED,
    },
    "ReadArtifact": {Code.NOT_FOUND, Code.INVALID_ARGUMENT},
    "UpdateStoryboard": {
        Code.NOT_FOUND,
        Code.INVALID_ARGUMENT,
        Code.FAILED_PRECONDITION,
        Code.ABORTED,
        Code.RESOURCE_EXHAUSTED,
    },
    "ApproveStoryboard": {
        Code.NOT_FOUND,
        Code.INVALID_ARGUMENT,
        Code.FAILED_PRECONDITION,
        Code.ABORTED,
        Code.RESOURCE_EXHAUSTED,
    },
    "UploadImage": {Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED, Code.DEADLINE_EXCEEDED},
}
#: Calls that may write when they succeed.
WRITERS = {
    "CreateVideo",
    "UploadAudio",
    "CancelJob",
    "RegenerateScene",
    "UpdateStoryboard",
    "ApproveStoryboard",
    "UploadImage",
}
FINISHED = {pb.JOB_STATE_DONE, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED}


WAV = wav_bytes(0.5, sample=b"\x00\x01")


# -- strategies -------------------------------------------------------------------------------


def weighted(*options: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """One of the strategies, picked with the given weights."""
    # sampled_from picks evenly; integers() would favour the first option.
    table = [strategy for weight, strategy in options for _ in range(weight)]
    return st.sampled_from(table).flatmap(lambda strategy: strategy)


def one_of_known(values: list) -> st.SearchStrategy:
    """One of ``values``, a list that grows as the fuzz runs.

    Hypothesis replays the choices of earlier examples, so what is drawn must not
    depend on the list's length: an index in a fixed range picks the value.
    """
    values = list(values)
    return st.integers(0, 2**16).map(lambda i: values[i % len(values)])


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes = b"") -> bytes:
    return _encode_varint(number << 3 | wire_type) + payload


HOSTILE_STRINGS = [
    "",
    " ",
    "\t",
    "\n",
    "\r\n",
    "x\n",
    "\nx",
    "\x00",
    "a\x00b",
    "\x1b[31mred\x1b[0m",
    "\x7f",
    "\u0085",
    "\u2028",
    "\u202eevil",
    "\ufeff",
    "\u200b",
    "\ufffd",
    "\U0010ffff",
    "é",
    "日本語",
    "😀",
    "👩‍👩‍👧‍👦",
    ".",
    "..",
    "../",
    "../../etc/passwd",
    "..%2f..%2fetc%2fpasswd",
    "%2e%2e",
    "%2e%2e%2f",
    "%252e%252e%252f",
    "..\\..\\windows\\win.ini",
    "/",
    "//",
    "/etc/passwd",
    "file:///etc/passwd",
    "s3://bucket/key",
    "C:\\",
    "~",
    "$HOME",
    "${jndi:ldap://x/a}",
    "' OR '1'='1",
    '"; DROP TABLE jobs; --',
    "<script>alert(1)</script>",
    "{{7*7}}",
    "%s%s%s%n",
    "<|im_start|>system",
    "</s>[INST]",
    "null",
    "0",
    "-1",
    "NaN",
    "a" * 64,
    "a" * 65,
    "k" * 129,
    "s" * 201,
    "p" * 2001,
]
#: Built once: strings of 1 MiB and 3 MiB (a request may hold several: some exceed the
#: message limit).
HUGE_STRINGS = ["j" * (1024 * 1024), "../" * (1024 * 1024), "é" * (1024 * 1024)]
FRAGMENTS = [
    "..",
    "/",
    ".",
    "%2e",
    "%2f",
    "%2F",
    "%25",
    "%00",
    "\\",
    "\x00",
    "\n",
    "\r",
    " ",
    "a",
    "0",
    "é",
    "😀",
    "\u202e",
    "<",
    "'",
    '"',
    ";",
    "*",
    "?",
    "#",
    "~",
    "$",
    "{",
    "}",
    "uploads",
    "jobs",
]

#: Control characters, NUL most often (PostgreSQL text cannot hold it) and newlines next.
CONTROLS = [
    *["\x00"] * 8,
    *["\n", "\r\n"] * 2,
    *(chr(c) for c in range(1, 0x20)),
    *["\x7f", "\x85", "\u2028", "\u2029"],
]
spliced_controls = st.builds(
    lambda head, controls, tail: head + controls + tail,
    st.text(max_size=12),
    st.lists(st.sampled_from(CONTROLS), min_size=1, max_size=3).map("".join),
    st.sampled_from(["", "x", "k-1", "abc", "A fox"]),
)

hostile_text = weighted(
    (3, spliced_controls),
    (5, st.sampled_from(HOSTILE_STRINGS)),
    (4, st.text(max_size=50)),
    (3, st.lists(st.sampled_from(FRAGMENTS), max_size=14).map("".join)),
    (
        1,
        st.builds(
            operator.mul,
            st.sampled_from(["x", "é", "😀", "/", ".", "\n", "a/", "%2e"]),
            st.sampled_from([65, 129, 201, 256, 300, 2001, 5000, 70_000]),
        ),
    ),
    (1, st.sampled_from(HUGE_STRINGS)),
)
INT32_EDGES = [0, 1, 2, -1, 3, 4, 8, 24, 25, 60, 61, 64, 99, 100, 101, 3840, 3848, 2**31 - 1]
int32s = weighted(
    (3, st.sampled_from([*INT32_EDGES, -(2**31)])), (2, st.integers(-(2**31), 2**31 - 1))
)
uint64s = weighted(
    (3, st.sampled_from([0, 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1])),
    (2, st.integers(0, 2**64 - 1)),
)
int64s = weighted(
    (3, st.sampled_from([0, 1, -1, 2**31, 2**63 - 1, -(2**63)])),
    (2, st.integers(-(2**63), 2**63 - 1)),
)
#: Open enums: any int32 travels; the gateway knows only a few.
enum_values = weighted(
    (3, st.integers(0, 4)),
    (2, st.sampled_from([-1, 5, 42, 2**31 - 1, -(2**31)])),
    (1, st.integers(-(2**31), 2**31 - 1)),
)

#: Encodings no request message decodes (and some it does: unknown fields are kept).
CRAFTED_WIRE = [
    b"\x0a\xff\xff\xff\x0f" + b"x" * 10,  # a length running past the end
    b"\x08",  # a truncated varint
    b"\x08" + b"\xff" * 10 + b"\x01",  # an 11-byte varint
    b"\x0b",  # a group that never ends
    b"\x0c",  # a group end without a start
    b"\x00",  # field number 0
    b"\x07",  # wire type 7
    b"\x0d\x00\x00",  # a truncated fixed32
    b"\x0b" * 200 + b"\x0c" * 200,  # groups nested beyond the recursion limit
    _field(2**29 - 1, 2, b"\x00"),  # the highest field number: an unknown field
    _field(1, 0, _encode_varint(2**64 - 1)),  # a varint where a string is
    _field(1, 5, b"\x00\x00\x80\x7f"),  # a fixed32 where a string is
    _field(1, 1, struct.pack("<d", float("nan"))),  # a fixed64 where a string is
]
#: Byte strings that are not UTF-8, for string fields (proto3 strings must be UTF-8).
BAD_UTF8 = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xc0\x80", b"abc\xfe", b"\xf4\x90\x80\x80"]


def _string_fields(message_type) -> list[int]:
    return [f.number for f in message_type.DESCRIPTOR.fields if f.type == f.TYPE_STRING]


def wire_mutations(message) -> st.SearchStrategy[bytes]:
    """Bytes derived from ``message``'s encoding that its parser may or may not take."""
    valid = message.SerializeToString()
    string_fields = _string_fields(type(message)) or [1]
    bad_string = st.builds(
        lambda number, text: _field(number, 2, _encode_varint(len(text)) + text),
        st.sampled_from(string_fields),
        st.sampled_from(BAD_UTF8),
    )
    # Positions in a fixed range: the message's length may differ when Hypothesis replays.
    at = st.integers(0, 2**20).map(lambda n: n % max(len(valid), 1))
    return weighted(
        (2, st.binary(max_size=48)),
        (2, st.sampled_from(CRAFTED_WIRE)),
        (3, bad_string.map(lambda extra: valid + extra)),
        (2, st.binary(min_size=1, max_size=12).map(lambda tail: valid + tail)),
        (2, at.map(lambda n: valid[:n])),
        (
            2,
            st.tuples(at, st.integers(0, 255)).map(
                lambda p: valid[: p[0]] + bytes([p[1]]) + valid[p[0] + 1 :]
            ),
        ),
    )


def _flip_case(value: str) -> str:
    return value.swapcase()


ID_MUTATIONS: list[Callable[[str], str]] = [
    lambda s: s + "\n",
    lambda s: s + "\r\n",
    lambda s: " " + s,
    lambda s: s + " ",
    lambda s: s + "\x00",
    lambda s: "\x00" + s,
    lambda s: s[:4] + "\x00" + s[4:],
    lambda s: s + "\t",
    _flip_case,
    lambda s: s[:-1],
    lambda s: s + "0",
    lambda s: s[:8],
    lambda s: s * 2,
    lambda s: "../" + s,
    lambda s: s + "/..",
    lambda s: s + "/../" + s,
    lambda s: f"%{ord(s[0]):02x}{s[1:]}" if s else "%00",
    lambda s: s.replace("a", "а"),  # Cyrillic a
    lambda s: s + "é",
]


def _escape_all(text: str) -> str:
    return "".join(f"%{byte:02X}" for byte in text.encode())


def uri_mutations(root: str, alpha: str, bravo: str) -> list[Callable[[str], str]]:
    """Path tricks on a URI of the store (root, alpha's and bravo's upload folders)."""

    def parent_hop(uri: str) -> str:
        head, _, tail = uri.rpartition("/")
        return f"{head}/../{head.rpartition('/')[2]}/{tail}"

    return [
        lambda u: u + "\n",
        lambda u: u + "\x00",
        lambda u: u.replace("/audio.", "/\x00audio.").replace("/video.", "/\x00video."),
        lambda u: u + "?x=1",
        lambda u: u + "#frag",
        lambda u: u + "/",
        lambda u: u[:-1],
        lambda u: u.upper(),
        lambda u: u.replace("file://", "FILE://", 1),
        lambda u: u.replace("file:///", "file:/", 1),
        lambda u: u.replace("file://", "s3://", 1),
        lambda u: u.replace(root, root + "./", 1),
        lambda u: u.replace(root, root + "/", 1),
        lambda u: u.replace(root, root + "jobs/../", 1),
        lambda u: u.replace(root, root + "%2e%2e/", 1),
        lambda u: u.replace(root, root + "..%2f", 1),
        lambda u: u.replace(root, root + "%252e%252e/", 1),
        lambda u: u.replace(root, root.rstrip("/") + "/../" + Path(root[7:]).name + "/", 1),
        lambda u: u.replace(alpha, bravo, 1),
        lambda u: u.replace(bravo, alpha, 1),
        lambda u: u.replace(".", "%2e"),
        lambda u: u.replace("/", "%2F").replace("file:%2F%2F%2F", "file:///", 1),
        lambda u: root + _escape_all(u[len(root) :]),
        lambda u: u.replace("/", "\\"),
        lambda u: u.replace("/", "//"),
        parent_hop,
        lambda u: u + "/" + "n" * 5000,
        lambda u: u.rpartition("/")[0] + "/" + "n" * 300,
    ]


# -- authorization ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Auth:
    """Metadata a request is sent with, and the tenant it should act as (None: refused)."""

    name: str
    metadata: tuple[tuple[str, str], ...]
    tenant: str | None

    @property
    def presented(self) -> list[str]:
        """The keys this metadata presents (each must stay out of every answer)."""
        return [
            value.partition(" ")[2].strip()
            for key, value in self.metadata
            if key == "authorization"
        ]


def _bearer(key: str) -> tuple[str, str]:
    return ("authorization", f"Bearer {key}")


ALPHA = Auth("alpha", (_bearer(KEY_ALPHA),), "alpha")
OTHER_AUTHS = [
    Auth("none", (), None),
    Auth("wrong key", (_bearer(WRONG_KEY),), None),
    Auth("bravo", (_bearer(KEY_BRAVO),), "bravo"),
    Auth("alpha, lower-case scheme", (("authorization", f"bearer {KEY_ALPHA}"),), "alpha"),
    Auth("alpha, spaces around", (("authorization", f"Bearer    {KEY_ALPHA}   "),), "alpha"),
    Auth("alpha twice", (_bearer(KEY_ALPHA), _bearer(KEY_ALPHA)), None),
    # x-job-id tags the server's log lines: a huge one must be cut there.
    Auth("alpha, x-job-id of 6 KB", (_bearer(KEY_ALPHA), ("x-job-id", "../" * 2000)), "alpha"),
    Auth("alpha then wrong", (_bearer(KEY_ALPHA), _bearer(WRONG_KEY)), None),
    Auth("wrong then alpha", (_bearer(WRONG_KEY), _bearer(KEY_ALPHA)), None),
    Auth("alpha then bravo", (_bearer(KEY_ALPHA), _bearer(KEY_BRAVO)), None),
    Auth("basic scheme", (("authorization", f"Basic {KEY_ALPHA}"),), None),
    Auth("no scheme", (("authorization", KEY_ALPHA),), None),
    Auth("leading space", (("authorization", f" Bearer {KEY_ALPHA}"),), None),
    Auth("empty header", (("authorization", ""),), None),
    Auth("scheme only", (("authorization", "Bearer"),), None),
    Auth("scheme and space", (("authorization", "Bearer "),), None),
    Auth("key cut short", (_bearer(KEY_ALPHA[:-1]),), None),
    Auth("key made longer", (_bearer(KEY_ALPHA + "0"),), None),
    Auth("key in capitals", (_bearer(KEY_ALPHA.upper()),), None),
    Auth("bravo's configured digest", (_bearer(key_digest(KEY_BRAVO)),), None),
    Auth("alpha's digest", (_bearer(key_digest(KEY_ALPHA)),), None),
    Auth("another header", (("x-api-key", KEY_ALPHA),), None),
    Auth("6 KB key", (_bearer("k" * 6000),), None),
    Auth("20 KB key", (_bearer("k" * 20_000),), None),  # over gRPC's metadata limit
]
_printable = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
other_auths = weighted(
    (4, st.sampled_from(OTHER_AUTHS[:3])),
    (5, st.sampled_from(OTHER_AUTHS[3:])),
    (
        1,
        st.text(_printable, max_size=60).map(
            lambda value: Auth("generated", (("authorization", value),), None)
        ),
    ),
    (
        1,
        st.text(_printable, min_size=1, max_size=60).map(
            lambda key: Auth("generated key", (_bearer(key),), None)
        ),
    ),
)


# -- the gateway under fuzz -------------------------------------------------------------------


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    responses: list = field(default_factory=list)
    #: WatchJob of an unfinished job: the client stopped after the snapshot.
    stopped: bool = False


def _tree(root: Path) -> frozenset:
    """Every file (with size and modification time) and folder under ``root``."""
    entries = []
    pending = [root]
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(folder) as found:
                for entry in found:
                    if entry.is_dir(follow_symlinks=False):
                        entries.append((entry.path, "folder"))
                        pending.append(entry.path)
                    else:
                        info = entry.stat(follow_symlinks=False)
                        entries.append((entry.path, info.st_size, info.st_mtime_ns))
        except FileNotFoundError:
            continue
    return frozenset(entries)


class SqliteRows:
    """Every row of the gateway's SQLite database, read again only when it changed.

    ``PRAGMA data_version`` changes whenever another connection commits a change, so
    the rows are read (and compared) only after a request that committed something.
    """

    def __init__(self, url: str) -> None:
        self.path = Path(url.split(":///", 1)[1])
        self.connection = sqlite3.connect(self.path, isolation_level=None)
        self.version: int | None = None
        self.rows: dict[str, list[tuple]] = {}

    async def current(self) -> dict[str, list[tuple]]:
        version = self.connection.execute("PRAGMA data_version").fetchone()[0]
        if version != self.version:
            tables = [
                name
                for (name,) in self.connection.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
                )
            ]
            self.rows = {
                table: self.connection.execute(f'SELECT * FROM "{table}" ORDER BY rowid').fetchall()
                for table in tables
            }
            self.version = version
        return self.rows

    async def close(self) -> None:
        self.connection.close()


class PostgresRows:
    """Every row of the gateway's PostgreSQL database (in any order), read each time."""

    def __init__(self, url: str, near: Path) -> None:
        self.dsn = url.replace("postgresql+asyncpg://", "postgresql://", 1)
        self.path = near / "gateway.db"  # no such file: a path for URI tricks to aim at
        self.connection = None

    async def current(self) -> dict[str, Counter]:
        import asyncpg

        if self.connection is None:
            self.connection = await asyncpg.connect(self.dsn)
        tables = await self.connection.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
        )
        return {
            row["tablename"]: Counter(
                tuple(r) for r in await self.connection.fetch(f'SELECT * FROM "{row["tablename"]}"')
            )
            for row in tables
        }

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()


class LogWatch(logging.Handler):
    """Every gateway (and gRPC) log line as it would be written: bounded, never holding a
    key, and no error: a crash the client never saw (the call had ended) is still one."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.json = JsonFormatter("gateway")
        self.problems: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = self.json.format(record)
        if len(line) > MAX_LOG_LINE:
            self.problems.append(f"a log line of {len(line)} characters: {line[:300]}")
        for key in KEYS:
            if key in line:
                self.problems.append(f"a log line holds a key: {line[:300]}")
        if record.levelno >= logging.ERROR:
            self.problems.append(f"an error was logged: {line[:1000]}")


def _artifact_uris(job: pb.Job) -> list[str]:
    uris = [
        job.video_uri,
        job.audio_uri,
        job.captions_srt.uri,
        job.captions_vtt.uri,
        job.poster.uri,
        job.contact_sheet.uri,
    ]
    for image in job.images:
        uris.append(image.uri)
        uris.extend(image.reference_uris)
    uris.extend(version.uri for version in job.versions)
    return sorted({uri for uri in uris if uri})


def _serialize(message) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


class Fuzz:
    """The gateway, what the fuzz knows of it, and the checks every answer goes through."""

    def __init__(self, under_test, store, rows, spool: Path) -> None:
        self.under_test = under_test
        self.channel: grpc.aio.Channel = under_test.channel
        self.stub = under_test.stub
        self.store = store
        self.rows = rows
        self.database_path = rows.path
        self.spool = spool
        self.root = store.root_uri
        self.counts: dict[str, Counter] = {rpc: Counter() for rpc in RPCS}
        self.failed = False
        #: Uploads sent again because the client library lost the server's answer.
        self.resent = 0
        self.logs = LogWatch()
        # What the fuzz draws from: jobs by tenant and state, their artifacts, uploads,
        # page tokens. Grown as requests succeed.
        self.owner: dict[str, str] = {}
        self.done: dict[str, list[str]] = {"alpha": [], "bravo": []}
        self.queued: dict[str, list[str]] = {"alpha": [], "bravo": []}
        self.review: dict[str, list[str]] = {"alpha": [], "bravo": []}
        #: Each job's storyboard and Job.storyboard_version, as last seen.
        self.boards: dict[str, types_pb2.Storyboard] = {}
        self.versions: dict[str, int] = {}
        self.images: dict[str, list[str]] = {"alpha": [], "bravo": []}
        self.ended: dict[str, list[str]] = {"alpha": [], "bravo": []}
        self.artifacts: dict[str, list[str]] = {}
        self.uploads: dict[str, list[str]] = {"alpha": [], "bravo": []}
        self.tokens: list[str] = []
        self.upload_folders = (upload_prefix("alpha"), upload_prefix("bravo"))
        self.methods = {
            rpc: getattr(self.channel, KINDS[rpc])(
                SERVICE + rpc,
                request_serializer=_serialize,
                response_deserializer=RESPONSE_TYPES[rpc].FromString,
            )
            for rpc in RPCS
        }

    # -- what the fuzz knows ----------------------------------------------------------------

    def jobs_of(self, tenant: str) -> list[str]:
        return self.done[tenant] + self.queued[tenant] + self.ended[tenant] + self.review[tenant]

    def all_uris(self, tenant: str) -> list[str]:
        jobs = self.done[tenant] + self.ended[tenant]
        uris = [uri for job in jobs for uri in self.artifacts.get(job, [])]
        return uris + self.uploads[tenant]

    async def remember(self, tenant: str, job_id: str) -> None:
        """File the job under its state, with its artifacts."""
        job = (await self.stub.GetJob(pb.GetJobRequest(job_id=job_id), metadata=_md(tenant))).job
        self.owner[job_id] = tenant
        for group in (self.done, self.queued, self.ended, self.review):
            if job_id in group[tenant]:
                group[tenant].remove(job_id)
        self.versions[job_id] = job.storyboard_version
        if job.HasField("storyboard"):
            self.boards[job_id] = job.storyboard
        if job.state == pb.JOB_STATE_REVIEW:
            self.review[tenant].append(job_id)
        elif job.state == pb.JOB_STATE_DONE:
            self.done[tenant].append(job_id)
        elif job.state in FINISHED:
            self.ended[tenant].append(job_id)
        else:
            self.queued[tenant].append(job_id)
        self.artifacts[job_id] = _artifact_uris(job)

    # -- one request ------------------------------------------------------------------------

    async def snapshot(self) -> tuple:
        return (_tree(self.store.root), _tree(self.spool), await self.rows.current())

    async def send(self, rpc: str, payload, auth: Auth) -> Outcome:
        call_method = self.methods[rpc]
        kind = KINDS[rpc]
        try:
            if kind == "unary_unary":
                response = await call_method(
                    payload, metadata=auth.metadata, timeout=CALL_TIMEOUT_S
                )
                return Outcome(Code.OK, "", [response])
            if kind == "stream_unary":
                return await self._send_stream(call_method, payload, auth)
            call = call_method(payload, metadata=auth.metadata, timeout=CALL_TIMEOUT_S)
            responses = []
            async for response in call:
                responses.append(response)
                if rpc == "WatchJob" and len(responses) == 1 and response.job.state not in FINISHED:
                    # The stream follows an unfinished job until it ends: stop here.
                    call.cancel()
                    return Outcome(Code.OK, "", responses, stopped=True)
            return Outcome(Code.OK, "", responses)
        except grpc.aio.AioRpcError as error:
            return Outcome(error.code(), error.details() or "")

    async def _send_stream(self, call_method, payload, auth: Auth) -> Outcome:
        """A client-streaming call, sent again when the client library lost the answer.

        grpcio's asyncio client reports INTERNAL "Internal error from Core" (a failed
        SendMessageOperation) when the server answered before the client had sent every
        message and a later write failed: the server's status is lost on the client side
        (https://github.com/grpc/grpc/issues/36066). The server ended the call early, so it
        refused the upload; the same request is sent again to read its answer.
        """
        messages, stall_s = payload

        async def stream():
            for i, message in enumerate(messages):
                if stall_s and i == len(messages) - 1:
                    await asyncio.sleep(stall_s)
                yield message

        for attempt in range(1, 6):
            try:
                response = await call_method(
                    stream(), metadata=auth.metadata, timeout=CALL_TIMEOUT_S
                )
                return Outcome(Code.OK, "", [response])
            except grpc.aio.AioRpcError as error:
                lost = (
                    error.code() == Code.INTERNAL
                    and error.details() == "Internal error from Core"
                    and "SendMessageOperation" in (error.debug_error_string() or "")
                )
                if not lost or attempt == 5:
                    raise
                self.resent += 1
        raise AssertionError("unreachable")

    async def exchange(self, rpc: str, payload, auth: Auth, size: int, facts: dict) -> Outcome:
        """Send one request and check its answer, and that a refusal wrote nothing."""
        before = await self.snapshot()
        outcome = await self.send(rpc, payload, auth)
        self.counts[rpc][outcome.code.name] += 1
        where = (
            f"{rpc} as {auth.name!r} ({_show(facts)}): {outcome.code.name} "
            f"{outcome.details[:300]!r}"
        )
        self.check_answer(rpc, auth, size, outcome, facts, where)
        if self.logs.problems:
            problems, self.logs.problems = self.logs.problems, []
            raise AssertionError(f"{where}: {problems[:3]}")
        if not (rpc in WRITERS and outcome.code == Code.OK):
            after = await self.snapshot()
            if after != before:
                raise AssertionError(f"{where} wrote: {_difference(before, after)}")
        return outcome

    def check_answer(
        self, rpc: str, auth: Auth, size: int, outcome: Outcome, facts: dict, where: str
    ) -> None:
        code = outcome.code
        assert code not in (Code.INTERNAL, Code.UNKNOWN), where
        assert len(outcome.details) <= MAX_DETAILS, where
        for key in {*KEYS, *(k for k in auth.presented if len(k) >= 12)}:
            assert key not in outcome.details, f"{where}: the message carries a key"
        if size > MAX_MESSAGE_BYTES:
            # gRPC refuses the message before the gateway sees it (or, before that, the key);
            # an upload's earlier messages may be refused first (no filename, say).
            allowed = {Code.RESOURCE_EXHAUSTED, Code.UNAUTHENTICATED}
            if KINDS[rpc].startswith("stream_"):
                allowed.add(Code.INVALID_ARGUMENT)
            assert code in allowed, where
            return
        if auth.name == "20 KB key":
            assert code in (Code.RESOURCE_EXHAUSTED, Code.UNAUTHENTICATED), where
            return
        if auth.tenant is None:
            assert code == Code.UNAUTHENTICATED, where
            return
        if facts.get("decodes") is False:
            assert code == Code.INVALID_ARGUMENT, where
            return
        assert code == Code.OK or code in DOCUMENTED[rpc], where
        if code == Code.DEADLINE_EXCEEDED:
            assert "cut off" in outcome.details, where  # the gateway's idle limit, not ours
        # Tenant isolation: another tenant's job is NOT_FOUND like one that does not exist.
        job_id = facts.get("job_id")
        if isinstance(job_id, str) and self.owner.get(job_id, auth.tenant) != auth.tenant:
            assert code in (Code.NOT_FOUND, Code.INVALID_ARGUMENT), where
        if code == Code.OK:
            self.check_success(rpc, auth.tenant, outcome, facts, where)

    def check_success(
        self, rpc: str, tenant: str, outcome: Outcome, facts: dict, where: str
    ) -> None:
        responses = outcome.responses
        if rpc in ("GetJob", "CancelJob", "RegenerateScene", "UpdateStoryboard"):
            assert self.owner.get(responses[0].job.job_id) == tenant, where
        elif rpc == "ApproveStoryboard":
            assert self.owner.get(responses[0].job.job_id) == tenant, where
            assert facts["job_id"] in self.review[tenant], where
            assert responses[0].job.state != pb.JOB_STATE_REVIEW, where
        elif rpc == "UploadImage":
            # Only whole images of a known format are kept.
            assert facts["body"] in IMAGES_TAKEN, where
            assert responses[0].format in ("png", "jpeg", "webp"), where
        elif rpc == "ListJobs":
            for job in responses[0].jobs:
                assert self.owner.get(job.job_id, tenant) == tenant, where
        elif rpc == "WatchJob":
            assert responses[0].kind == pb.EVENT_KIND_SNAPSHOT, where
            assert self.owner.get(responses[0].job.job_id) == tenant, where
            if not outcome.stopped:
                assert responses[-1].kind == pb.EVENT_KIND_JOB_FINISHED, where
        elif rpc == "ReadArtifact":
            assert self.owner.get(facts["job_id"]) == tenant, where
            first, chunks = responses[0], responses[1:]
            data = b"".join(chunk.chunk for chunk in chunks)
            expected = self.store.get_bytes(facts["uri"])
            assert first.size_bytes == len(expected), where
            assert data == expected[facts["offset"] :], where
        elif rpc == "CreateVideo":
            assert re.fullmatch(r"[0-9a-f]{32}", responses[0].job_id), where

    # -- after a request: keep the fuzz's knowledge (and the queue) in shape --------------------

    async def after(self, rpc: str, auth: Auth, outcome: Outcome, facts: dict) -> None:
        if outcome.code != Code.OK or auth.tenant is None:
            return
        tenant = auth.tenant
        if rpc == "CreateVideo":
            job_id = outcome.responses[0].job_id
            if job_id not in self.owner:
                await self.remember(tenant, job_id)
        elif rpc == "UploadAudio":
            uri = outcome.responses[0].audio_uri
            if len(self.uploads[tenant]) < 20:
                self.uploads[tenant].append(uri)
            else:
                # Enough to draw from: keep the store small, so each listing stays quick.
                await asyncio.to_thread(self.store.delete, uri)
        elif rpc == "UploadImage":
            uri = outcome.responses[0].image_uri
            if len(self.images[tenant]) < 20:
                self.images[tenant].append(uri)
            else:
                await asyncio.to_thread(self.store.delete, uri)
        elif rpc == "ApproveStoryboard":
            await self.remember(tenant, outcome.responses[0].job.job_id)
        elif rpc == "UpdateStoryboard":
            job = outcome.responses[0].job
            if job.state != pb.JOB_STATE_REVIEW:
                # A finished job runs again: cancel it, as after RegenerateScene.
                try:
                    await self.stub.CancelJob(
                        pb.CancelJobRequest(job_id=job.job_id), metadata=_md(tenant)
                    )
                except grpc.aio.AioRpcError as error:
                    if error.code() != Code.FAILED_PRECONDITION:  # it had ended already
                        raise
            await self.remember(tenant, job.job_id)
        elif rpc == "ListJobs":
            token = outcome.responses[0].next_page_token
            if token and len(self.tokens) < 50:
                self.tokens.append(token)
        elif rpc == "CancelJob":
            job_id = outcome.responses[0].job.job_id
            await self.remember(tenant, job_id)
            # Keep a job waiting to be cancelled.
            created = await self.stub.CreateVideo(
                pb.CreateVideoRequest(prompt="waits in the queue", scene_count=1),
                metadata=_md(tenant),
            )
            await self.remember(tenant, created.job_id)
        elif rpc == "RegenerateScene":
            # The job waits in the queue to run again: cancel it, so it can be regenerated
            # (or read) again as a finished job.
            job_id = outcome.responses[0].job.job_id
            await self.stub.CancelJob(pb.CancelJobRequest(job_id=job_id), metadata=_md(tenant))
            await self.remember(tenant, job_id)


def _md(tenant: str) -> tuple[tuple[str, str], ...]:
    return (_bearer(KEY_ALPHA if tenant == "alpha" else KEY_BRAVO),)


def _difference(before: tuple, after: tuple) -> str:
    said = []
    for name, old, new in zip(("store", "spool", "database"), before, after, strict=True):
        if old == new:
            continue
        if name == "database":
            for table in sorted(set(old) | set(new)):
                gone = set(old.get(table, [])) - set(new.get(table, []))
                came = set(new.get(table, [])) - set(old.get(table, []))
                if gone or came:
                    gone_rows, came_rows = sorted(map(str, gone)), sorted(map(str, came))
                    said.append(f"table {table}: -{gone_rows[:3]} +{came_rows[:3]}")
        else:
            said.append(
                f"{name}: -{sorted(map(str, old - new))[:5]} +{sorted(map(str, new - old))[:5]}"
            )
    return "; ".join(said)


@pytest.fixture
def gateway_database(request, sqlite_url):
    """SQLite, or PostgreSQL where a test asks for it (``indirect`` parametrization)."""
    if getattr(request, "param", "sqlite") == "postgresql":
        return new_postgres_database(request.getfixturevalue("postgres_server"))
    return sqlite_url


@pytest.fixture
async def fuzz(start_gateway, upstream, file_store, gateway_database, tmp_path, request):
    loop = asyncio.get_running_loop()
    setup_started = loop.time()
    spool = tmp_path / "upload-spool"
    under_test = await start_gateway(
        api_keys={"alpha": [KEY_ALPHA], "bravo": [key_digest(KEY_BRAVO)]},
        max_jobs_queued=10_000_000,
        max_jobs_queued_per_tenant=0,
        upload_idle_timeout_s=UPLOAD_IDLE_S,
        upload_ttl_s=7 * 24 * 3600.0,
        lease_s=3600.0,
        upload_tmp_dir=spool,
    )
    rows = (
        PostgresRows(gateway_database, tmp_path)
        if gateway_database.startswith("postgresql")
        else SqliteRows(gateway_database)
    )
    state = Fuzz(under_test, file_store, rows, spool)

    # Finished jobs with artifacts to read and regenerate, and an upload per tenant.
    async def upload(tenant: str) -> str:
        response = await upload_audio(state.stub, WAV, "track.wav", metadata=_md(tenant))
        return response.audio_uri

    for tenant in ("alpha", "bravo"):
        state.uploads[tenant].append(await upload(tenant))
    finished = [
        ("alpha", pb.CreateVideoRequest(prompt="A fox learns to fly", scene_count=2)),
        (
            "alpha",
            pb.CreateVideoRequest(
                prompt="A lighthouse keeper befriends a lost whale",
                scene_count=3,
                audio_uri=state.uploads["alpha"][0],
                captions=types_pb2.CAPTIONS_SIDECAR,
                consistency=types_pb2.CONSISTENCY_MODE_REFERENCE_IMAGES,
            ),
        ),
        (
            "bravo",
            pb.CreateVideoRequest(
                prompt="Bravo's own story", scene_count=2, audio_uri=state.uploads["bravo"][0]
            ),
        ),
    ]

    async def run(tenant: str, create: pb.CreateVideoRequest) -> str:
        job_id = (await state.stub.CreateVideo(create, metadata=_md(tenant))).job_id
        async for _ in state.stub.WatchJob(pb.WatchJobRequest(job_id=job_id), metadata=_md(tenant)):
            pass
        await manifest_written(file_store, job_id)  # so nothing changes later
        return job_id

    job_ids = await asyncio.gather(*(run(tenant, create) for tenant, create in finished))
    for (tenant, _), job_id in zip(finished, job_ids, strict=True):
        await state.remember(tenant, job_id)
    assert len(state.done["alpha"]) == 2 and len(state.done["bravo"]) == 1
    if request.node.callspec.params["rpc"] in REVIEW_RPCS:
        # Jobs waiting in REVIEW (WatchJob ends there), to edit and approve.
        reviewed = [("alpha", i) for i in range(4)] + [("bravo", 9)]

        async def review(tenant: str, i: int) -> str:
            create = pb.CreateVideoRequest(prompt=f"A story to review {i}", scene_count=2)
            create.review = True
            job_id = (await state.stub.CreateVideo(create, metadata=_md(tenant))).job_id
            watch = pb.WatchJobRequest(job_id=job_id)
            async for _ in state.stub.WatchJob(watch, metadata=_md(tenant)):
                pass
            return job_id

        made = await asyncio.gather(*(review(tenant, i) for tenant, i in reviewed))
        for (tenant, _), job_id in zip(reviewed, made, strict=True):
            await state.remember(tenant, job_id)
        assert len(state.review["alpha"]) == 4, state.review
    # From here on, as on a gateway whose slots are all taken, jobs wait in the queue.
    await under_test.running.service.runner.stop_claiming()
    for tenant, waiting in (("alpha", 3), ("bravo", 2)):
        for i in range(waiting):
            created = await state.stub.CreateVideo(
                pb.CreateVideoRequest(prompt=f"waiting {i}", scene_count=2), metadata=_md(tenant)
            )
            await state.remember(tenant, created.job_id)
    # A job cancelled before it ran (no storyboard, no artifacts).
    cancelled = state.queued["alpha"][0]
    await state.stub.CancelJob(pb.CancelJobRequest(job_id=cancelled), metadata=_md("alpha"))
    await state.remember("alpha", cancelled)

    loggers = [logging.getLogger(name) for name in ("storyreel", "storyreel_gateway", "grpc")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.INFO)
        logger.addHandler(state.logs)
    started = loop.time()
    yield state
    elapsed = loop.time() - started
    for logger, level in zip(loggers, levels, strict=True):
        logger.removeHandler(state.logs)
        logger.setLevel(level)
    await state.rows.close()
    rpc = request.node.callspec.params["rpc"]
    engine = "postgresql" if isinstance(rows, PostgresRows) else "sqlite"
    wanted = POSTGRES_REQUESTS_PER_RPC if engine == "postgresql" else REQUESTS_PER_RPC
    counts = state.counts[rpc]
    total = sum(counts.values())
    summary = ", ".join(f"{name} {n}" for name, n in counts.most_common())
    resent = f"; {state.resent} sent again (grpc/grpc#36066)" if state.resent else ""
    print(
        f"\nfuzz {rpc} ({engine}): {total} requests in {elapsed:.1f} s "
        f"(set-up {started - setup_started:.1f} s): {summary}{resent}"
    )
    request.node.user_properties.append((f"fuzz {rpc} {engine}", dict(counts)))
    if not state.failed:
        assert total >= wanted, f"{rpc}: only {total} requests were sent"


# -- requests, per call -----------------------------------------------------------------------


def message_fields(draw, fields: dict[str, tuple[st.SearchStrategy, st.SearchStrategy]]) -> dict:
    """Draw every field: all nearly valid, one hostile, or about half of them hostile."""
    mode = draw(st.sampled_from(["nearly valid"] * 4 + ["one hostile"] * 3 + ["hostile"] * 3))
    broken = draw(st.sampled_from(sorted(fields))) if mode == "one hostile" else None
    values = {}
    for name, (nearly, hostile) in fields.items():
        pick_hostile = draw(st.booleans()) if mode == "hostile" else name == broken
        values[name] = draw(hostile if pick_hostile else nearly)
    return values


def on_the_wire(draw, message) -> tuple[object, int]:
    """The message, or (now and then) bytes derived from it; with the size sent."""
    if draw(st.integers(0, 7)) == 5:
        raw = draw(wire_mutations(message))
        return raw, len(raw)
    return message, message.ByteSize()


def job_ids(fuzz: Fuzz, nearly: list[str]) -> tuple[st.SearchStrategy, st.SearchStrategy]:
    known = fuzz.jobs_of("alpha") + fuzz.jobs_of("bravo")
    hostile = weighted(
        (3, one_of_known(fuzz.jobs_of("bravo"))),
        (4, st.builds(lambda f, s: f(s), st.sampled_from(ID_MUTATIONS), one_of_known(known))),
        (1, st.uuids().map(lambda u: u.hex)),
        (4, hostile_text),
    )
    return one_of_known(nearly), hostile


def uris(fuzz: Fuzz, nearly: list[str]) -> st.SearchStrategy:
    known = nearly + fuzz.all_uris("alpha") + fuzz.all_uris("bravo")
    alpha, bravo = fuzz.upload_folders
    root = fuzz.root
    database = fuzz.database_path
    outside = [
        "file:///etc/passwd",
        database.as_uri(),
        root + "../gateway.db",
        root + "%2e%2e/gateway.db",
        root,
        root.rstrip("/"),
        root + "uploads/",
        root + alpha,
        root + bravo + "x/audio.wav",
        root + "jobs/",
        "s3://storyreel/uploads/x/audio.wav",
        "http://169.254.169.254/latest/meta-data/",
        "/etc/passwd",
        "uploads/x/audio.wav",
    ]
    return weighted(
        (3, one_of_known(fuzz.all_uris("bravo"))),
        (
            6,
            st.builds(
                lambda f, u: f(u),
                st.sampled_from(uri_mutations(root, alpha, bravo)),
                one_of_known(known),
            ),
        ),
        (3, st.sampled_from(outside)),
        (2, st.builds(operator.add, st.just(root), hostile_text)),
        (2, hostile_text),
    )


def create_case(draw, fuzz: Fuzz):
    uploads = fuzz.uploads["alpha"]
    audio = weighted((6, st.just("")), (2, one_of_known(uploads)))
    small = lambda default, others, wrong: weighted(  # noqa: E731
        (8, st.just(default)), (3, st.sampled_from(others)), (1, st.sampled_from(wrong))
    )
    fields = {
        "prompt": (
            weighted(
                (
                    8,
                    st.sampled_from(["A fox learns to fly", "A lighthouse keeper", "日本語の物語"]),
                ),
                (1, st.sampled_from(["x", "  padded  ", "x" * 2000, "x" * 2001, "<|system|>", ""])),
            ),
            hostile_text,
        ),
        "scene_count": (small(0, [1, 2, 3], [24, 25, -1]), int32s),
        "style": (small("", ["watercolor", "s" * 200], ["s" * 201]), hostile_text),
        "seed": (small(0, [1, 42, 2**63 - 1], [2**63, 2**64 - 1]), uint64s),
        "audio_uri": (audio, uris(fuzz, uploads)),
        "width": (small(0, [640, 1280, 64, 3840], [8, 321, 3848]), int32s),
        "height": (small(0, [360, 720, 64, 3840], [9, 3848]), int32s),
        "fps": (small(0, [24, 1, 60], [61]), int32s),
        "idempotency_key": (small("", ["k-1", "k-2", "k-3", "k" * 128], ["k" * 129]), hostile_text),
        "aspect": (small(0, [1, 2, 3], [4]), enum_values),
        "resolution": (small(0, [1, 2, 3], [4]), enum_values),
        "consistency": (small(0, [1, 2, 3, 4], [5]), enum_values),
        "captions": (small(0, [1, 2, 3], [4]), enum_values),
        "audio_mode": (small(0, [1, 2, 3], [4]), enum_values),
        "voice": (
            small("", ["joe"], ["JOE", "no-such-voice", "..", "../joe", "j" * 65]),
            hostile_text,
        ),
    }
    values = message_fields(draw, fields)
    request = pb.CreateVideoRequest(**values)
    payload, size = on_the_wire(draw, request)
    return payload, size, _facts("CreateVideo", payload, values)


def job_id_case(rpc: str):
    def case(draw, fuzz: Fuzz):
        nearly = fuzz.jobs_of("alpha")
        if rpc == "CancelJob":
            nearly = fuzz.queued["alpha"] * 3 + fuzz.jobs_of("alpha")
        values = message_fields(draw, {"job_id": job_ids(fuzz, nearly)})
        payload, size = on_the_wire(draw, REQUEST_TYPES[rpc](**values))
        return payload, size, _facts(rpc, payload, values)

    return case


def _facts(rpc: str, payload, values: dict) -> dict:
    """The request's fields the checks look at (those of the decoded bytes, for raw ones)."""
    if not isinstance(payload, bytes):
        return dict(values)
    try:
        message = REQUEST_TYPES[rpc].FromString(payload)
    except Exception:  # DecodeError: the gateway must refuse it
        return {"raw": payload, "decodes": False}
    decoded = {f.name: getattr(message, f.name) for f in message.DESCRIPTOR.fields}
    return {"raw": payload, "decodes": True, **decoded}


def _show(facts: dict) -> str:
    """The facts, each cut short, for a failure message."""
    shown = []
    for name, value in facts.items():
        text = repr(value)
        shown.append(f"{name}={text[:80]}{'...' if len(text) > 80 else ''}")
    return ", ".join(shown)


def list_case(draw, fuzz: Fuzz):
    def token(created: float, job_id: bytes) -> str:
        return base64.urlsafe_b64encode(struct.pack(">d", created) + job_id).decode()

    crafted = st.builds(
        token,
        st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e308, 5e-324]),
        one_of_known(
            [
                b"",
                b"x",
                b"../x",
                b"a" * 65,
                "é".encode(),
                b"\x00",
                b"\xff",
                *(job.encode() for job in fuzz.jobs_of("bravo")),
            ]
        ),
    )
    fields = {
        "page_size": (st.sampled_from([0, 0, 1, 2, 20, 100, 101, -1]), int32s),
        "page_token": (
            weighted((4, st.just("")), (2, one_of_known(fuzz.tokens or [""]))),
            weighted(
                (3, crafted),
                (2, st.binary(max_size=40).map(lambda b: base64.urlsafe_b64encode(b).decode())),
                (2, one_of_known(fuzz.tokens or [""]).map(lambda t: t[:-2] + "==")),
                (3, hostile_text),
            ),
        ),
    }
    values = message_fields(draw, fields)
    payload, size = on_the_wire(draw, pb.ListJobsRequest(**values))
    return payload, size, _facts("ListJobs", payload, values)


def regenerate_case(draw, fuzz: Fuzz):
    finished = fuzz.done["alpha"] + fuzz.ended["alpha"]
    fields = {
        "job_id": job_ids(fuzz, finished * 3 + fuzz.queued["alpha"]),
        "index": (
            weighted((5, st.integers(1, 3)), (1, st.sampled_from([0, 4, 99, -1]))),
            int32s,
        ),
        "prompt": (
            weighted(
                (4, st.none()),
                (3, st.sampled_from(["a new prompt", "the fox, at night"])),
                (1, st.sampled_from(["", "  ", "x" * 2001, "<|im_start|>"])),
            ),
            hostile_text,
        ),
        "seed": (
            weighted((4, st.none()), (2, st.sampled_from([0, 7, 2**63 - 1])), (1, st.just(2**63))),
            uint64s,
        ),
    }
    values = message_fields(draw, fields)
    request = pb.RegenerateSceneRequest(**{k: v for k, v in values.items() if v is not None})
    payload, size = on_the_wire(draw, request)
    return payload, size, _facts("RegenerateScene", payload, values)


def read_case(draw, fuzz: Fuzz):
    nearly_jobs, hostile_jobs = job_ids(fuzz, fuzz.done["alpha"])
    hostile = draw(st.booleans()) and draw(st.booleans())
    job_id = draw(hostile_jobs if hostile else nearly_jobs)
    own = fuzz.artifacts.get(job_id) or fuzz.all_uris("alpha")
    fields = {
        "uri": (one_of_known(own), uris(fuzz, own)),
        "offset": (
            weighted(
                (6, st.just(0)),
                (2, st.integers(1, 4)),
                (1, st.sampled_from([-1, 10**6, 2**63 - 1])),
            ),
            int64s,
        ),
    }
    values = {"job_id": job_id, **message_fields(draw, fields)}
    payload, size = on_the_wire(draw, pb.ReadArtifactRequest(**values))
    return payload, size, _facts("ReadArtifact", payload, values)


def _truncated_wav() -> bytes:
    return WAV[:200]  # the header says 0.5 s; 0.01 s follow


UPLOAD_BODIES = {
    "wav": [WAV],
    "wav in pieces": [WAV[:44], WAV[44:1000], WAV[1000:]],
    "wav with empty chunks": [b"", WAV, b""],
    "truncated wav": [_truncated_wav()],
    "wav header only": [WAV[:44]],
    "wav with no frames": [wav_bytes(0.0)],
    "too large": [WAV, b"\x00" * 70_000],
    "text": [b"plain text, not audio"],
    "mp3 header, then junk": [b"\xff\xfb\x90\x00" + b"\x00" * 400],
    "id3, then nothing": [b"ID3\x03\x00\x00\x00\x00\x00\x00"],
    "ogg, then junk": [b"OggS" + b"\x00" * 100],
    "flac, then junk": [b"fLaC" + b"\x00" * 100],
    "m4a playlist": [b"\x00\x00\x00\x18ftypM4A " + b"#EXTM3U\n" * 10],
    "hls playlist": [b"#EXTM3U\n#EXT-X-VERSION:3\nhttp://x/a.ts\n"],
    "nothing": [],
}


def upload_case(draw, fuzz: Fuzz):
    mode = draw(st.sampled_from(["nearly valid"] * 4 + ["hostile"] * 3))
    messages: list = []
    first = draw(
        weighted(
            (8, st.sampled_from(["track.wav", "a.mp3", "song.ogg", "x", "", "..wav"])),
            (3 if mode == "hostile" else 0, hostile_text),
            (1, st.just(None)),  # no filename message at all
        )
    )
    if first is not None:
        messages.append(pb.UploadAudioRequest(filename=first))
    body = draw(
        st.sampled_from(["wav"] * 6 + sorted(UPLOAD_BODIES))
        if mode == "nearly valid"
        else st.sampled_from(sorted(UPLOAD_BODIES))
    )
    messages += [pb.UploadAudioRequest(chunk=chunk) for chunk in UPLOAD_BODIES[body]]
    if mode == "hostile":
        extra = draw(
            weighted(
                (2, st.none()),
                (1, hostile_text.map(lambda name: pb.UploadAudioRequest(filename=name))),
                (1, st.binary(max_size=200).map(lambda data: pb.UploadAudioRequest(chunk=data))),
                (1, st.just(pb.UploadAudioRequest())),  # neither filename nor chunk
            )
        )
        if extra is not None:
            messages.insert(draw(st.integers(0, len(messages))), extra)
    if messages and draw(st.integers(0, 7)) == 5:
        at = draw(st.integers(0, len(messages) - 1))
        messages[at] = draw(wire_mutations(messages[at]))
    # Rarely (Hypothesis favours the ends of a range, so the value is one in the middle).
    stall_s = UPLOAD_IDLE_S + 0.3 if draw(st.integers(0, 199)) == 137 else 0.0
    size = max((len(_serialize(m)) for m in messages), default=0)
    facts = {"filename": first, "body": body, "messages": len(messages), "stall_s": stall_s}
    return (messages, stall_s), size, facts


def _png(width: int, height: int, rows: bytes | None = None) -> bytes:
    """A greyscale PNG; ``rows`` (the raw scanlines) default to black pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    if rows is None:
        rows = (b"\x00" + b"\x00" * width) * height
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


PNG = _png(4, 3)
IMAGE_BODIES = {
    "png": [PNG],
    "png in pieces": [PNG[:8], PNG[8:30], PNG[30:]],
    "png with empty chunks": [b"", PNG, b""],
    "truncated png": [PNG[:-20]],
    "png signature only": [PNG[:8]],
    "png cut in its header": [PNG[:20]],
    # A header claiming 100,000 x 100,000 pixels over a few bytes of data: refused
    # from the header, before anything is decoded.
    "decompression bomb": [_png(100_000, 100_000, rows=b"\x00" * 64)],
    "bomb, one dimension": [_png(1, 2**31 - 1, rows=b"\x00" * 64)],
    "zero-size png": [_png(0, 0, rows=b"")],
    "png, bad crc": [PNG[:29] + bytes([PNG[29] ^ 0xFF]) + PNG[30:]],
    "text": [b"plain text, not an image"],
    "svg": [b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'],
    "jpeg header, then junk": [b"\xff\xd8\xff\xe0" + b"\x00" * 200],
    "webp header, then junk": [b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"\x00" * 40],
    "gif": [b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"],
    "wav": [WAV],
    "too large": [PNG, b"\x00" * (MAX_MESSAGE_BYTES + 10)],
    "nothing": [],
}
#: The bodies an UploadImage may accept.
IMAGES_TAKEN = {"png", "png in pieces", "png with empty chunks"}


def image_upload_case(draw, fuzz: Fuzz):
    mode = draw(st.sampled_from(["nearly valid"] * 4 + ["hostile"] * 3))
    messages: list = []
    first = draw(
        weighted(
            (8, st.sampled_from(["face.png", "a.jpg", "x", "", "..png", "face.wav"])),
            (3 if mode == "hostile" else 0, hostile_text),
            (1, st.just(None)),  # no filename message at all
        )
    )
    if first is not None:
        messages.append(pb.UploadImageRequest(filename=first))
    body = draw(
        st.sampled_from(["png"] * 6 + sorted(IMAGE_BODIES))
        if mode == "nearly valid"
        else st.sampled_from(sorted(IMAGE_BODIES))
    )
    messages += [pb.UploadImageRequest(chunk=chunk) for chunk in IMAGE_BODIES[body]]
    if mode == "hostile":
        extra = draw(
            weighted(
                (2, st.none()),
                (1, hostile_text.map(lambda name: pb.UploadImageRequest(filename=name))),
                (1, st.binary(max_size=200).map(lambda data: pb.UploadImageRequest(chunk=data))),
                (1, st.just(pb.UploadImageRequest())),  # neither filename nor chunk
            )
        )
        if extra is not None:
            messages.insert(draw(st.integers(0, len(messages))), extra)
    if messages and draw(st.integers(0, 7)) == 5:
        at = draw(st.integers(0, len(messages) - 1))
        messages[at] = draw(wire_mutations(messages[at]))
    stall_s = UPLOAD_IDLE_S + 0.3 if draw(st.integers(0, 199)) == 137 else 0.0
    size = max((len(_serialize(m)) for m in messages), default=0)
    facts = {"filename": first, "body": body, "messages": len(messages), "stall_s": stall_s}
    return (messages, stall_s), size, facts


def versions(fuzz: Fuzz, job_id: str) -> tuple[st.SearchStrategy, st.SearchStrategy]:
    """The job's current storyboard_version (mostly), and hostile ones."""
    current = fuzz.versions.get(job_id, 0)
    nearly = weighted((6, st.just(current)), (1, st.sampled_from([current - 1, current + 1, 0])))
    return nearly, int32s


def _scene_text(hostile: bool) -> st.SearchStrategy:
    nearly = st.sampled_from(
        ["The fox looks up.", "On a rocky beach at dawn", "close-up", "日本語"]
    )
    return hostile_text if hostile else nearly


def _edit_text(name: str):
    def edit(draw, board, fuzz, hostile):
        at, text = draw(st.integers(0, 2**8)), draw(_scene_text(hostile))
        if board.scenes:
            setattr(board.scenes[at % len(board.scenes)], name, text)

    return edit


def _edit_board(name: str):
    def edit(draw, board, fuzz, hostile):
        setattr(board, name, draw(_scene_text(hostile)))

    return edit


def _drop_scene(draw, board, fuzz, hostile):
    at = draw(st.integers(0, 2**8))
    if board.scenes and (hostile or len(board.scenes) > 1):
        del board.scenes[at % len(board.scenes)]


def _copy_scene(draw, board, fuzz, hostile):
    times = draw(st.sampled_from([1, 2, 30] if hostile else [1]))
    if board.scenes:
        for _ in range(times):
            board.scenes.add().CopyFrom(board.scenes[-1])


def _reverse_scenes(draw, board, fuzz, hostile):
    scenes = list(board.scenes)[::-1]
    del board.scenes[:]
    board.scenes.extend(scenes)


def _scene_index(draw, board, fuzz, hostile):
    index = draw(int32s)
    if board.scenes:
        board.scenes[0].index = index


def _scene_cast(draw, board, fuzz, hostile):
    names = [c.name for c in board.characters] or ["nobody"]
    name = draw(hostile_text if hostile else one_of_known(names))
    if board.scenes:
        board.scenes[-1].characters.append(name)


def _character(draw, board, fuzz, hostile):
    names = [c.name for c in board.characters] or ["Fox"]
    text = _scene_text(hostile)
    name = draw(
        weighted(
            (2, text),
            (1, one_of_known(names).map(str.upper)),  # a duplicate, but for its case
            (1, st.sampled_from(["", " ", "Owl"])),
        )
    )
    appearance = draw(
        weighted((2, text), (1, st.sampled_from(["", "a" * 80, "a" * 81, "red fur\nblue eyes"])))
    )
    board.characters.add(name=name, appearance=appearance)


def _reference(draw, board, fuzz, hostile):
    own = fuzz.images["alpha"] or [""]
    pick = uris(fuzz, own + fuzz.images["bravo"]) if hostile else one_of_known(own)
    uri = draw(pick)
    if board.characters:
        board.characters[0].reference_uri = uri


def _empty_board(draw, board, fuzz, hostile):
    board.Clear()


STORYBOARD_EDITS = [
    _edit_text("narration"),
    _edit_text("image_prompt"),
    _edit_text("setting"),
    _edit_text("action"),
    _edit_text("camera"),
    _edit_board("title"),
    _edit_board("logline"),
    _edit_board("style"),
    _drop_scene,
    _copy_scene,
    _reverse_scenes,
    _scene_index,
    _scene_cast,
    _character,
    _reference,
    _empty_board,
]


def storyboards(fuzz: Fuzz, job_id: str) -> tuple[st.SearchStrategy, st.SearchStrategy]:
    """The job's storyboard (or another's) with a few edits: nearly valid or hostile ones."""
    known = [board for _, board in sorted(fuzz.boards.items())]

    @st.composite
    def edited(draw, hostile: bool):
        board = types_pb2.Storyboard()
        base = fuzz.boards.get(job_id)
        own, other = draw(st.integers(0, 5)), draw(one_of_known(known or [board]))
        board.CopyFrom(base if base is not None and own else other)
        edits = STORYBOARD_EDITS if hostile else STORYBOARD_EDITS[:11]
        for edit in draw(st.lists(st.sampled_from(edits), max_size=4 if hostile else 2)):
            edit(draw, board, fuzz, hostile)
        return board

    return edited(False), edited(True)


def update_case(draw, fuzz: Fuzz):
    nearly_jobs, hostile_jobs = job_ids(
        fuzz, fuzz.review["alpha"] * 3 + fuzz.done["alpha"] + fuzz.ended["alpha"]
    )
    job_id = draw(hostile_jobs if draw(st.integers(0, 4)) == 0 else nearly_jobs)
    nearly_board, hostile_board = storyboards(fuzz, job_id)
    values = {
        "job_id": job_id,
        **message_fields(
            draw, {"storyboard": (nearly_board, hostile_board), "version": versions(fuzz, job_id)}
        ),
    }
    payload, size = on_the_wire(draw, pb.UpdateStoryboardRequest(**values))
    return payload, size, _facts("UpdateStoryboard", payload, values)


def approve_case(draw, fuzz: Fuzz):
    nearly_jobs, hostile_jobs = job_ids(
        fuzz, fuzz.review["alpha"] * 3 + fuzz.queued["alpha"] + fuzz.done["alpha"]
    )
    job_id = draw(hostile_jobs if draw(st.integers(0, 4)) == 0 else nearly_jobs)
    nearly_version, hostile_version = versions(fuzz, job_id)
    # Mostly a stale or hostile version: a right one lets the job go, and few wait in REVIEW.
    version = draw(weighted((1, nearly_version), (3, hostile_version)))
    values = {"job_id": job_id, "version": version}
    payload, size = on_the_wire(draw, pb.ApproveStoryboardRequest(**values))
    return payload, size, _facts("ApproveStoryboard", payload, values)


CASES = {
    "CreateVideo": create_case,
    "GetJob": job_id_case("GetJob"),
    "WatchJob": job_id_case("WatchJob"),
    "UploadAudio": upload_case,
    "ListJobs": list_case,
    "CancelJob": job_id_case("CancelJob"),
    "RegenerateScene": regenerate_case,
    "ReadArtifact": read_case,
    "UpdateStoryboard": update_case,
    "ApproveStoryboard": approve_case,
    "UploadImage": image_upload_case,
}


FUZZ_SETTINGS = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "phases": (Phase.explicit, Phase.generate, Phase.shrink),
    "suppress_health_check": list(HealthCheck),
    "print_blob": False,
}


async def one_example(fuzz: Fuzz, rpc: str, data) -> None:
    """Draw a request; send it with alpha's key and with another authorization."""
    try:
        payload, size, facts = CASES[rpc](data.draw, fuzz)
        other = data.draw(other_auths, label="other authorization")
        for auth in (other, ALPHA):
            outcome = await fuzz.exchange(rpc, payload, auth, size, facts)
            await fuzz.after(rpc, auth, outcome, facts)
    except BaseException:
        fuzz.failed = True
        raise


@pytest.mark.parametrize("rpc", RPCS)
@settings(max_examples=REQUESTS_PER_RPC // 2 + 25, **FUZZ_SETTINGS)
@given(data=st.data())
async def test_every_answer_is_documented_and_a_refusal_writes_nothing(fuzz, rpc, data):
    await one_example(fuzz, rpc, data)


@pytest.mark.parametrize("gateway_database", ["postgresql"], indirect=True)
@pytest.mark.parametrize("rpc", RPCS)
@settings(max_examples=POSTGRES_REQUESTS_PER_RPC // 2 + 10, **FUZZ_SETTINGS)
@given(data=st.data())
async def test_the_same_on_postgresql(fuzz, rpc, data):
    """A shorter run on PostgreSQL, which refuses what SQLite takes (a NUL in text)."""
    await one_example(fuzz, rpc, data)
