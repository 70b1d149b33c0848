"""`python -m storyreel_composer` as a process: settings from the environment, SIGTERM stops it."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from support import health_status, service_process


@pytest.mark.model
async def test_module_serves_with_env_settings_and_exits_cleanly_on_sigterm(tmp_path: Path):
    port_file = tmp_path / "port"
    env = {"STORYREEL_STORAGE_URL": (tmp_path / "artifacts").as_uri()}
    with service_process(
        "storyreel_composer", port_file, env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    ) as process:
        deadline = time.monotonic() + 120
        status = None
        while status != "SERVING":
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, f"not serving; last health status {status}"
            if port_file.exists():
                try:
                    status = await health_status(f"127.0.0.1:{port_file.read_text()}")
                except grpc.aio.AioRpcError:
                    status = None
            await asyncio.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        logs = process.stderr.read()
        assert '"service": "composer"' in logs and '"msg": "stopped"' in logs
