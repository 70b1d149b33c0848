"""HTTP test doubles of model servers: real HTTP servers on 127.0.0.1 for servers that
cannot run here (TGI and OpenAI-compatible servers need GPUs and hub weights).

:class:`ServerDouble` records every request and answers POSTs from a script;
:class:`TGITestDouble` speaks text-generation-inference's HTTP contract on top of it:

* ``GET /health``: 200 once the model is loaded (``health_statuses`` scripts 503s first);
* ``GET /info``: ``{"model_id": ...}``;
* ``POST /`` (what huggingface_hub's InferenceClient calls) answers a one-element list
  ``[{"generated_text": ...}]``, ``POST /generate`` the object itself; a request with
  ``"stream": true`` is refused (the double does not stream);
* errors are ``{"error": ..., "error_type": ...}`` with TGI's status codes.

A TGI double answers from its script (:meth:`TGITestDouble.answer`, ``error``, ``drop``,
``slow``); made with ``schema_answers=True`` it answers every request the script does
not cover itself: a request with a JSON grammar gets the smallest document that
satisfies the schema, taking a field's first ``examples`` value where the schema gives
one that fits (so every LLM service request is answered validly and instantly); one
without gets a short story, as many sentences long as its ``max_new_tokens`` allows
(about four characters a token). That lets tests run the real LLM service many times
over in seconds (tests/faults).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    """What a double answers to one POST: HTTP status, JSON body, headers, delay."""

    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    drop: bool = False  # close the connection without answering


class ServerDouble:
    """A real HTTP server on 127.0.0.1:0 that answers POSTs from a script.

    It records every POST (path, headers, JSON body). GETs of ``health_path``
    answer the next of ``health_statuses`` (200 once they run out); GETs of a path
    in ``get_bodies`` answer that body. ``responder(body)``, when set, is asked
    first and may answer a POST with a :class:`Reply`. Start with :meth:`start`.
    """

    def __init__(self, health_path: str) -> None:
        self.health_path = health_path
        self.replies: list[Reply] = []
        self.requests: list[dict[str, Any]] = []
        self.health_statuses: list[int] = []
        self.health_checks = 0
        self.get_bodies: dict[str, Any] = {}
        self.responder: Any = None
        # POSTs wait for this before answering; clear it to hold them.
        self.gate = threading.Event()
        self.gate.set()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.server.daemon_threads = True
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)

    def fail(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        """Queue an error answer."""
        self.replies.append(Reply(status, body, headers or {}))

    def drop(self) -> None:
        """Queue a dropped connection (closed without an answer)."""
        self.replies.append(Reply(0, None, drop=True))

    def slow(self, delay_s: float, body: Any) -> None:
        """Queue an answer that comes after ``delay_s``."""
        self.replies.append(Reply(200, body, delay_s=delay_s))

    def reply_to(self, path: str, body: Any) -> Reply:
        """The answer to a POST: the responder's, else the script's next, else unscripted."""
        answered = self.responder(body) if self.responder is not None else None
        if answered is not None:
            return answered
        if self.replies:
            return self.replies.pop(0)
        return self.unscripted(path, body)

    def unscripted(self, path: str, body: Any) -> Reply:
        """The answer when the script has run out."""
        return Reply(500, {"error": "the test scripted no reply", "error_type": "test"})


def _handler_for(double: ServerDouble) -> type[BaseHTTPRequestHandler]:
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
            if self.path == double.health_path:
                double.health_checks += 1
                status = double.health_statuses.pop(0) if double.health_statuses else 200
                self._send(status, {} if status == 200 else {"error": "loading"})
            elif self.path in double.get_bodies:
                self._send(200, double.get_bodies[self.path])
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            double.requests.append(
                {
                    "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": json.loads(self.rfile.read(length) or b"null"),
                }
            )
            double.gate.wait(timeout=60)
            reply = double.reply_to(self.path, double.requests[-1]["body"])
            if reply.drop:
                self.close_connection = True
                self.connection.close()
                return
            if reply.delay_s:
                time.sleep(reply.delay_s)
            self._send(reply.status, reply.body, reply.headers)

    return Handler


# --- text-generation-inference ----------------------------------------------------------------

#: TGI's generation routes: "/" (compatibility: a list of one) and "/generate" (the object).
TGI_ROUTES = ("/", "/generate")


class TGITestDouble(ServerDouble):
    """A text-generation-inference server on 127.0.0.1, answering from a script.

    ``schema_answers=True`` answers what the script does not: a valid document for a
    JSON grammar, a short story otherwise (see the module's docstring).
    """

    def __init__(
        self, *, model_id: str = "storyreel-tests/tgi-double", schema_answers: bool = False
    ) -> None:
        super().__init__("/health")
        self.get_bodies["/info"] = {"model_id": model_id}
        self.schema_answers = schema_answers

    def answer(self, generated_text: str) -> None:
        """Queue a successful generation."""
        self.replies.append(Reply(200, {"generated_text": generated_text}))

    def answer_all(self, texts: Sequence[str]) -> None:
        for text in texts:
            self.answer(text)

    def slow(self, delay_s: float, generated_text: str) -> None:
        """Queue a successful generation that comes after ``delay_s``."""
        self.replies.append(Reply(200, {"generated_text": generated_text}, delay_s=delay_s))

    def error(self, status: int, error: str, error_type: str, **headers: str) -> None:
        """Queue a TGI error answer."""
        self.fail(status, {"error": error, "error_type": error_type}, headers)

    def reply_to(self, path: str, body: Any) -> Reply:
        if path not in TGI_ROUTES:
            return Reply(404, {"error": f"no route {path}", "error_type": "not_found"})
        if isinstance(body, dict) and body.get("stream"):
            return Reply(422, {"error": "the TGI double does not stream", "error_type": "test"})
        reply = super().reply_to(path, body)
        if reply.status == 200 and path == "/":
            # TGI's compatibility route wraps the generation in a list, as the
            # Inference API does; /generate answers the object itself.
            return Reply(200, [reply.body], reply.headers, reply.delay_s, reply.drop)
        return reply

    def unscripted(self, path: str, body: Any) -> Reply:
        if not self.schema_answers:
            return super().unscripted(path, body)
        parameters = (body or {}).get("parameters") or {}
        grammar = parameters.get("grammar")
        if grammar and grammar.get("type") == "json":
            text = json.dumps(instance(grammar["value"]))
        else:
            text = story(parameters.get("max_new_tokens"))
        return Reply(200, {"generated_text": text})


# --- answers for any request ------------------------------------------------------------------

STORY = (
    "Ada, a lighthouse keeper in a red coat, finds a whale stranded in the bay. "
    "She rows out at dawn and sings to calm it. "
    "The tide rises and the whale swims free, waving its tail. "
    "Every spring it comes back to the lighthouse."
)
#: Sentences a longer story goes on with, in turn.
MORE_STORY = (
    "Ada waves from the rocks.",
    "The whale sings back.",
    "Gulls circle the lighthouse.",
    "The sea turns gold at dusk.",
)


def story(max_new_tokens: int | None) -> str:
    """:data:`STORY`, continued with :data:`MORE_STORY` until about ``max_new_tokens`` tokens."""
    text = STORY
    budget = 3 * (max_new_tokens or 0)  # characters, at a conservative 3 per token
    more = 0
    while len(text) < budget:
        text += " " + MORE_STORY[more % len(MORE_STORY)]
        more += 1
    return text


_WORDS = ["Ada", "the", "lighthouse", "keeper", "watches", "a", "whale", "at", "dawn"]


def instance(schema: dict[str, Any], path: str = "") -> Any:
    """The smallest value valid under ``schema`` (refs must be inlined)."""
    if "const" in schema:
        return schema["const"]
    for example in schema.get("examples", [])[:1]:
        if _fits(example, schema):
            return example
    if "enum" in schema:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            return instance(schema[key][0], path)
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = next(k for k in kind if k != "null")
    if kind == "object":
        properties = schema.get("properties", {})
        required = schema.get("required", list(properties))
        return {name: instance(properties[name], f"{path}.{name}") for name in required}
    if kind == "array":
        count = max(schema.get("minItems", 0), 1 if "characters" not in path else 0)
        count = min(count, schema.get("maxItems", count))
        return [instance(schema.get("items", {}), f"{path}[{i}]") for i in range(count)]
    if kind == "integer":
        return max(schema.get("minimum", 1), 1)
    if kind == "number":
        return float(schema.get("minimum", 1))
    if kind == "boolean":
        return False
    return _string(schema, path)


def _fits(value: Any, schema: dict[str, Any]) -> bool:
    """True when ``value`` obviously satisfies ``schema`` (strings, enums, arrays of strings)."""
    if "enum" in schema:
        return value in schema["enum"]
    if isinstance(value, str):
        low, high = schema.get("minLength", 0), schema.get("maxLength", len(value))
        pattern = schema.get("pattern")
        return low <= len(value) <= high and (not pattern or re.search(pattern, value) is not None)
    if isinstance(value, list):
        low, high = schema.get("minItems", 0), schema.get("maxItems", len(value))
        items = schema.get("items", {})
        return low <= len(value) <= high and all(_fits(v, items) for v in value)
    return False


def _string(schema: dict[str, Any], path: str) -> str:
    low, high = schema.get("minLength", 1), schema.get("maxLength", 60)
    text = " ".join(_WORDS)
    if path.endswith("name"):
        text = "Ada"
    while len(text) < low:
        text += " " + text
    text = text[:high].strip() or "Ada"
    pattern = schema.get("pattern")
    if pattern and not re.fullmatch(pattern, text):
        for candidate in ("Ada", "ada", "A", "a", "x"):
            if re.fullmatch(pattern, candidate):
                return candidate
    return text
