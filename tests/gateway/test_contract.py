"""The public contract: it stands alone, it stays compatible, and it gives remote clients
their results.

* gateway.proto imports nothing internal, only the shared types.v1, so a client
  compiles those two files; every contract names its Go, Java and C# packages.
* Against protos/baseline.binpb (the contracts as last released), every message
  of the public API keeps its wire and JSON encodings, buf's breaking check
  catches a breaking change, and its written exceptions are still needed.
* Seeds: one range, 0 to 2^63-1, for every call that takes one.
* ReadArtifact streams the caller's own artifacts and nothing else.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import grpc
import pytest
import yaml
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from storyreel_gateway.admission import MAX_SEED
from support import ALICE, API_KEYS, BOB, REPO, finished_job, upload_requests, wav_bytes

from storyreel.errors import InvalidInput, NotFound
from storyreel.gateway.v1 import gateway_pb2 as pb
from storyreel.settings import StorageSettings
from storyreel.storage import READ_CHUNK_BYTES, FileStore, open_store
from storyreel.types.v1 import types_pb2

PROTOS = REPO / "protos"
BASELINE = PROTOS / "baseline.binpb"
BUF = REPO / "tools" / "buf" / "node_modules" / ".bin" / "buf"


def _protos() -> list[Path]:
    return sorted(PROTOS.rglob("*.proto"))


# -- a contract that stands alone ------------------------------------------------------------


SHARED = "storyreel/types/v1/types.proto"


def test_gateway_proto_imports_only_well_known_types_and_the_shared_ones():
    imports = [dep.name for dep in pb.DESCRIPTOR.dependencies]
    assert SHARED in imports
    assert all(name.startswith("google/protobuf/") or name == SHARED for name in imports), imports
    shared = next(dep for dep in pb.DESCRIPTOR.dependencies if dep.name == SHARED)
    # The shared types lean on nothing at all.
    assert not list(shared.dependencies)
    # Every message and enum a field of the public API uses is the API's own, shared or
    # well-known.
    for message in pb.DESCRIPTOR.message_types_by_name.values():
        for field in message.fields:
            used = field.message_type or field.enum_type
            if used is not None:
                assert used.file.name in [*imports, pb.DESCRIPTOR.name], (
                    f"{message.name}.{field.name} uses {used.full_name}"
                )


def test_every_contract_takes_the_shared_values_from_the_shared_types():
    """No contract defines an enum or message of its own under a shared type's name."""
    shared = importlib.import_module("storyreel.types.v1.types_pb2").DESCRIPTOR
    names = {*shared.enum_types_by_name, *shared.message_types_by_name}
    for path in _protos():
        relative = path.relative_to(PROTOS)
        if relative.as_posix() == SHARED:
            continue
        module = importlib.import_module(
            ".".join(relative.with_suffix("").parts[:-1]) + f".{path.stem}_pb2"
        )
        own = {*module.DESCRIPTOR.enum_types_by_name, *module.DESCRIPTOR.message_types_by_name}
        # A contract may have a Scene or a Character of its own shape (diffusion.v1's carry
        # seeds); the enums and the Storyboard are the shared ones.
        assert not own & (names - {"Scene", "Character"}), (relative, own & names)


def test_a_client_compiles_gateway_proto_and_the_shared_types_and_nothing_else(tmp_path):
    """The two files a client copies are enough (the well-known types ship with protoc)."""
    from grpc_tools import protoc

    for name in ("storyreel/gateway/v1/gateway.proto", SHARED):
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(PROTOS / name, tmp_path / "in" / name)
    out = tmp_path / "out"
    out.mkdir()
    well_known = Path(protoc.__file__).parent / "_proto"
    code = protoc.main(
        [
            "protoc",
            f"-I{tmp_path / 'in'}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            "storyreel/gateway/v1/gateway.proto",
            SHARED,
        ]
    )
    assert code == 0
    assert (out / "storyreel/gateway/v1/gateway_pb2_grpc.py").is_file()
    assert (out / "storyreel/types/v1/types_pb2.py").is_file()


@pytest.mark.parametrize("path", _protos(), ids=lambda p: p.relative_to(PROTOS).as_posix())
def test_every_contract_names_its_go_java_and_csharp_packages(path):
    relative = path.relative_to(PROTOS)
    area = relative.parts[1]
    module = importlib.import_module(
        ".".join(relative.with_suffix("").parts[:-1]) + f".{path.stem}_pb2"
    )
    options = module.DESCRIPTOR.GetOptions()
    assert options.go_package == f"storyreel.dev/gen/go/storyreel/{area}/v1;{area}v1"
    assert options.java_package == f"dev.storyreel.{area}.v1"
    assert options.java_multiple_files is True
    assert options.csharp_namespace == f"Storyreel.{area.capitalize()}.V1"


# -- compatibility with the last release ------------------------------------------------------


def _baseline_pool() -> descriptor_pool.DescriptorPool:
    # A buf image is wire-compatible with a FileDescriptorSet.
    files = descriptor_pb2.FileDescriptorSet.FromString(BASELINE.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)
    return pool


def _fill(message: Message, depth: int = 0) -> Message:
    """Every field of ``message`` set to a non-default value, recursively."""
    for field in message.DESCRIPTOR.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth > 3 or field.message_type.full_name.startswith("google.protobuf."):
                continue
            target = getattr(message, field.name)
            _fill(target.add() if field.is_repeated else target, depth + 1)
            continue
        if field.type == FieldDescriptor.TYPE_ENUM:
            value = field.enum_type.values[-1].number
        elif field.type == FieldDescriptor.TYPE_STRING:
            value = f"{field.name}-x"
        elif field.type == FieldDescriptor.TYPE_BYTES:
            value = b"\x00\xff"
        elif field.type == FieldDescriptor.TYPE_BOOL:
            value = True
        elif field.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
            value = 2.5
        else:
            value = field.number + 7
        if field.containing_oneof is not None and message.WhichOneof(field.containing_oneof.name):
            continue
        if field.is_repeated:
            getattr(message, field.name).append(value)
        else:
            setattr(message, field.name, value)
    return message


def test_every_public_message_of_the_last_release_keeps_its_wire_and_json_encodings():
    """Old clients and new clients read each other's messages, in binary and in JSON."""
    pool = _baseline_pool()
    old_file = pool.FindFileByName("storyreel/gateway/v1/gateway.proto")
    # The baseline is the release before gateway.proto stood alone.
    assert "storyreel/story/v1/story.proto" in [d.name for d in old_file.dependencies]
    checked = []
    for name, old_type in old_file.message_types_by_name.items():
        old_class = message_factory.GetMessageClass(old_type)
        new_class = getattr(pb, name)
        old = _fill(old_class())
        # Binary: today's type reads every field the old one wrote (JSON leaves out unknown
        # fields, so a field read as unknown or as another type shows here), and back.
        new = new_class.FromString(old.SerializeToString())
        assert json_format.MessageToDict(new) == json_format.MessageToDict(old), name
        assert old_class.FromString(new.SerializeToString()) == old, name
        # JSON: the same names for fields and enum values.
        assert json_format.Parse(json_format.MessageToJson(old), new_class()) == new, name
        assert json_format.Parse(json_format.MessageToJson(new), old_class()) == old, name
        checked.append(name)
    assert {"CreateVideoRequest", "Job", "WatchJobResponse"} <= set(checked)


def test_the_public_enums_keep_the_numbers_and_names_of_the_internal_ones():
    pool = _baseline_pool()
    old = pool.FindMessageTypeByName("storyreel.gateway.v1.Job")
    for field in ("aspect", "resolution", "consistency", "captions", "audio_mode"):
        before = {(v.name, v.number) for v in old.fields_by_name[field].enum_type.values}
        now = {(v.name, v.number) for v in pb.Job.DESCRIPTOR.fields_by_name[field].enum_type.values}
        assert before <= now, field


def _buf(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    if not BUF.exists():
        pytest.fail(f"{BUF} is missing: run `make buf` (npm ci in tools/buf)")
    return subprocess.run(
        [str(BUF), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def _findings(result: subprocess.CompletedProcess) -> set[tuple[str, str, str]]:
    """(rule, file, message) of every finding of a ``--error-format json`` run."""
    found = set()
    for line in result.stdout.splitlines():
        if line.strip():
            finding = json.loads(line)
            # A deleted file's finding has no path: the message names the file.
            path = finding.get("path") or "protos/" + re.search(
                r'file "([^"]+)"', finding["message"]
            ).group(1)
            found.add((finding["type"], path, finding["message"]))
    return found


def _moved(number: int, field: str, message: str, old: str) -> tuple[str, str, str]:
    new = "storyreel.types.v1." + old.rsplit(".", 1)[1]
    return (
        "FIELD_SAME_TYPE",
        "protos/storyreel/gateway/v1/gateway.proto",
        f'Field "{number}" with name "{field}" on message "{message}" changed type '
        f'from "{old}" to "{new}".',
    )


def _option(area: str, option: str, before: str, after: str) -> tuple[str, str, str]:
    rule = {
        "csharp_namespace": "FILE_SAME_CSHARP_NAMESPACE",
        "go_package": "FILE_SAME_GO_PACKAGE",
        "java_multiple_files": "FILE_SAME_JAVA_MULTIPLE_FILES",
        "java_package": "FILE_SAME_JAVA_PACKAGE",
    }[option]
    return (
        rule,
        f"protos/storyreel/{area}/v1/{area}.proto",
        f'File option "{option}" changed from "{before}" to "{after}".',
    )


#: The internal contracts as the baseline named them, renamed after their services since.
_RENAMED = {"story": "llm", "render": "diffusion", "compose": "composer"}
#: What buf breaking finds against the baseline with buf.yaml's ignore_only taken out:
#: exactly the findings that ignore_only documents (gateway.proto on the shared types, the
#: internal contracts renamed, the language options set for the first time), field by
#: field. buf's ignore_only works per file; this list holds it to these findings, so any
#: other change in those files fails.
EXCEPTED = {
    *(
        _moved(number, field, message, old)
        for message, first in (("CreateVideoRequest", 10), ("Job", 22))
        for number, field, old in zip(
            range(first, first + 5),
            ("aspect", "resolution", "consistency", "captions", "audio_mode"),
            (
                "storyreel.compose.v1.Aspect",
                "storyreel.compose.v1.Resolution",
                "storyreel.render.v1.ConsistencyMode",
                "storyreel.compose.v1.Captions",
                "storyreel.compose.v1.AudioMode",
            ),
            strict=True,
        )
    ),
    _moved(9, "storyboard", "Job", "storyreel.story.v1.Storyboard"),
    *(
        (
            "FILE_NO_DELETE",
            f"protos/storyreel/{old}/v1/{old}.proto",
            f'Previously present file "storyreel/{old}/v1/{old}.proto" was deleted.',
        )
        for old in _RENAMED
    ),
    *(
        _option(area, option, *change)
        for area in ("gateway",)
        for option, change in {
            "csharp_namespace": ("", f"Storyreel.{area.capitalize()}.V1"),
            "go_package": ("", f"storyreel.dev/gen/go/storyreel/{area}/v1;{area}v1"),
            "java_multiple_files": ("false", "true"),
            "java_package": ("", f"dev.storyreel.{area}.v1"),
        }.items()
    ),
}


def _breaking_without_exceptions(cwd: Path = REPO) -> tuple[set, dict]:
    """(findings, buf.yaml's ignore_only) of buf breaking with ignore_only taken out."""
    config = yaml.safe_load((cwd / "buf.yaml").read_text())
    exceptions = config["breaking"].pop("ignore_only", {})
    result = _buf(
        "breaking",
        "--against",
        str(BASELINE),
        "--error-format",
        "json",
        "--config",
        json.dumps(config),
        cwd=cwd,
    )
    assert result.returncode in (0, 100), result.stderr  # 100: breaking changes found
    return _findings(result), exceptions


def test_buf_lint_and_breaking_pass():
    lint = _buf("lint")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    breaking = _buf("breaking", "--against", str(BASELINE.relative_to(REPO)))
    assert breaking.returncode == 0, breaking.stdout + breaking.stderr


def test_the_breaking_exceptions_cover_exactly_the_documented_findings():
    """Nothing else breaks; and once the baseline moves on, the exceptions must go."""
    found, exceptions = _breaking_without_exceptions()
    if not found:
        assert not exceptions, (
            "nothing breaks against the baseline any more: remove ignore_only from buf.yaml "
            "and empty EXCEPTED here"
        )
        return
    assert found == EXCEPTED
    # ignore_only names every rule of these findings and the files they are in.
    for rule, path, _ in found:
        assert any(path.startswith(p) for p in exceptions.get(rule, [])), (rule, path)


@pytest.mark.parametrize(
    ("before", "after", "rule"),
    [
        (
            "  string job_id = 1;\n}\n\nmessage GetJobResponse",
            "  string job_id = 7;\n}\n\nmessage GetJobResponse",
            "FIELD_NO_DELETE",
        ),
        ("  JOB_STATE_DONE = 3;", "  JOB_STATE_FINISHED = 3;", "ENUM_VALUE_SAME_NAME"),
        # In a file whose other type changes are excepted: still caught, field by field.
        (
            "  int32 scene_count = 2;\n  // Style",
            "  int64 scene_count = 2;\n  // Style",
            "FIELD_SAME_TYPE",
        ),
        (
            'java_package = "dev.storyreel.gateway.v1"',
            'java_package = "dev.storyreel.gateway"',
            "FILE_SAME_JAVA_PACKAGE",
        ),
    ],
)
def test_a_breaking_change_is_caught(tmp_path, before, after, rule):
    shutil.copytree(PROTOS, tmp_path / "protos")
    shutil.copy(REPO / "buf.yaml", tmp_path / "buf.yaml")
    path = tmp_path / "protos/storyreel/gateway/v1/gateway.proto"
    text = path.read_text()
    assert before in text
    path.write_text(text.replace(before, after, 1))
    found, _ = _breaking_without_exceptions(tmp_path)
    assert rule in {finding[0] for finding in found - EXCEPTED}


# -- seeds ------------------------------------------------------------------------------------


def _comment_before(text: str, declaration: str) -> str:
    """The comment lines right above ``declaration`` in a .proto file."""
    lines = text[: text.index(declaration)].rsplit("\n", 1)[0].splitlines()
    comment = []
    for line in reversed(lines):
        if not line.strip().startswith("//"):
            break
        comment.insert(0, line.strip().removeprefix("//").strip())
    return " ".join(comment)


def test_the_seed_range_is_documented_once_for_every_seed_a_client_sends():
    text = (PROTOS / "storyreel/gateway/v1/gateway.proto").read_text()
    assert "2^63-1" in _comment_before(text, "uint64 seed = 4;\n  // URI returned by UploadAudio")
    assert "2^63-1" in _comment_before(text, "optional uint64 seed = 4;")
    assert MAX_SEED == 2**63 - 1


@pytest.mark.parametrize("seed", [2**63, 2**64 - 1])
async def test_a_seed_beyond_the_range_is_refused_the_same_way_by_every_call(gateway, seed):
    expected = "seed must be between 0 and 2^63-1 (9223372036854775807)"
    with pytest.raises(grpc.aio.AioRpcError) as create:
        await gateway.CreateVideo(pb.CreateVideoRequest(prompt="x", seed=seed))
    assert create.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in create.value.details()

    job_id = (await gateway.CreateVideo(pb.CreateVideoRequest(prompt="x", seed=MAX_SEED))).job_id
    job = await finished_job(gateway, job_id)
    assert job.seed == MAX_SEED and job.state == pb.JOB_STATE_DONE
    with pytest.raises(grpc.aio.AioRpcError) as regenerate:
        await gateway.RegenerateScene(pb.RegenerateSceneRequest(job_id=job_id, index=1, seed=seed))
    assert regenerate.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in regenerate.value.details()
    response = await gateway.RegenerateScene(
        pb.RegenerateSceneRequest(job_id=job_id, index=1, seed=MAX_SEED)
    )
    assert response.job.state == pb.JOB_STATE_QUEUED


# -- results for remote clients: ReadArtifact -------------------------------------------------


async def _read(stub, job_id: str, uri: str, offset: int = 0, metadata=()):
    """(first message, the chunks' sizes, the bytes) of one ReadArtifact call."""
    request = pb.ReadArtifactRequest(job_id=job_id, uri=uri, offset=offset)
    messages = [m async for m in stub.ReadArtifact(request, metadata=metadata, timeout=30)]
    head, rest = messages[0], messages[1:]
    return head, [len(m.chunk) for m in rest], b"".join(m.chunk for m in rest)


async def _refused(stub, job_id: str, uri: str, metadata=(), offset: int = 0):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _read(stub, job_id, uri, offset, metadata)
    return caught.value


async def test_a_finished_jobs_every_artifact_streams_back_byte_for_byte(gateway, file_store):
    job_id = (await gateway.CreateVideo(pb.CreateVideoRequest(prompt="x", scene_count=2))).job_id
    job = await finished_job(gateway, job_id)
    assert job.state == pb.JOB_STATE_DONE

    head, sizes, data = await _read(gateway, job_id, job.video_uri)
    assert data == file_store.get_bytes(job.video_uri)
    assert (head.size_bytes, head.content_type, head.chunk) == (len(data), "video/mp4", b"")
    uris = [
        job.video_uri,
        job.captions_srt.uri,
        job.captions_vtt.uri,
        job.poster.uri,
        job.contact_sheet.uri,
        *(image.uri for image in job.images),
        *(version.uri for version in job.versions),
    ]
    assert all(uris)
    for uri in uris:
        head, _, data = await _read(gateway, job_id, uri)
        assert data == file_store.get_bytes(uri) and head.size_bytes == len(data), uri
    head, _, _ = await _read(gateway, job_id, job.poster.uri)
    assert head.content_type == "image/png"

    # An interrupted download resumes from an offset.
    whole = file_store.get_bytes(job.video_uri)
    head, _, tail = await _read(gateway, job_id, job.video_uri, offset=1)
    assert tail == whole[1:] and head.size_bytes == len(whole)
    head, sizes, tail = await _read(gateway, job_id, job.video_uri, offset=len(whole))
    assert (tail, sizes, head.size_bytes) == (b"", [], len(whole))
    for offset in (len(whole) + 1, -1):
        refused = await _refused(gateway, job_id, job.video_uri, offset=offset)
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "offset" in refused.details()


async def test_every_uri_the_api_shows_for_a_job_can_be_read(gateway, file_store):
    """A URI field added to Job later is readable too, or this fails."""
    job_id = (await gateway.CreateVideo(pb.CreateVideoRequest(prompt="x", scene_count=1))).job_id
    job = await finished_job(gateway, job_id)

    def uris(message: Message) -> list[str]:
        found = []
        for field, value in message.ListFields():
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                for item in value if field.is_repeated else [value]:
                    found += uris(item)
            elif field.type == FieldDescriptor.TYPE_STRING and field.name.endswith(("uri", "uris")):
                found += list(value) if field.is_repeated else [value]
        return found

    shown = uris(job)
    assert len(shown) >= 6
    for uri in shown:
        _, _, data = await _read(gateway, job_id, uri)
        assert data == file_store.get_bytes(uri), uri


async def test_an_artifact_streams_in_256_kib_chunks_and_the_jobs_own_upload_is_readable(
    start_gateway,
):
    stub = (await start_gateway(max_upload_bytes=4 * 1024 * 1024)).stub
    audio = wav_bytes(8.0, rate=44100)  # about 690 KiB: three chunks
    assert 2 * READ_CHUNK_BYTES < len(audio) < 3 * READ_CHUNK_BYTES

    uri = (await stub.UploadAudio(upload_requests(audio, "song.wav", 60_000))).audio_uri
    job_id = (await stub.CreateVideo(pb.CreateVideoRequest(prompt="x", audio_uri=uri))).job_id
    head, sizes, data = await _read(stub, job_id, uri)
    assert data == audio and head.size_bytes == len(audio)
    assert sizes == [READ_CHUNK_BYTES, READ_CHUNK_BYTES, len(audio) - 2 * READ_CHUNK_BYTES]
    assert head.content_type in {"audio/x-wav", "audio/wav"}


async def test_every_version_of_a_regenerated_job_stays_readable(gateway, file_store):
    job_id = (
        await gateway.CreateVideo(pb.CreateVideoRequest(prompt="x", scene_count=2, seed=5))
    ).job_id
    before = await finished_job(gateway, job_id)
    old_image = next(image for image in before.images if image.index == 2)
    await gateway.RegenerateScene(pb.RegenerateSceneRequest(job_id=job_id, index=2, seed=1234))
    after = await finished_job(gateway, job_id)
    new_image = next(image for image in after.images if image.index == 2)
    assert new_image.uri != old_image.uri and after.video_uri != before.video_uri
    # The render double draws "png <seed>": each version reads back as its own run drew it.
    assert (await _read(gateway, job_id, old_image.uri))[2] == f"png {old_image.seed}".encode()
    assert (await _read(gateway, job_id, new_image.uri))[2] == b"png 1234"
    assert (await _read(gateway, job_id, before.video_uri))[2] == file_store.get_bytes(
        before.video_uri
    )


async def test_nothing_but_the_callers_own_artifacts_can_be_read(start_gateway, file_store):
    stub = (await start_gateway(api_keys=API_KEYS)).stub
    create = pb.CreateVideoRequest(prompt="x", scene_count=1)
    alice_job = (await stub.CreateVideo(create, metadata=ALICE)).job_id
    alice_other = (await stub.CreateVideo(create, metadata=ALICE)).job_id
    bob_job = (await stub.CreateVideo(create, metadata=BOB)).job_id
    job = await finished_job(stub, alice_job, metadata=ALICE)
    other = await finished_job(stub, alice_other, metadata=ALICE)
    bobs = await finished_job(stub, bob_job, metadata=BOB)
    video = job.video_uri
    assert (await _read(stub, alice_job, video, metadata=ALICE))[2] == file_store.get_bytes(video)

    gone = job.poster.uri
    file_store.delete(gone)
    prefix = video.split(f"/jobs/{alice_job}/")[0]
    cases = {
        "another tenant's job": (alice_job, video, BOB),
        "another tenant's artifact under the caller's job": (alice_job, bobs.video_uri, ALICE),
        "the caller's artifact under another tenant's job": (bob_job, video, ALICE),
        "the caller's other job's artifact": (alice_job, other.video_uri, ALICE),
        "a path that climbs out of the job": (
            alice_job,
            f"{prefix}/jobs/{alice_job}/../{alice_other}/video/video.mp4",
            ALICE,
        ),
        "a file beside the store": (alice_job, f"{prefix}/../gateway.db", ALICE),
        "an unknown job": ("no-such-job", video, ALICE),
        "a listed artifact gone from the store": (alice_job, gone, ALICE),
        "not a URI": (alice_job, "/etc/passwd", ALICE),
    }
    answers = {}
    for name, (job_id, uri, key) in cases.items():
        refused = await _refused(stub, job_id, uri, metadata=key)
        assert refused.code() == grpc.StatusCode.NOT_FOUND, name
        answers[name] = refused.details()
    # An artifact that exists elsewhere and one that is gone get the same answer.
    assert answers["a listed artifact gone from the store"].replace(gone, "U") == answers[
        "the caller's other job's artifact"
    ].replace(other.video_uri, "U")
    refused = await _refused(stub, alice_job, video)  # no key at all
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_file_store_streams_without_reading_the_whole_file(file_store, tmp_path):
    data = os.urandom(5 * 1024 * 1024 + 123)
    source = tmp_path / "big.mp4"
    source.write_bytes(data)
    uri = file_store.put_file("jobs/j1/video/video.mp4", source)
    tracemalloc.start()
    try:
        with file_store.open_read(uri) as reader:
            assert (reader.size, reader.content_type) == (len(data), "video/mp4")
            sizes = []
            digest = 0
            while chunk := reader.read_chunk():
                sizes.append(len(chunk))
                digest ^= hash(chunk)
            peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sizes[:-1] == [READ_CHUNK_BYTES] * (len(sizes) - 1) and sum(sizes) == len(data)
    assert peak < 4 * READ_CHUNK_BYTES, peak  # a whole read would hold 5 MiB at once
    with file_store.open_read(uri, offset=len(data) - 3) as reader:
        assert reader.read_chunk() == data[-3:] and reader.read_chunk() == b""
    with pytest.raises(NotFound):
        file_store.open_read(file_store.uri_for("jobs/j1/video/missing.mp4"))
    with pytest.raises(InvalidInput):
        file_store.open_read(uri, offset=len(data) + 1)


def test_an_s3_store_streams_ranges_in_chunks(s3_settings: StorageSettings):
    store = open_store(s3_settings)
    data = os.urandom(2 * READ_CHUNK_BYTES + 1000)
    uri = store.put_bytes("jobs/j1/video/video.mp4", data)
    with store.open_read(uri) as reader:
        assert (reader.size, reader.content_type) == (len(data), "video/mp4")
        chunks = []
        while chunk := reader.read_chunk():
            chunks.append(chunk)
    assert b"".join(chunks) == data and max(map(len, chunks)) <= READ_CHUNK_BYTES
    with store.open_read(uri, offset=READ_CHUNK_BYTES + 7) as reader:
        rest = b"".join(iter(reader.read_chunk, b""))
    assert rest == data[READ_CHUNK_BYTES + 7 :]
    with store.open_read(uri, offset=len(data)) as reader:
        assert reader.read_chunk() == b""
    with pytest.raises(NotFound):
        store.open_read(store.uri_for("jobs/j1/video/missing.mp4"))
    with pytest.raises(InvalidInput):
        store.open_read(uri, offset=len(data) + 1)


def test_the_read_chunk_matches_the_documented_size():
    text = (PROTOS / "storyreel/gateway/v1/gateway.proto").read_text()
    assert READ_CHUNK_BYTES == 256 * 1024
    assert re.search(r"at most 256 KiB per message", text)


async def test_the_cli_downloads_through_the_gateway_when_the_files_are_on_its_machine(
    start_gateway, file_store, tmp_path
):
    """`storyreel download` from another machine: the paths the gateway shows are not here."""
    elsewhere = FileStore(file_store.root)
    elsewhere.public_url = lambda uri: f"/on/the/gateway/host/{elsewhere.key_of(uri)}"
    gateway = await start_gateway(store=elsewhere)
    request = pb.CreateVideoRequest(prompt="x", scene_count=1, captions=types_pb2.CAPTIONS_SIDECAR)
    job_id = (await gateway.stub.CreateVideo(request)).job_id
    job = await finished_job(gateway.stub, job_id)
    assert job.video_url.startswith("/on/the/gateway/host/")

    output = tmp_path / "downloads" / "clip.mp4"
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "storyreel.cli", "download", job_id),
        *("--gateway", gateway.address, "-o", str(output)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, stderr.decode()
    assert stdout.decode().strip() == str(output.resolve())
    assert output.read_bytes() == file_store.get_bytes(job.video_uri)
    assert output.with_suffix(".srt").read_bytes() == file_store.get_bytes(job.captions_srt.uri)
    assert output.with_suffix(".vtt").read_bytes() == file_store.get_bytes(job.captions_vtt.uri)
