"""Fixtures of the story service tests: settings, the shared SmolLM2, a TGI test double."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from storyreel_llm.settings import LLMSettings

REPO = Path(__file__).resolve().parents[2]
MODELS = Path(os.environ.get("STORYREEL_MODELS_DIR", REPO / "models"))
SMOLLM2_DIR = MODELS / "smollm2-135m-instruct"


def make_settings(**overrides: Any) -> LLMSettings:
    """Settings for tests: a free port on loopback, the offline SmolLM2 on one thread."""
    # Without `make models` the default value makes the backend read the GGUF.
    model = str(SMOLLM2_DIR) if SMOLLM2_DIR.is_dir() else LLMSettings.model_fields["model"].default
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "model": model,
        # Test runs share the CPU with other work; two torch threads on two busy
        # cores decoded 10x slower than one.
        "torch_threads": 1,
    }
    values.update(overrides)
    return LLMSettings(**values)


@pytest.fixture(scope="session")
def settings_for():
    """``settings_for(**overrides)`` builds test settings (see :func:`make_settings`)."""
    return make_settings


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct, loaded once for the whole session."""
    import torch
    from storyreel_llm.backends.local import LocalBackend

    threads = torch.get_num_threads()
    backend = LocalBackend(make_settings())
    backend.load()
    yield backend
    backend.close()
    torch.set_num_threads(threads)  # other suites in this process get their cores back


# --- A stand-in for a text-generation-inference server -----------------------------------


@dataclass
class TGIReply:
    """What the double answers to one POST: HTTP status and a JSON body."""

    status: int
    body: Any


@dataclass
class TGITestDouble:
    """A real HTTP server on 127.0.0.1:0 that answers like TGI, from a script.

    TGI itself cannot run here (no GPU image, no hub). It records every generate
    request body and answers each with the next scripted reply.
    """

    server: ThreadingHTTPServer
    replies: list[TGIReply] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    health_statuses: list[int] = field(default_factory=list)
    health_checks: int = 0
    # Generate calls wait for this before answering; clear it to hold them.
    gate: threading.Event = field(default_factory=lambda: _opened(threading.Event()))

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def answer(self, generated_text: str) -> None:
        """Queue a successful generation (TGI's `/` route answers a one-element list)."""
        self.replies.append(TGIReply(200, [{"generated_text": generated_text}]))

    def fail(self, status: int, error: str, error_type: str) -> None:
        """Queue a TGI error answer."""
        self.replies.append(TGIReply(status, {"error": error, "error_type": error_type}))


def _opened(event: threading.Event) -> threading.Event:
    event.set()
    return event


def _handler_for(double_ref: list[TGITestDouble]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep pytest output clean
            pass

        def _send(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            double = double_ref[0]
            if self.path != "/health":
                self._send(404, {"error": "not found"})
                return
            double.health_checks += 1
            status = double.health_statuses.pop(0) if double.health_statuses else 200
            self._send(status, {} if status == 200 else {"error": "loading"})

        def do_POST(self) -> None:
            double = double_ref[0]
            length = int(self.headers.get("Content-Length", "0"))
            double.requests.append(
                {"path": self.path, "body": json.loads(self.rfile.read(length) or b"null")}
            )
            double.gate.wait(timeout=60)
            if not double.replies:
                self._send(500, {"error": "the test scripted no reply", "error_type": "test"})
                return
            reply = double.replies.pop(0)
            self._send(reply.status, reply.body)

    return Handler


@pytest.fixture
def tgi_double() -> Iterator[TGITestDouble]:
    """A running :class:`TGITestDouble`; stopped after the test."""
    ref: list[TGITestDouble] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(ref))
    double = TGITestDouble(server)
    ref.append(double)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    yield double
    double.gate.set()
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)
