"""The container HEALTHCHECK command, ``python -m storyreel.healthcheck``, against a real server."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest
from support import free_port

from storyreel.serving import Service, create_server
from storyreel.settings import ServiceSettings


class EmptyService(Service):
    """A server with only the standard health and reflection services."""

    service_names = ("storyreel.test.v1.EmptyService",)

    def add_to_server(self, server) -> None:
        pass


async def run_healthcheck(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run the module the way the images' HEALTHCHECK does; return its exit code and output.

    ``env`` replaces the environment (default: this process's).
    """
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "storyreel.healthcheck",
        *args,
        env=os.environ if env is None else env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    return process.returncode, output.decode()


@pytest.fixture
async def loading_server():
    """A server that has bound its port but not yet loaded its model (NOT_SERVING)."""
    running = await create_server(ServiceSettings(port=0), EmptyService())
    yield running
    await running.stop(0)


async def test_healthcheck_fails_while_the_model_is_loading(loading_server):
    code, output = await run_healthcheck(f"127.0.0.1:{loading_server.port}")
    assert code == 1
    assert "NOT_SERVING" in output


async def test_healthcheck_passes_once_the_server_reports_serving(loading_server):
    await loading_server.set_serving(True)
    code, output = await run_healthcheck(f"127.0.0.1:{loading_server.port}")
    assert code == 0
    assert output.strip().endswith("SERVING")


async def test_healthcheck_asks_about_a_named_service(loading_server):
    await loading_server.set_serving(True)
    address = f"127.0.0.1:{loading_server.port}"
    known = await run_healthcheck(address, "--service", "storyreel.test.v1.EmptyService")
    unknown = await run_healthcheck(address, "--service", "storyreel.test.v1.Missing")
    assert known[0] == 0
    assert unknown[0] == 1
    assert "NOT_FOUND" in unknown[1]


async def test_healthcheck_fails_when_nothing_listens():
    code, output = await run_healthcheck(f"127.0.0.1:{free_port()}", "--timeout", "2")
    assert code == 1
    assert "UNAVAILABLE" in output or "DEADLINE_EXCEEDED" in output


async def test_healthcheck_reads_the_port_from_the_named_environment_variable(loading_server):
    await loading_server.set_serving(True)
    env = {**os.environ, "STORYREEL_TEST_PORT": str(loading_server.port)}
    code, output = await run_healthcheck("--port-env", "STORYREEL_TEST_PORT", env=env)
    assert code == 0
    assert f"127.0.0.1:{loading_server.port}: SERVING" in output


async def test_healthcheck_fails_clearly_when_the_port_variable_is_unset():
    env = {k: v for k, v in os.environ.items() if k != "STORYREEL_TEST_PORT"}
    code, output = await run_healthcheck("--port-env", "STORYREEL_TEST_PORT", env=env)
    assert code == 1
    assert "STORYREEL_TEST_PORT must hold a port number" in output
