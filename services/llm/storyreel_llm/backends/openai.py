"""Backend for any OpenAI-compatible ``/v1/chat/completions`` server.

vLLM, SGLang, llama.cpp's llama-server, llama-cpp-python, Ollama and TGI's
Messages API all speak it, but they constrain decoding in different ways, and
answer a way they do not know with an error (llama-cpp-python 0.3 answers
``json_schema`` with HTTP 500, "Input should be 'text' or 'json_object'"). So
the way is negotiated, not assumed (``openai_response_format=auto``): at load
the backend tries, in this order,

1. ``json_schema``: ``response_format={"type": "json_schema", "json_schema": {...}}``,
   OpenAI's own (vLLM, SGLang, Ollama, llama-server);
2. ``json_object`` with the schema: ``{"type": "json_object", "schema": ..., "value": ...}``,
   the variant llama.cpp's servers read (``schema``) and TGI's Messages API reads
   (``value``); each ignores the other key;
3. ``grammar``: a GBNF grammar built from the schema (:mod:`storyreel_llm.gbnf`) in the
   request's ``grammar`` field (llama-server, llama-cpp-python);
4. ``none``: no constraint; answers go through the tolerant parser.

Each try asks for a tiny JSON object that the model would never write unless the
server held it to the schema, so a server that accepts a format and silently
ignores it is not taken at its word. The answer is cached for the life of the
backend and logged. A server that refuses even a plain chat request cannot be
used: :meth:`OpenAIBackend.load` raises, and the service stays NOT_SERVING with
the server's reason in its log.

A 4xx answer is a configuration error (a wrong model name, API key, or a request
the server does not take) and raises :class:`~storyreel.errors.FailedPrecondition`
with the server's own message; it is never retried. Standard library HTTP only,
so the image needs no extra client; transient failures (429, 502, 503, 504, a
refused or dropped connection) are retried with backoff.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from storyreel.errors import FailedPrecondition, UpstreamFailed
from storyreel_llm.backends.base import ChatMessage, fold_system
from storyreel_llm.backends.retry import (
    TRANSIENT_STATUSES,
    Transient,
    call_with_retries,
    http_problem,
    retry_after_s,
    wait_until_ready,
)
from storyreel_llm.gbnf import schema_to_gbnf
from storyreel_llm.settings import LLMSettings

log = logging.getLogger(__name__)

#: Name given to the schema in ``json_schema`` requests (the API requires one).
SCHEMA_NAME = "storyboard_step"
#: Ways of constraining an answer, in the order they are tried.
RESPONSE_FORMATS = ("json_schema", "json_object", "grammar", "none")

# The negotiation's probe: a JSON object the model would not write unless held to it.
PROBE_VALUE = "storyreel-probe"
PROBE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"probe": {"type": "string", "enum": [PROBE_VALUE]}},
    "required": ["probe"],
    "additionalProperties": False,
}
PROBE_ANSWER = json.dumps({"probe": PROBE_VALUE}, separators=(",", ":"))
_PROBE_MESSAGES: list[ChatMessage] = [{"role": "user", "content": "Say hello."}]
_PROBE_TOKENS = 48


class _Refused(Exception):
    """The server answered a request with an error that retrying cannot fix."""

    def __init__(self, status: int, detail: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail
        self.message = message


def _is_configuration_error(status: int) -> bool:
    """4xx but a timeout (408) or a rate limit (429): the request itself is wrong."""
    return 400 <= status < 500 and status not in (408, 429)


def api_base(url: str) -> str:
    """``url`` ending in ``/v1`` ("http://h:8000" and "http://h:8000/v1/" both work)."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


class OpenAIBackend:
    """Asks an OpenAI-compatible server for prose, and for JSON the way the server takes it."""

    name = "openai"

    def __init__(self, settings: LLMSettings) -> None:
        self._settings = settings
        self._base = api_base(settings.openai_url)
        self._stop = threading.Event()
        self._retry = settings.retry_policy()
        wanted = settings.openai_response_format
        #: The response format in use: None until negotiated (``auto`` before :meth:`load`).
        self._mode: str | None = None if wanted == "auto" else wanted
        #: Whether repetition_penalty / repeat_penalty go with each request.
        self._penalty = settings.openai_repetition_penalty and settings.repetition_penalty != 1.0
        #: What each response format answered during the negotiation (for logs and tests).
        self.capabilities: dict[str, str] = {}
        self._grammars: dict[str, str] = {}

    @property
    def response_format(self) -> str | None:
        """The response format in use (``json_schema``, ``json_object``, ``grammar``, ``none``)."""
        return self._mode

    @property
    def constrains_json(self) -> bool:
        """False when the server constrains nothing: answers are parsed tolerantly."""
        return self._mode != "none"

    @property
    def endpoint(self) -> str:
        """The chat completions URL requests go to."""
        return f"{self._base}/chat/completions"

    def load(self) -> None:
        """Wait until ``/v1/models`` answers 200, then find how the server constrains JSON.

        The wait ends at once on :meth:`interrupt`. Raises
        :class:`~storyreel.errors.FailedPrecondition` when the server refuses a plain
        chat request, or the response format the settings name.
        """
        wait_until_ready(
            self._models_problem,
            what=f"OpenAI-compatible server at {self._base}",
            timeout_s=self._settings.tgi_startup_timeout_s,
            poll_s=self._settings.tgi_startup_poll_s,
            stop=self._stop,
        )
        self.negotiate()
        log.info(
            "openai server ready",
            extra={
                "url": self._base,
                "response_format": self._mode,
                "capabilities": self.capabilities,
                "repetition_penalty_sent": self._penalty,
            },
        )

    def _models_problem(self) -> str | None:
        request = urllib.request.Request(f"{self._base}/models", headers=self._headers())
        return http_problem(request, "/models")

    # --- Negotiation ------------------------------------------------------------------------

    def negotiate(self) -> str:
        """Find (once) the response format to use; the answer is cached and returned."""
        where = f"OpenAI-compatible server at {self.endpoint}"
        # A plain chat request first: if even that is refused, nothing will work.
        plain = self._probe("none")
        if plain not in ("works", "enforced") and self._penalty:
            # Strict servers refuse parameters they do not know: try without the penalty.
            self._penalty = False
            plain = self._probe("none")
            if plain in ("works", "enforced"):
                log.warning(
                    "the server refuses repetition_penalty; sending none",
                    extra={"url": self._base},
                )
        self.capabilities["none"] = plain
        if plain not in ("works", "enforced"):
            raise FailedPrecondition(
                f"{where} cannot be used: it refuses a plain chat request ({plain}); "
                "check STORYREEL_LLM_OPENAI_MODEL, ..._OPENAI_API_KEY and ..._OPENAI_URL"
            )
        wanted = self._settings.openai_response_format
        if wanted == "none":
            self._mode = "none"
            return self._mode
        candidates = RESPONSE_FORMATS[:-1] if wanted == "auto" else (wanted,)
        for mode in candidates:
            outcome = self._probe(mode)
            self.capabilities[mode] = outcome
            if outcome == "enforced":
                self._mode = mode
                return mode
        if wanted != "auto":
            raise FailedPrecondition(
                f"{where} does not take response format {wanted!r} "
                f"({self.capabilities[wanted]}); set STORYREEL_LLM_OPENAI_RESPONSE_FORMAT=auto "
                "to find one it takes"
            )
        log.warning(
            "the server constrains no JSON; answers go through the tolerant parser",
            extra={"url": self._base, "capabilities": self.capabilities},
        )
        self._mode = "none"
        return self._mode

    def _probe(self, mode: str) -> str:
        """How the server answers a tiny request in ``mode``.

        "enforced": the answer is exactly the probe object (the schema held);
        "works": a plain request was answered; "ignored": an answer, but not held to
        the schema; otherwise "refused: HTTP <status>: <the server's message>".
        """
        schema = None if mode == "none" else PROBE_SCHEMA
        body = self.payload(_PROBE_MESSAGES, schema, _PROBE_TOKENS, seed=1, mode=mode)
        body["temperature"] = 0.0
        try:
            content, finish = self._complete(body, refused=_Refused)
        except _Refused as exc:
            return f"refused: HTTP {exc.status}: {exc.detail}"
        if mode == "none":
            return "works"
        compact = "".join(content.split())
        held = compact == PROBE_ANSWER or (
            finish == "length" and len(compact) >= 12 and PROBE_ANSWER.startswith(compact)
        )
        return "enforced" if held else "ignored"

    # --- Requests -----------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = self._settings.openai_api_key.get_secret_value()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def grammar(self, schema: dict[str, Any]) -> str:
        """The GBNF grammar of ``schema`` (built once per schema, then reused)."""
        key = json.dumps(schema, sort_keys=True)
        grammar = self._grammars.get(key)
        if grammar is None:
            grammar = self._grammars[key] = schema_to_gbnf(schema)
        return grammar

    def payload(
        self,
        messages: Sequence[ChatMessage],
        schema: dict[str, Any] | None,
        max_new_tokens: int,
        seed: int,
        mode: str | None = None,
    ) -> dict[str, Any]:
        """The request body for ``messages`` (``schema`` None: a free answer).

        ``mode`` is the response format (default: the negotiated one).
        """
        s = self._settings
        mode = mode or self._mode or "none"
        if not s.openai_system_role:
            messages = fold_system(messages)
        body: dict[str, Any] = {
            "model": s.openai_model,
            "messages": [dict(m) for m in messages],
            "max_tokens": max_new_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            # Servers differ in the seed range they take; 31 bits suit all.
            "seed": seed % 2**31,
            "stream": False,
        }
        if self._penalty:
            # vLLM and TGI read repetition_penalty, llama.cpp's servers repeat_penalty;
            # each ignores the other.
            body["repetition_penalty"] = s.repetition_penalty
            body["repeat_penalty"] = s.repetition_penalty
        if s.openai_stop:
            body["stop"] = list(s.openai_stop)
        if schema is not None and mode == "json_schema":
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": SCHEMA_NAME, "schema": schema, "strict": True},
            }
        elif schema is not None and mode == "json_object":
            body["response_format"] = {"type": "json_object", "schema": schema, "value": schema}
        elif schema is not None and mode == "grammar":
            body["grammar"] = self.grammar(schema)
        return body

    def generate_text(self, messages: Sequence[ChatMessage], max_new_tokens: int, seed: int) -> str:
        """A free answer (no ``response_format``)."""
        return self._complete(self.payload(messages, None, max_new_tokens, seed))[0]

    def generate_json(
        self,
        messages: Sequence[ChatMessage],
        schema: dict[str, Any],
        max_new_tokens: int,
        seed: int,
    ) -> str:
        """An answer under ``schema``, constrained the way the server takes it."""
        if self._mode is None:
            self.negotiate()
        return self._complete(self.payload(messages, schema, max_new_tokens, seed))[0]

    def _complete(
        self, body: dict[str, Any], refused: type[Exception] | None = None
    ) -> tuple[str, str]:
        """(content, finish reason) of ``body``'s answer.

        A 4xx answer raises FailedPrecondition (``refused`` None) or ``refused``.
        """
        data = json.dumps(body).encode()
        timeout = self._settings.request_timeout_s
        where = f"OpenAI-compatible server at {self.endpoint}"

        def attempt() -> tuple[str, str]:
            request = urllib.request.Request(
                self.endpoint, data=data, headers=self._headers(), method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    answer = json.load(response)
            except urllib.error.HTTPError as exc:
                detail = _error_detail(exc)
                message = f"{where} answered HTTP {exc.code}: {detail}"
                if exc.code in TRANSIENT_STATUSES:
                    raise Transient(
                        message, overloaded=exc.code == 429, retry_after_s=_retry_after(exc)
                    ) from exc
                raise _Refused(exc.code, detail, message) from exc
            except TimeoutError as exc:
                raise UpstreamFailed(f"{where} did not answer within {timeout} s") from exc
            except urllib.error.URLError as exc:
                if isinstance(exc.reason, TimeoutError | socket.timeout):
                    raise UpstreamFailed(f"{where} did not answer within {timeout} s") from exc
                raise Transient(f"cannot reach {where}: {exc.reason}") from exc
            except (http.client.HTTPException, ConnectionError) as exc:
                # RemoteDisconnected, a reset: the connection dropped mid-request.
                raise Transient(f"lost the connection to {where}: {exc!r}") from exc
            except ValueError as exc:
                raise UpstreamFailed(f"{where} answered with invalid JSON") from exc
            try:
                choice = answer["choices"][0]
                content = choice["message"].get("content")
            except (KeyError, IndexError, TypeError, AttributeError) as exc:
                raise UpstreamFailed(f"{where} answered without choices[0].message") from exc
            finish = choice.get("finish_reason") if isinstance(choice, dict) else None
            return (content if isinstance(content, str) else "", str(finish or ""))

        try:
            return call_with_retries(self._retry, attempt, where, self._stop)
        except _Refused as exc:
            if refused is not None:
                raise
            if _is_configuration_error(exc.status):
                raise FailedPrecondition(
                    f"{exc.message} (a configuration error, not retried: check the model "
                    "name, the API key and the response format the server takes)"
                ) from exc
            raise UpstreamFailed(exc.message) from exc

    def interrupt(self) -> None:
        """End a wait for the server or between retries at once."""
        self._stop.set()

    def close(self) -> None:
        """Nothing is held open between requests."""
        self._stop.set()


def _error_detail(exc: urllib.error.HTTPError) -> str:
    try:
        body = exc.read().decode("utf-8", "replace")
    except OSError:
        body = ""
    try:
        error = json.loads(body).get("error")
        if isinstance(error, dict):
            error = error.get("message")
        if error:
            return str(error)[:300]
    except (ValueError, AttributeError):
        pass
    return (body or exc.reason or "").strip()[:300] if isinstance(body, str) else str(exc.reason)


def _retry_after(exc: urllib.error.HTTPError) -> float | None:
    return retry_after_s(exc.headers.get("Retry-After") if exc.headers else None)
