"""`python -m storyreel_diffusion` as a process: configured by environment, stops on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import grpc
from support import health_status

from storyreel.channels import open_channel
from storyreel.diffusion.v1 import diffusion_pb2, diffusion_pb2_grpc
from storyreel.settings import StorageSettings
from storyreel.storage import open_store

# Generous bounds that only stop a hung process from hanging the suite.
START_TIMEOUT_S = 180
STOP_TIMEOUT_S = 60


async def wait_until_serving(process, port_file: Path) -> str:
    async def poll() -> str:
        while not port_file.exists():
            assert process.returncode is None, "server exited during start-up"
            await asyncio.sleep(0.2)
        address = f"127.0.0.1:{port_file.read_text()}"
        while True:
            assert process.returncode is None, "server exited during start-up"
            try:
                if await health_status(address) == "SERVING":
                    return address
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)

    return await asyncio.wait_for(poll(), START_TIMEOUT_S)


async def test_module_serves_renders_and_exits_cleanly_on_sigterm(tiny_sd, tmp_path):
    artifacts = tmp_path / "artifacts"
    port_file = tmp_path / "port"
    env = os.environ | {
        "STORYREEL_DIFFUSION_MODEL": str(tiny_sd),
        "STORYREEL_DIFFUSION_DEVICE": "cpu",
        "STORYREEL_DIFFUSION_PORT": "0",
        "STORYREEL_DIFFUSION_PORT_FILE": str(port_file),
        "STORYREEL_DIFFUSION_DEFAULT_STEPS": "2",
        "STORYREEL_DIFFUSION_METRICS_PORT": "0",
        "STORYREEL_STORAGE_URL": artifacts.as_uri(),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "storyreel_diffusion",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        address = await wait_until_serving(process, port_file)
        async with open_channel(address) as channel:
            stub = diffusion_pb2_grpc.DiffusionServiceStub(channel)
            req = diffusion_pb2.RenderScenesRequest(
                job_id="process-test",
                scenes=[diffusion_pb2.Scene(index=1, prompt="a lighthouse", seed=3)],
                width=64,
                height=64,
            )
            images = [r.image async for r in stub.RenderScenes(req, timeout=120)]
        store = open_store(StorageSettings(url=artifacts.as_uri()))
        assert [image.uri for image in images] == list(store.list("jobs/"))
        # The same PNG is kept in the content-addressed cache.
        [cached] = store.list("cache/")
        assert store.get_bytes(cached) == store.get_bytes(images[0].uri)

        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), STOP_TIMEOUT_S)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, stderr.decode()[-2000:]
    # Every line is a JSON record, the libraries' own warnings included.
    records = [json.loads(line) for line in stderr.decode().splitlines()]
    assert {r["service"] for r in records} == {"diffusion"}
    messages = [r["msg"] for r in records]
    for expected in ("model loaded", "serving", "scene rendered", "stopped"):
        assert expected in messages, messages
    rendered = next(r for r in records if r["msg"] == "scene rendered")
    assert rendered["job_id"] == "process-test"
