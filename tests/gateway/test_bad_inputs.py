"""Bad requests to every gateway call: the right status code, a clear message, nothing stored.

Runs against a real S3 server; the object listing is compared before and after each call.
"""

from __future__ import annotations

import grpc
import pytest
from support import WAV_HEADER_ONLY, manifest_written

from storyreel.gateway.v1 import gateway_pb2 as pb
from storyreel.storage import open_store

KEY = (("authorization", "Bearer k"),)
Code = grpc.StatusCode


def _upload(*messages):
    async def stream():
        for message in messages:
            yield message

    return stream


CASES = [
    # CreateVideo
    (
        "create",
        {"prompt": "x", "aspect": 2, "width": 640},
        Code.INVALID_ARGUMENT,
        "aspect and resolution, or width and height",
    ),
    ("create", {"prompt": "x", "aspect": 42}, Code.INVALID_ARGUMENT, "aspect has no value 42"),
    ("create", {"prompt": "x", "consistency": 9}, Code.INVALID_ARGUMENT, "consistency"),
    ("create", {"prompt": "x", "audio_mode": 3}, Code.INVALID_ARGUMENT, "needs an audio_uri"),
    ("create", {"prompt": "x", "voice": "../joe"}, Code.INVALID_ARGUMENT, "voice must be"),
    ("create", {"prompt": ""}, Code.INVALID_ARGUMENT, "prompt must not be empty"),
    ("create", {"prompt": " \n\t "}, Code.INVALID_ARGUMENT, "prompt must not be empty"),
    ("create", {"prompt": "x" * 2001}, Code.INVALID_ARGUMENT, "limit is 2000"),
    ("create", {"prompt": "x", "scene_count": 25}, Code.INVALID_ARGUMENT, "scene_count"),
    ("create", {"prompt": "x", "scene_count": -3}, Code.INVALID_ARGUMENT, "scene_count"),
    ("create", {"prompt": "x", "style": "s" * 201}, Code.INVALID_ARGUMENT, "style"),
    ("create", {"prompt": "x", "width": 321}, Code.INVALID_ARGUMENT, "width"),
    ("create", {"prompt": "x", "width": 8}, Code.INVALID_ARGUMENT, "width"),
    ("create", {"prompt": "x", "height": 9000}, Code.INVALID_ARGUMENT, "height"),
    ("create", {"prompt": "x", "fps": 500}, Code.INVALID_ARGUMENT, "fps"),
    ("create", {"prompt": "x", "fps": -1}, Code.INVALID_ARGUMENT, "fps"),
    (
        "create",
        {"prompt": "x", "audio_uri": "file:///etc/passwd"},
        Code.INVALID_ARGUMENT,
        "not in the artifact store",
    ),
    (
        "create",
        {"prompt": "x", "audio_uri": "{root}uploads/none/audio.wav"},
        Code.INVALID_ARGUMENT,
        "upload it first",
    ),
    (
        "create",
        {"prompt": "x", "audio_uri": "{root}uploads/../../etc/passwd"},
        Code.INVALID_ARGUMENT,
        "invalid object key",
    ),
    (
        "create",
        {"prompt": "x", "idempotency_key": "k" * 129},
        Code.INVALID_ARGUMENT,
        "idempotency_key",
    ),
    # GetJob / WatchJob / CancelJob
    ("get", {"job_id": "0123456789abcdef"}, Code.NOT_FOUND, "does not exist"),
    ("get", {"job_id": ""}, Code.NOT_FOUND, "does not exist"),
    ("get", {"job_id": "../../etc"}, Code.NOT_FOUND, "does not exist"),
    ("watch", {"job_id": "nope"}, Code.NOT_FOUND, "does not exist"),
    ("cancel", {"job_id": "nope"}, Code.NOT_FOUND, "does not exist"),
    ("cancel", {"job_id": "{done}"}, Code.FAILED_PRECONDITION, "already ended"),
    # RegenerateScene
    ("regenerate", {"job_id": "nope", "index": 1}, Code.NOT_FOUND, "does not exist"),
    ("regenerate", {"job_id": "{done}", "index": 0}, Code.INVALID_ARGUMENT, "index"),
    ("regenerate", {"job_id": "{done}", "index": 99}, Code.INVALID_ARGUMENT, "index"),
    (
        "regenerate",
        {"job_id": "{done}", "index": 1, "prompt": "  "},
        Code.INVALID_ARGUMENT,
        "prompt",
    ),
    (
        "regenerate",
        {"job_id": "{done}", "index": 1, "prompt": "p" * 2001},
        Code.INVALID_ARGUMENT,
        "prompt",
    ),
    ("regenerate", {"job_id": "{done}", "index": 1, "seed": 2**63}, Code.INVALID_ARGUMENT, "seed"),
    # ListJobs
    ("list", {"page_size": 101}, Code.INVALID_ARGUMENT, "page_size"),
    ("list", {"page_size": -1}, Code.INVALID_ARGUMENT, "page_size"),
    ("list", {"page_token": "not-a-token"}, Code.INVALID_ARGUMENT, "page_token"),
    # UploadAudio
    (
        "upload",
        [
            pb.UploadAudioRequest(filename="a.txt"),
            pb.UploadAudioRequest(chunk=b"plain text, not audio"),
        ],
        Code.INVALID_ARGUMENT,
        "not audio",
    ),
    ("upload", [pb.UploadAudioRequest(filename="a.wav")], Code.INVALID_ARGUMENT, "empty"),
    (
        "upload",
        [
            pb.UploadAudioRequest(filename="a.wav"),
            pb.UploadAudioRequest(chunk=WAV_HEADER_ONLY),
            pb.UploadAudioRequest(chunk=b"\x00" * 70_000),
        ],
        Code.INVALID_ARGUMENT,
        "larger than",
    ),
    ("upload", [pb.UploadAudioRequest(chunk=WAV_HEADER_ONLY)], Code.INVALID_ARGUMENT, "first"),
    (
        "upload",
        [pb.UploadAudioRequest(filename="a.wav"), pb.UploadAudioRequest(filename="b")],
        Code.INVALID_ARGUMENT,
        "only the first",
    ),
    # Bounds before echo: values no store could hold, and values too big to echo back
    (
        "create",
        {"prompt": "x", "audio_uri": "{root}uploads/" + "a" * (1024 * 1024)},
        Code.INVALID_ARGUMENT,
        "too long",
    ),
    (
        "create",
        {"prompt": "x", "audio_uri": "{root}uploads/" + "n" * 5000 + "/audio.wav"},
        Code.INVALID_ARGUMENT,
        "too long",
    ),
    (
        "create",
        {"prompt": "x", "audio_uri": "{root}uploads/" + "n" * 300 + "/audio.wav"},
        Code.INVALID_ARGUMENT,
        "longer than 255 characters",
    ),
    (
        "create",
        {"prompt": "x", "audio_uri": "{root}uploads/x/audio.wav\n"},
        Code.INVALID_ARGUMENT,
        "invalid object key",
    ),
    ("get", {"job_id": "j" * (3 * 1024 * 1024)}, Code.NOT_FOUND, "does not exist"),
    # Authentication
    ("auth-missing", {}, Code.UNAUTHENTICATED, "missing API key"),
    ("auth-unknown", {}, Code.UNAUTHENTICATED, "unknown API key"),
]


@pytest.fixture
async def s3_gateway(start_gateway, upstream, s3_settings):
    store = open_store(s3_settings)
    upstream.store = store  # the doubles store their images and video on S3 too
    under_test = await start_gateway(store=store, api_keys={"tenant": ["k"]})
    stub = under_test.stub
    job_id = (
        await stub.CreateVideo(pb.CreateVideoRequest(prompt="ok", scene_count=2), metadata=KEY)
    ).job_id
    async for _ in stub.WatchJob(pb.WatchJobRequest(job_id=job_id), metadata=KEY):
        pass
    await manifest_written(store, job_id)  # so the listing each test compares stays put
    return stub, store, job_id


def _fill(value, store, done):
    if isinstance(value, str):
        return value.replace("{root}", store.root_uri).replace("{done}", done)
    return value


@pytest.mark.parametrize(
    ("call", "fields", "code", "message"),
    CASES,
    ids=[f"{i:02d}-{c[0]}" for i, c in enumerate(CASES)],
)
async def test_bad_request_is_refused_and_stores_nothing(s3_gateway, call, fields, code, message):
    stub, store, done = s3_gateway
    before = sorted(store.list())
    if isinstance(fields, dict):
        fields = {k: _fill(v, store, done) for k, v in fields.items()}
    calls = {
        "create": lambda: stub.CreateVideo(pb.CreateVideoRequest(**fields), metadata=KEY),
        "get": lambda: stub.GetJob(pb.GetJobRequest(**fields), metadata=KEY),
        "cancel": lambda: stub.CancelJob(pb.CancelJobRequest(**fields), metadata=KEY),
        "regenerate": lambda: stub.RegenerateScene(
            pb.RegenerateSceneRequest(**fields), metadata=KEY
        ),
        "list": lambda: stub.ListJobs(pb.ListJobsRequest(**fields), metadata=KEY),
        "upload": lambda: stub.UploadAudio(_upload(*fields)(), metadata=KEY),
        "auth-missing": lambda: stub.ListJobs(pb.ListJobsRequest()),
        "auth-unknown": lambda: stub.ListJobs(
            pb.ListJobsRequest(), metadata=(("authorization", "Bearer other"),)
        ),
    }

    async def watch():
        async for _ in stub.WatchJob(pb.WatchJobRequest(**fields), metadata=KEY):
            pass

    calls["watch"] = watch
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await calls[call]()
    assert caught.value.code() == code
    assert message in caught.value.details()
    # Whatever the request held, the answer echoes a bounded part of it.
    assert len(caught.value.details()) <= 1100
    assert sorted(store.list()) == before


def test_at_least_thirty_bad_inputs_are_covered():
    assert len(CASES) >= 30
