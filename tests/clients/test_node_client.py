"""A client in another language: Node (@grpc/grpc-js), with nothing but the public contract.

The stack is real (every service its own process, the tiny offline diffusion
model, piper narration, ffmpeg), with the LLM service's TGI backend answered
by the TGI test double so that the storyboard costs nothing. The client
(tests/clients/node/client.js) creates a job, watches it to the end, downloads
the video with ReadArtifact and reads the MP4's boxes itself; here the same
file is probed with the bundled ffmpeg and compared with the store.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess

import pytest
from model_server_doubles import TGITestDouble
from support import REPO, probe_media, started_stack

from storyreel.stack import LocalStack
from storyreel.storage import READ_CHUNK_BYTES

pytestmark = [pytest.mark.e2e]

CLIENT = REPO / "tests" / "clients" / "node"
KEY = "node-client-key"
# Noise images: a video of several 256 KiB chunks (at 192x144 it came to 253 KiB).
WIDTH, HEIGHT = 320, 240


@pytest.fixture(scope="module")
def node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed (Node 18 or later runs tests/clients/node)")
    if not (CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail(f"the Node client's packages are missing: run `npm ci` in {CLIENT}")
    return node


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tgi = TGITestDouble(schema_answers=True).start()
    env = {
        "STORYREEL_LLM_BACKEND": "tgi",
        "STORYREEL_LLM_TGI_URL": tgi.url,
        "STORYREEL_GATEWAY_API_KEYS": json.dumps({"node": [KEY]}),
        "STORYREEL_GATEWAY_RENDER_WIDTH": "64",
        "STORYREEL_GATEWAY_RENDER_HEIGHT": "64",
        "STORYREEL_GATEWAY_VIDEO_WIDTH": str(WIDTH),
        "STORYREEL_GATEWAY_VIDEO_HEIGHT": str(HEIGHT),
        "STORYREEL_GATEWAY_VIDEO_FPS": "8",
    }
    try:
        with started_stack(tmp_path_factory.mktemp("node-client"), env) as local:
            yield local
    finally:
        tgi.stop()


def _run(node: str, stack: LocalStack, tmp_path, key: str = KEY) -> subprocess.CompletedProcess:
    # The client gets gateway.proto and the shared types and nothing else: the public
    # contract stands alone.
    for name in ("gateway/v1/gateway.proto", "types/v1/types.proto"):
        copy = tmp_path / "protos" / "storyreel" / name
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "protos/storyreel" / name, copy)
    proto = tmp_path / "protos" / "storyreel" / "gateway" / "v1" / "gateway.proto"
    return subprocess.run(
        [
            node,
            str(CLIENT / "client.js"),
            "--address",
            stack.gateway_address,
            "--proto",
            str(proto),
            "--out",
            str(tmp_path / "video.mp4"),
        ],
        env={**os.environ, "STORYREEL_API_KEY": key},
        capture_output=True,
        text=True,
        timeout=480,
        check=False,
    )


def test_a_node_client_makes_a_video_and_downloads_it(node, stack, tmp_path):
    result = _run(node, stack, tmp_path)
    assert result.returncode == 0, result.stderr + stack.processes["gateway"].log_tail()
    seen = json.loads(result.stdout.strip().splitlines()[-1])

    assert seen["state"] == "JOB_STATE_DONE"
    assert seen["events"][0] == "EVENT_KIND_SNAPSHOT"
    assert seen["events"][-1] == "EVENT_KIND_JOB_FINISHED"
    assert "EVENT_KIND_SCENE_RENDERED" in seen["events"]
    assert seen["watch_again"] == ["EVENT_KIND_SNAPSHOT", "EVENT_KIND_JOB_FINISHED"]
    assert seen["scenes"] == 2 and seen["title"]
    assert int(seen["seed"]) > 0  # a uint64, as a string: no precision lost in JavaScript

    # The bytes the client wrote are the video in the store, streamed in 256 KiB chunks.
    video = seen["video"]
    stored = stack.store.get_bytes(seen["video_uri"])
    written = (tmp_path / "video.mp4").read_bytes()
    assert written == stored
    assert video["size"] == video["received"] == len(stored)
    assert video["sha256"] == hashlib.sha256(stored).hexdigest()
    assert video["content_type"] == "video/mp4"
    assert video["largest"] <= READ_CHUNK_BYTES
    assert video["chunks"] == math.ceil(len(stored) / READ_CHUNK_BYTES) >= 2

    # What the client read from the MP4's boxes, and what ffmpeg says about the same file.
    assert "isom" in video["brands"]
    tracks = {track["handler"]: track for track in video["tracks"]}
    assert set(tracks) == {"vide", "soun"}
    assert tracks["vide"]["codec"] == "avc1"
    assert (tracks["vide"]["width"], tracks["vide"]["height"]) == (WIDTH, HEIGHT)
    assert tracks["soun"]["codec"] == "mp4a"
    facts = probe_media(tmp_path / "video.mp4")
    assert (facts.video_codec, facts.audio_codec) == ("h264", "aac")
    assert (facts.width, facts.height) == (WIDTH, HEIGHT)
    assert tracks["soun"]["sample_rate"] == facts.sample_rate
    assert abs(tracks["vide"]["duration_s"] - facts.duration_s) < 0.5

    captions = stack.store.get_bytes(seen["captions_vtt_uri"])
    assert seen["captions"]["content_type"] == "text/vtt"
    assert seen["captions"]["sha256"] == hashlib.sha256(captions).hexdigest()
    assert seen["foreign_uri"] == "NOT_FOUND"


def test_a_node_client_without_a_valid_key_is_refused(node, stack, tmp_path):
    result = _run(node, stack, tmp_path, key="not-a-key")
    assert result.returncode == 1
    assert "storyreel node client:" in result.stderr
    assert not (tmp_path / "video.mp4").exists()
