"""Fixtures of the LLM service tests: settings, the shared SmolLM2, model-server doubles.

The doubles are real HTTP servers on 127.0.0.1:0 standing in for servers that
cannot run here (TGI and OpenAI-compatible servers need GPUs and hub weights).
They answer from a script and record every request, so tests can check the
exact payload the backends send.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator, Sequence
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
        # Retries wait a moment only, so retry tests stay quick.
        "retry_backoff_s": 0.01,
        "retry_max_backoff_s": 0.05,
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


# --- HTTP doubles ----------------------------------------------------------------------------


@dataclass
class Reply:
    """What a double answers to one POST: HTTP status, JSON body, headers, delay."""

    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    drop: bool = False  # close the connection without answering


@dataclass
class ServerDouble:
    """A real HTTP server on 127.0.0.1:0 that answers POSTs from a script.

    It records every POST (path, headers, JSON body). GETs of ``health_path``
    answer the next of ``health_statuses`` (200 once they run out).
    """

    server: ThreadingHTTPServer
    health_path: str
    replies: list[Reply] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    health_statuses: list[int] = field(default_factory=list)
    health_checks: int = 0
    get_bodies: dict[str, Any] = field(default_factory=dict)
    # Consulted before the script: a Reply for POST bodies it recognises, else None.
    responder: Any = None
    # POSTs wait for this before answering; clear it to hold them.
    gate: threading.Event = field(default_factory=lambda: _opened(threading.Event()))

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def fail(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        """Queue an error answer."""
        self.replies.append(Reply(status, body, headers or {}))

    def drop(self) -> None:
        """Queue a dropped connection (closed without an answer)."""
        self.replies.append(Reply(0, None, drop=True))

    def slow(self, delay_s: float, body: Any) -> None:
        """Queue an answer that comes after ``delay_s``."""
        self.replies.append(Reply(200, body, delay_s=delay_s))


def _opened(event: threading.Event) -> threading.Event:
    event.set()
    return event


def _handler_for(ref: list[ServerDouble]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep pytest output clean
            pass

        def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            double = ref[0]
            if self.path == double.health_path:
                double.health_checks += 1
                status = double.health_statuses.pop(0) if double.health_statuses else 200
                self._send(status, {} if status == 200 else {"error": "loading"})
            elif self.path in double.get_bodies:
                self._send(200, double.get_bodies[self.path])
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self) -> None:
            double = ref[0]
            length = int(self.headers.get("Content-Length", "0"))
            double.requests.append(
                {
                    "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": json.loads(self.rfile.read(length) or b"null"),
                }
            )
            double.gate.wait(timeout=60)
            body = double.requests[-1]["body"]
            answered = double.responder(body) if double.responder is not None else None
            if answered is not None:
                self._send(answered.status, answered.body, answered.headers)
                return
            if not double.replies:
                self._send(500, {"error": "the test scripted no reply", "error_type": "test"})
                return
            reply = double.replies.pop(0)
            if reply.drop:
                self.close_connection = True
                self.connection.close()
                return
            if reply.delay_s:
                time.sleep(reply.delay_s)
            self._send(reply.status, reply.body, reply.headers)

    return Handler


@pytest.fixture
def start_double() -> Iterator[Any]:
    """``start_double(health_path)`` starts a :class:`ServerDouble`; all stop after the test."""
    started: list[tuple[ServerDouble, threading.Thread]] = []

    def start(health_path: str) -> ServerDouble:
        ref: list[ServerDouble] = []
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(ref))
        server.daemon_threads = True
        double = ServerDouble(server, health_path)
        ref.append(double)
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        thread.start()
        started.append((double, thread))
        return double

    yield start
    for double, thread in started:
        double.gate.set()
        double.server.shutdown()
        double.server.server_close()
        thread.join(timeout=5)


class TGITestDouble:
    """Script helpers for a :class:`ServerDouble` speaking TGI's ``/generate``."""

    def __init__(self, double: ServerDouble) -> None:
        self.double = double

    def __getattr__(self, name: str) -> Any:
        return getattr(self.double, name)

    def answer(self, generated_text: str) -> None:
        """Queue a successful generation (TGI's `/` route answers a one-element list)."""
        self.double.replies.append(Reply(200, [{"generated_text": generated_text}]))

    def answer_all(self, texts: Sequence[str]) -> None:
        for text in texts:
            self.answer(text)

    def error(self, status: int, error: str, error_type: str, **headers: str) -> None:
        """Queue a TGI error answer."""
        self.double.fail(status, {"error": error, "error_type": error_type}, headers)


@pytest.fixture
def tgi_double(start_double) -> TGITestDouble:
    """A running TGI double; ``/info`` reports a model that is in no cache."""
    double = start_double("/health")
    double.get_bodies["/info"] = {"model_id": "storyreel-tests/tgi-double"}
    return TGITestDouble(double)


class OpenAITestDouble:
    """Script helpers for a :class:`ServerDouble` speaking ``/v1/chat/completions``."""

    def __init__(self, double: ServerDouble) -> None:
        self.double = double

    def __getattr__(self, name: str) -> Any:
        return getattr(self.double, name)

    @staticmethod
    def completion(content: str, finish_reason: str = "stop") -> dict[str, Any]:
        return {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": finish_reason,
                }
            ],
        }

    def answer(self, content: str) -> None:
        self.double.replies.append(Reply(200, self.completion(content)))

    def answer_all(self, texts: Sequence[str]) -> None:
        for text in texts:
            self.answer(text)

    def emulate(
        self,
        *,
        json_schema: str = "enforce",
        json_object: str = "enforce",
        grammar: str = "enforce",
        plain: str = "answer",
        unknown_parameters: str = "accept",
    ) -> None:
        """Answer the backend's capability probes as a kind of server would.

        Each format is "enforce" (the answer obeys the probe schema), "ignore" (an
        answer that does not), or "refuse-<status>[:<message>]" (an error, as
        llama-cpp-python's HTTP 500 for json_schema). ``plain`` is how a request
        without constraint is answered ("answer" or "refuse-<status>");
        ``unknown_parameters`` "refuse"
        answers 400 to repetition_penalty / repeat_penalty, as a strict server does.
        Requests that are no probe go on to the script.
        """
        # The probe's one valid answer (storyreel_llm.backends.openai.PROBE_ANSWER).
        probe_answer = '{"probe":"storyreel-probe"}'

        def reply(outcome: str) -> Reply:
            if outcome.startswith("refuse-"):
                status_text, _, message = outcome.removeprefix("refuse-").partition(":")
                status = int(status_text)
                message = message or f"this server does not take that request ({outcome})"
                return Reply(status, {"error": {"message": message}})
            content = probe_answer if outcome == "enforce" else "Hello! How can I help you?"
            return Reply(200, self.completion(content))

        def respond(body: Any) -> Reply | None:
            if not isinstance(body, dict) or body.get("messages") != [
                {"role": "user", "content": "Say hello."}
            ]:
                return None
            if unknown_parameters == "refuse" and (
                "repetition_penalty" in body or "repeat_penalty" in body
            ):
                return Reply(400, {"error": {"message": "Unrecognized request argument"}})
            response_format = body.get("response_format") or {}
            if response_format.get("type") == "json_schema":
                return reply(json_schema)
            if response_format.get("type") == "json_object":
                return reply(json_object)
            if "grammar" in body:
                return reply(grammar)
            return reply("ignore" if plain == "answer" else plain)

        self.double.responder = respond

    @property
    def story_requests(self) -> list[dict[str, Any]]:
        """The requests that were no capability probe."""
        return [
            r
            for r in self.double.requests
            if r["body"].get("messages") != [{"role": "user", "content": "Say hello."}]
        ]


@pytest.fixture
def openai_double(start_double) -> OpenAITestDouble:
    """A running OpenAI-compatible double (``/v1/models`` is its readiness check)."""
    return OpenAITestDouble(start_double("/v1/models"))
