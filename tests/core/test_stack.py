"""`storyreel serve`'s ports: STORYREEL_<SERVICE>_PORT, --base-port, and a port in use.

LocalStack runs real processes on real ports here; each stands in for a service
with an empty storyreel server (storyreel.serving.serve), so no model is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support import free_port

from storyreel import cli
from storyreel.errors import UpstreamFailed
from storyreel.stack import LocalStack, ServiceSpec

FAKE_SERVICE = """
import asyncio
import sys

from pydantic_settings import SettingsConfigDict

from storyreel.logs import configure_logging
from storyreel.serving import Service, serve
from storyreel.settings import ServiceSettings


class Empty(Service):
    def add_to_server(self, server):
        pass


def run(prefix):
    class Settings(ServiceSettings):
        model_config = SettingsConfigDict(env_prefix=prefix, extra="ignore")

    configure_logging(prefix.lower(), "INFO")
    sys.exit(asyncio.run(serve(Settings(), Empty())))
"""

NAMES = ("gateway", "llm", "diffusion", "composer")


@pytest.fixture
def fake_services(tmp_path: Path) -> dict:
    """ServiceSpecs of the four services, each run by a stand-in module; and their env."""
    folder = tmp_path / "fakes"
    folder.mkdir()
    (folder / "fake_service.py").write_text(FAKE_SERVICE)
    specs = []
    for offset, name in enumerate(NAMES):
        prefix = f"STORYREEL_{name.upper()}_"
        (folder / f"fake_{name}.py").write_text(
            f"from fake_service import run\n\nrun({prefix!r})\n"
        )
        specs.append(ServiceSpec(name, f"fake_{name}", prefix, 50050 + offset))
    # The gateway starts last, as in DEFAULT_SERVICES.
    specs = (*specs[1:], specs[0])
    path = os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])
    return {"services": specs, "env": {"PYTHONPATH": path}}


def _scrub_port_env(monkeypatch):
    for name in NAMES:
        monkeypatch.delenv(f"STORYREEL_{name.upper()}_PORT", raising=False)


def test_each_service_listens_on_its_port_setting(tmp_path, fake_services, monkeypatch):
    _scrub_port_env(monkeypatch)
    base = free_port(8)
    wanted = {"gateway": base + 7, "llm": base + 5, "diffusion": base + 1, "composer": base + 3}
    for name, port in wanted.items():
        monkeypatch.setenv(f"STORYREEL_{name.upper()}_PORT", str(port))
    with LocalStack(tmp_path / "data", **fake_services) as stack:
        address = stack.start(timeout_s=120)
        assert {name: p.port for name, p in stack.processes.items()} == wanted
        assert address == f"127.0.0.1:{wanted['gateway']}"


def test_base_port_puts_the_services_on_four_consecutive_ports(
    tmp_path, fake_services, monkeypatch
):
    _scrub_port_env(monkeypatch)
    monkeypatch.setenv("STORYREEL_LLM_PORT", "1")  # --base-port wins over the environment
    base = free_port(4)
    with LocalStack(tmp_path / "data", base_port=base, **fake_services) as stack:
        assert stack.start(timeout_s=120) == f"127.0.0.1:{base}"
        ports = {name: p.port for name, p in stack.processes.items()}
    assert ports == {"gateway": base, "llm": base + 1, "diffusion": base + 2, "composer": base + 3}


def test_a_second_stack_on_the_same_ports_fails_naming_the_port(
    tmp_path, fake_services, monkeypatch
):
    _scrub_port_env(monkeypatch)
    base = free_port(4)
    with LocalStack(tmp_path / "a", base_port=base, **fake_services) as first:
        first.start(timeout_s=120)
        second = LocalStack(tmp_path / "b", base_port=base, **fake_services)
        with second, pytest.raises(UpstreamFailed) as caught:
            second.start(timeout_s=120)
    message = str(caught.value)
    assert "exited with code 1" in message
    assert f"cannot listen on 127.0.0.1:{base + 1}" in message
    assert "port is in use" in message


def test_a_port_setting_that_is_no_port_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("STORYREEL_LLM_PORT", "fifty")
    stack = LocalStack(tmp_path)
    llm = next(s for s in stack.services if s.name == "llm")
    with pytest.raises(ValueError, match="STORYREEL_LLM_PORT must be a port number"):
        stack.port_for(llm)
    with pytest.raises(ValueError, match="base port"):
        LocalStack(tmp_path, base_port=65533)


def test_serve_passes_base_port_to_the_stack(tmp_path, monkeypatch, capsys):
    made = []

    class RecordingStack:
        def __init__(self, data_dir, base_port=None):
            made.append((data_dir, base_port))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def start(self, timeout_s=300.0, on_ready=None):
            raise UpstreamFailed("not started in this test")

    monkeypatch.setattr("storyreel.stack.LocalStack", RecordingStack)
    code = cli.main(["serve", "--data-dir", str(tmp_path), "--base-port", "6100"])
    assert code == cli.EXIT_UNREACHABLE
    assert made == [(tmp_path, 6100)]
    for bad in ("0", "65533", "x"):
        with pytest.raises(SystemExit) as caught:
            cli.main(["serve", "--base-port", bad])
        assert caught.value.code == 2
    assert "base port must be from 1 to 65531" in capsys.readouterr().err


ECHO_SERVICE = """
import asyncio
import sys

import grpc
from pydantic_settings import SettingsConfigDict

from storyreel.logs import configure_logging
from storyreel.serving import Service, serve
from storyreel.settings import ServiceSettings


class Echo(Service):
    service_names = ("storyreel.test.v1.Echo",)

    def add_to_server(self, server):
        async def say(request, context):
            return request

        handler = grpc.unary_unary_rpc_method_handler(say)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("storyreel.test.v1.Echo", {"Say": handler}),)
        )


def run(prefix):
    class Settings(ServiceSettings):
        model_config = SettingsConfigDict(env_prefix=prefix, extra="ignore")

    configure_logging(prefix.lower(), "INFO")
    sys.exit(asyncio.run(serve(Settings(), Echo())))
"""


@pytest.fixture
def echo_services(fake_services: dict, tmp_path: Path) -> dict:
    """The four stand-ins, each an internal service with one method, Echo/Say."""
    folder = tmp_path / "fakes"
    (folder / "fake_service.py").write_text(ECHO_SERVICE)
    return fake_services


def _no_internal_env(monkeypatch) -> None:
    for name in ("TOKEN", "TOKEN_FILE", "TLS_CA_FILE", "TLS_CERT_FILE", "TLS_KEY_FILE"):
        monkeypatch.delenv(f"STORYREEL_INTERNAL_{name}", raising=False)


def test_the_stack_gives_its_services_a_token_of_its_own(tmp_path, echo_services, monkeypatch):
    import grpc

    _scrub_port_env(monkeypatch)
    _no_internal_env(monkeypatch)
    with LocalStack(tmp_path / "a", fixed_ports=False, **echo_services) as stack:
        stack.start(timeout_s=120)
        another = LocalStack(tmp_path / "b", fixed_ports=False, **echo_services)
        assert len(stack.internal_token) >= 32
        assert another.internal_token != stack.internal_token
        for name, running in stack.processes.items():
            with grpc.insecure_channel(running.address) as channel:
                say = channel.unary_unary("/storyreel.test.v1.Echo/Say")
                # Another local user knows the port, not the token: refused.
                for metadata in ((), another.internal_metadata):
                    with pytest.raises(grpc.RpcError) as caught:
                        say(b"hello", metadata=metadata, timeout=10)
                    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
                assert say(b"hello", metadata=stack.internal_metadata, timeout=10) == b"hello"
                assert stack.internal_token not in running.log_tail(200)


def test_a_token_and_a_database_url_file_from_the_environment_are_kept(tmp_path, monkeypatch):
    _no_internal_env(monkeypatch)
    monkeypatch.delenv("STORYREEL_GATEWAY_DATABASE_URL", raising=False)
    monkeypatch.setenv("STORYREEL_INTERNAL_TOKEN", "the-operators-own-token-0123")
    monkeypatch.setenv("STORYREEL_GATEWAY_DATABASE_URL_FILE", str(tmp_path / "url"))
    env = LocalStack(tmp_path)._base_env()
    assert env["STORYREEL_INTERNAL_TOKEN"] == "the-operators-own-token-0123"
    # The file names the database: no SQLite URL beside it (both would be an error).
    assert "STORYREEL_GATEWAY_DATABASE_URL" not in env
    monkeypatch.delenv("STORYREEL_INTERNAL_TOKEN")
    monkeypatch.setenv("STORYREEL_INTERNAL_TOKEN_FILE", str(tmp_path / "token"))
    env = LocalStack(tmp_path)._base_env()
    assert "STORYREEL_INTERNAL_TOKEN" not in env
