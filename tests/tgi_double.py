"""A text-generation-inference test double that answers any JSON-schema grammar.

TGI needs a GPU and hub weights, so it cannot run here. This real HTTP server
on 127.0.0.1 speaks enough of TGI's API for the LLM service: ``/health``,
``/info``, and ``POST /`` or ``/generate``. A request with a JSON grammar gets
the smallest document that satisfies the schema, taking a field's first
``examples`` value where the schema gives one that fits (so every LLM service
request is answered validly and instantly); one without gets a short story, as
many sentences long as its ``max_new_tokens`` allows (about four characters a
token). It lets tests run the real LLM service many times over in seconds.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

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


class TGISchemaDouble:
    """Start with :meth:`start`; ``url`` is its base URL; ``requests`` counts calls."""

    def __init__(self) -> None:
        self.requests = 0
        double = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/health":
                    self._send(200, {})
                elif self.path == "/info":
                    self._send(200, {"model_id": "tgi-schema-double"})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                double.requests += 1
                parameters = body.get("parameters") or {}
                grammar = parameters.get("grammar")
                if grammar and grammar.get("type") == "json":
                    text = json.dumps(instance(grammar["value"]))
                else:
                    text = story(parameters.get("max_new_tokens"))
                self._send(200, [{"generated_text": text}])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> TGISchemaDouble:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
