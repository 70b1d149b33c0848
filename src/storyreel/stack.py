"""Runs the whole storyreel stack on one machine: every service its own process.

Used by ``storyreel serve`` and ``storyreel generate --serve``. Artifacts go to
a local folder (file:// storage) unless STORYREEL_STORAGE_URL says otherwise.

The services trust each other through an internal token that each stack makes up
when it is created (unless ``STORYREEL_INTERNAL_TOKEN`` or ``..._TOKEN_FILE`` is
set): it reaches the four processes in their environment, which only this user can
read, so other users of the machine cannot call the llm, diffusion and composer
services directly.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from storyreel.errors import UpstreamFailed


@dataclass
class ServiceSpec:
    name: str
    module: str
    env_prefix: str
    port: int


#: Start order: the gateway last, once it knows where the others listen.
DEFAULT_SERVICES = (
    ServiceSpec("llm", "storyreel_llm", "STORYREEL_LLM_", 50051),
    ServiceSpec("diffusion", "storyreel_diffusion", "STORYREEL_DIFFUSION_", 50052),
    ServiceSpec("composer", "storyreel_composer", "STORYREEL_COMPOSER_", 50053),
    ServiceSpec("gateway", "storyreel_gateway", "STORYREEL_GATEWAY_", 50050),
)


#: Where each service listens relative to ``--base-port`` N: the gateway on N, ...
BASE_PORT_OFFSETS = {"gateway": 0, "llm": 1, "diffusion": 2, "composer": 3}
#: ... and the gateway's web port (the studio page, gRPC-Web) on N+4: where the gateway puts
#: it by itself, its gRPC port + 4 (STORYREEL_GATEWAY_WEB_PORT unset).
WEB_PORT_OFFSET = 4
BASE_PORT_SPAN = max(*BASE_PORT_OFFSETS.values(), WEB_PORT_OFFSET)


@dataclass
class RunningProcess:
    spec: ServiceSpec
    process: subprocess.Popen
    log_path: Path
    port_file: Path
    port: int = 0
    #: The gateway's web port (the studio page, gRPC-Web): its file, and the port it names
    #: once the gateway listens (None: no web port).
    web_port_file: Path | None = None
    web_port: int | None = None
    web_scheme: str = "http"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def web_url(self) -> str | None:
        """``http://127.0.0.1:PORT/``: the studio page, and the base URL of gRPC-Web."""
        return f"{self.web_scheme}://127.0.0.1:{self.web_port}/" if self.web_port else None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class LocalStack:
    """The four services as child processes on 127.0.0.1.

    Each service listens on the port its ``STORYREEL_<SERVICE>_PORT`` names (in
    ``env`` or the environment), else on its well-known port (the gateway on
    50050, then llm, diffusion, composer). With ``base_port`` N, the gateway gets
    N and the others N+1, N+2, N+3, whatever the environment says.
    The gateway's web port (the studio page and gRPC-Web, :attr:`web_url`) is its
    ``STORYREEL_GATEWAY_WEB_PORT``, else the gateway's port + 4 (50054; N+4).
    ``fixed_ports=False`` lets every service bind a free port (tests), the web port too.
    """

    data_dir: Path
    fixed_ports: bool = True
    base_port: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    services: tuple[ServiceSpec, ...] = DEFAULT_SERVICES
    processes: dict[str, RunningProcess] = field(default_factory=dict)
    #: The internal token this stack's services share, made up once per stack (restarted
    #: services keep it). Not used when the environment or ``env`` names a token.
    internal_token: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)

    def __post_init__(self) -> None:
        if self.base_port is not None and not 1 <= self.base_port <= 65535 - BASE_PORT_SPAN:
            raise ValueError(
                f"base port must be from 1 to {65535 - BASE_PORT_SPAN}, got {self.base_port}"
            )

    @property
    def gateway_address(self) -> str:
        return self.processes["gateway"].address

    @property
    def web_url(self) -> str | None:
        """The studio page of the started gateway, ``http://127.0.0.1:PORT/`` (also the base
        URL of its gRPC-Web API); None when its web port is off."""
        gateway = self.processes.get("gateway")
        return gateway.web_url if gateway else None

    def _web_port_for(self, port: int | None) -> int | None:
        """The web port a gateway launched on ``port`` gets; None: its own setting decides.

        A free one beside a free gRPC port, N+4 with ``base_port`` N; ``env`` naming
        STORYREEL_GATEWAY_WEB_PORT wins over both."""
        if port == 0 or not self.fixed_ports:
            return 0
        if self.base_port is not None:
            return self.base_port + WEB_PORT_OFFSET
        return None

    def port_for(self, spec: ServiceSpec) -> int:
        """The port ``spec`` listens on: see the class docstring."""
        if not self.fixed_ports:
            return 0
        if self.base_port is not None:
            return self.base_port + BASE_PORT_OFFSETS.get(spec.name, spec.port - 50050)
        variable = f"{spec.env_prefix}PORT"
        value = self.env.get(variable, os.environ.get(variable, "")).strip()
        if not value:
            return spec.port
        if not value.isdigit() or not 0 <= int(value) <= 65535:
            raise ValueError(f"{variable} must be a port number from 0 to 65535, got {value!r}")
        return int(value)

    def _base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("STORYREEL_STORAGE_URL", (self.data_dir / "artifacts").resolve().as_uri())
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.update(self.env)
        # The gateway's job database: SQLite beside the artifacts (PostgreSQL if set).
        if not _set(env, "STORYREEL_GATEWAY_DATABASE_URL", "STORYREEL_GATEWAY_DATABASE_URL_FILE"):
            env["STORYREEL_GATEWAY_DATABASE_URL"] = (
                f"sqlite+aiosqlite:///{(self.data_dir / 'gateway.db').resolve()}"
            )
        # Every service gets the same internal token: the gateway presents it, the others
        # refuse calls without it.
        if not _set(env, "STORYREEL_INTERNAL_TOKEN", "STORYREEL_INTERNAL_TOKEN_FILE"):
            env["STORYREEL_INTERNAL_TOKEN"] = self.internal_token
        return env

    @property
    def internal_metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata that lets a call through to this stack's internal services."""
        from storyreel.channels import internal_metadata

        return internal_metadata(self._internal_settings())

    def _internal_settings(self):
        """The STORYREEL_INTERNAL_* settings the stack's processes get."""
        from storyreel.settings import InternalSettings

        env = self._base_env()
        fields = {
            "token": env.get("STORYREEL_INTERNAL_TOKEN") or "",
            "token_file": env.get("STORYREEL_INTERNAL_TOKEN_FILE") or None,
            "tls_ca_file": env.get("STORYREEL_INTERNAL_TLS_CA_FILE") or None,
            "tls_cert_file": env.get("STORYREEL_INTERNAL_TLS_CERT_FILE") or None,
            "tls_key_file": env.get("STORYREEL_INTERNAL_TLS_KEY_FILE") or None,
        }
        return InternalSettings(**fields)

    def _launch(
        self,
        spec: ServiceSpec,
        extra: dict[str, str],
        port: int | None = None,
        web_port: int | None = None,
    ) -> RunningProcess:
        run_dir = self.data_dir / "run"
        log_dir = self.data_dir / "logs"
        run_dir.mkdir(parents=True, exist_ok=True)
        log_dir.mkdir(parents=True, exist_ok=True)
        port_file = run_dir / f"{spec.name}.port"
        port_file.unlink(missing_ok=True)
        env = self._base_env()
        env.update(
            {
                f"{spec.env_prefix}HOST": "127.0.0.1",
                f"{spec.env_prefix}PORT": str(port if port is not None else self.port_for(spec)),
                f"{spec.env_prefix}PORT_FILE": str(port_file),
                **extra,
            }
        )
        web_port_file = None
        if spec.module == "storyreel_gateway":
            # A stable name per gateway: restarted, it takes its unfinished jobs back at once.
            env.setdefault("STORYREEL_GATEWAY_INSTANCE_ID", f"{socket.gethostname()}-{spec.name}")
            # Its web port, on 127.0.0.1 like its gRPC port, written to a file once bound.
            web_port_file = run_dir / f"{spec.name}.web.port"
            web_port_file.unlink(missing_ok=True)
            env[f"{spec.env_prefix}WEB_HOST"] = "127.0.0.1"
            env[f"{spec.env_prefix}WEB_PORT_FILE"] = str(web_port_file)
            if web_port is None and f"{spec.env_prefix}WEB_PORT" not in self.env:
                web_port = self._web_port_for(port if port is not None else self.port_for(spec))
            if web_port is not None:
                env[f"{spec.env_prefix}WEB_PORT"] = str(web_port)
            env.update(extra)
        log_path = log_dir / f"{spec.name}.log"
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", spec.module],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us, and we stop children in order
            )
        running = RunningProcess(spec, process, log_path, port_file, web_port_file=web_port_file)
        if _set(env, f"{spec.env_prefix}TLS_CERT_FILE"):
            running.web_scheme = "https"
        self.processes[spec.name] = running
        return running

    def _wait_port(self, running: RunningProcess, deadline: float) -> None:
        while time.monotonic() < deadline:
            if running.process.poll() is not None:
                raise UpstreamFailed(
                    f"{running.spec.name} exited with code {running.process.returncode} "
                    f"during start-up; last log lines:\n{running.log_tail()}"
                )
            if running.port_file.exists():
                running.port = int(running.port_file.read_text())
                # The gateway writes its web port's file first (none when it is off).
                web = running.web_port_file
                if web is not None and web.exists():
                    running.web_port = int(web.read_text())
                return
            time.sleep(0.05)
        raise UpstreamFailed(f"{running.spec.name} did not bind a port in time")

    def _health_channel(self, running: RunningProcess) -> grpc.Channel:
        """A channel for health checks; over mutual TLS to an internal service that wants it."""
        from storyreel.channels import internal_channel_credentials

        gateway = running.spec.module == "storyreel_gateway" or running.spec.name == "gateway"
        if not gateway and _set(self._base_env(), "STORYREEL_INTERNAL_TLS_CA_FILE"):
            try:
                credentials = internal_channel_credentials(self._internal_settings())
            except ValueError:
                credentials = None  # the service itself says what is wrong, and exits
            if credentials is not None:
                return grpc.secure_channel(running.address, credentials)
        return grpc.insecure_channel(running.address)

    def _wait_serving(self, running: RunningProcess, deadline: float) -> None:
        with self._health_channel(running) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if running.process.poll() is not None:
                    raise UpstreamFailed(
                        f"{running.spec.name} exited with code {running.process.returncode} "
                        f"while loading; last log lines:\n{running.log_tail()}"
                    )
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise UpstreamFailed(
            f"{running.spec.name} was not SERVING in time; last log lines:\n{running.log_tail()}"
        )

    def start(self, timeout_s: float = 300.0, on_ready=None) -> str:
        """Start every service, wait until all are SERVING; returns the gateway address."""
        deadline = time.monotonic() + timeout_s
        try:
            workers = [s for s in self.services if s.name != "gateway"]
            for spec in workers:
                self._launch(spec, {})
            for spec in workers:
                self._wait_port(self.processes[spec.name], deadline)
            gateway_spec = next(s for s in self.services if s.name == "gateway")
            gateway = self._launch(gateway_spec, self._upstream_env())
            self._wait_port(gateway, deadline)
            for running in self.processes.values():
                self._wait_serving(running, deadline)
                if on_ready:
                    on_ready(running)
        except BaseException:
            self.stop()
            raise
        return self.gateway_address

    def _upstream_env(self) -> dict[str, str]:
        return {
            "STORYREEL_GATEWAY_LLM_ADDRESS": self.processes["llm"].address,
            "STORYREEL_GATEWAY_DIFFUSION_ADDRESS": self.processes["diffusion"].address,
            "STORYREEL_GATEWAY_COMPOSER_ADDRESS": self.processes["composer"].address,
        }

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to one service and wait for it to exit (a crash, with SIGKILL)."""
        running = self.processes[name]
        running.process.send_signal(sig)
        running.process.wait(timeout=30)

    def add_gateway(
        self, name: str, env: dict[str, str] | None = None, timeout_s: float = 300
    ) -> RunningProcess:
        """Start one more gateway replica (same store, same services) on a free port."""
        base = next(s for s in self.services if s.name == "gateway")
        spec = dataclasses.replace(base, name=name)
        running = self._launch(spec, {**self._upstream_env(), **(env or {})}, port=0, web_port=0)
        deadline = time.monotonic() + timeout_s
        self._wait_port(running, deadline)
        self._wait_serving(running, deadline)
        return running

    def restart(self, name: str, env: dict[str, str] | None = None, timeout_s: float = 300) -> None:
        """Start one service again on the port it had, and wait until it is SERVING."""
        old = self.processes[name]
        if old.process.poll() is None:
            self.kill(name, signal.SIGTERM)
        extra = dict(env or {})
        if old.spec.module == "storyreel_gateway":
            extra = {**self._upstream_env(), **extra}
        running = self._launch(old.spec, extra, port=old.port, web_port=old.web_port)
        deadline = time.monotonic() + timeout_s
        self._wait_port(running, deadline)
        self._wait_serving(running, deadline)

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM every service (gateway first), then SIGKILL what is left after grace_s."""
        order = sorted(self.processes.values(), key=lambda p: p.spec.module != "storyreel_gateway")
        for running in order:
            if running.process.poll() is None:
                running.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for running in order:
            try:
                running.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                running.process.kill()
                running.process.wait()

    def __enter__(self) -> LocalStack:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _set(env: dict[str, str], *names: str) -> bool:
    """Whether ``env`` gives any of ``names`` a non-empty value."""
    return any(env.get(name, "").strip() for name in names)
