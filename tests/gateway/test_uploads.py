"""Audio uploads within limits: quotas per tenant, idle streams cut off, spool files
never left behind, and uploads no job used deleted when they expire."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from support import (
    ALICE,
    API_KEYS,
    BOB,
    REPO,
    WAV_HEADER_ONLY,
    health_status,
    upload_audio,
    wait_until,
    wav_bytes,
)

from storyreel.gateway.v1 import gateway_pb2 as pb
from storyreel.gateway.v1 import gateway_pb2_grpc


def _wav(size: int) -> bytes:
    """A real 16-bit mono WAV of silence, about ``size`` bytes (the composer accepts it)."""
    return wav_bytes(max(1, (size - 44) // 2) / 8000)


def _spooled(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and p.name != ".lock"]


async def _stalled(stall: asyncio.Event):
    """An upload that sends its head, then nothing until ``stall`` is set."""
    yield pb.UploadAudioRequest(filename="a.wav")
    yield pb.UploadAudioRequest(chunk=WAV_HEADER_ONLY)
    await stall.wait()


async def test_four_stalled_uploads_are_cut_off_by_the_quota_and_the_idle_timeout(
    start_gateway, tmp_path
):
    gateway = await start_gateway(
        api_keys=API_KEYS, max_uploads_per_tenant=2, upload_idle_timeout_s=1.0
    )
    stub = gateway.stub
    stall = asyncio.Event()
    calls = [stub.UploadAudio(_stalled(stall), metadata=ALICE) for _ in range(2)]
    await asyncio.sleep(0.5)  # both are receiving
    for _ in range(2):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.UploadAudio(_stalled(stall), metadata=ALICE)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "uploads of yours are in progress" in caught.value.details()
    # Another tenant is not held back by Alice's uploads.
    assert (await upload_audio(stub, _wav(440), metadata=BOB)).size_bytes == len(_wav(440))

    for call in calls:  # the idle timeout ends both stalled streams
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(call, 10)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "sent nothing for 1 s" in caught.value.details()
    stall.set()
    assert _spooled(tmp_path / "upload-spool") == []
    # Their places are free again.
    assert (await upload_audio(stub, _wav(176), metadata=ALICE)).size_bytes == len(_wav(176))


async def test_a_tenants_stored_bytes_are_bounded(start_gateway):
    gateway = await start_gateway(api_keys=API_KEYS, max_upload_bytes_per_tenant=100_000)
    stub = gateway.stub
    data = _wav(50_044)
    await upload_audio(stub, data, metadata=ALICE)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await upload_audio(stub, data, metadata=ALICE)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "the limit is 100000 bytes" in caught.value.details()
    await upload_audio(stub, data, metadata=BOB)  # each tenant has its own quota


async def test_an_upload_no_job_used_expires_and_one_a_job_used_stays(start_gateway, file_store):
    gateway = await start_gateway(upload_ttl_s=0.5)
    stub = gateway.stub
    used = (await upload_audio(stub, _wav(2_000))).audio_uri
    unused = (await upload_audio(stub, _wav(2_000))).audio_uri
    job_id = (
        await stub.CreateVideo(pb.CreateVideoRequest(prompt="a", scene_count=1, audio_uri=used))
    ).job_id
    # The gateway's housekeeping deletes it (every ttl / 4 here).
    await wait_until(lambda: not file_store.exists(unused), timeout_s=5.0, pause_s=0.05)
    assert file_store.exists(used) and not file_store.exists(unused)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateVideo(pb.CreateVideoRequest(prompt="a", audio_uri=unused))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "upload it first" in caught.value.details()
    assert (await stub.GetJob(pb.GetJobRequest(job_id=job_id))).job.audio_uri == used


def _start_gateway_process(tmp_path: Path, spool: Path) -> tuple[subprocess.Popen, str]:
    port_file = tmp_path / "gateway.port"
    port_file.unlink(missing_ok=True)
    env = dict(
        os.environ,
        STORYREEL_STORAGE_URL=(tmp_path / "artifacts").as_uri(),
        STORYREEL_GATEWAY_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}",
        STORYREEL_GATEWAY_UPLOAD_TMP_DIR=str(spool),
        STORYREEL_GATEWAY_PORT="0",
        STORYREEL_GATEWAY_PORT_FILE=str(port_file),
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "storyreel_gateway"],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not port_file.exists():
        assert process.poll() is None, "the gateway exited during start-up"
        assert time.monotonic() < deadline, "the gateway did not start"
        time.sleep(0.05)
    return process, f"127.0.0.1:{port_file.read_text()}"


async def test_a_killed_gateway_leaves_no_spool_file_after_a_restart(tmp_path):
    spool = tmp_path / "spool"
    process, address = _start_gateway_process(tmp_path, spool)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = gateway_pb2_grpc.StoryReelServiceStub(channel)
            stall = asyncio.Event()
            call = stub.UploadAudio(_stalled(stall), wait_for_ready=True)
            for _ in range(100):  # the head has reached the spool file
                if _spooled(spool):
                    break
                await asyncio.sleep(0.05)
            assert len(_spooled(spool)) == 1
            process.send_signal(signal.SIGKILL)
            process.wait(10)
            stall.set()
            with pytest.raises(grpc.aio.AioRpcError):
                await call
        assert len(_spooled(spool)) == 1  # a killed process removes nothing itself
        process, address = _start_gateway_process(tmp_path, spool)
        for _ in range(200):  # loaded: the spool was swept at start
            if await health_status(address) == "SERVING":
                break
            await asyncio.sleep(0.05)
        assert _spooled(spool) == []
    finally:
        process.kill()
        process.wait(10)
