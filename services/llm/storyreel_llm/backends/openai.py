"""Backend for any OpenAI-compatible ``/v1/chat/completions`` server.

vLLM, SGLang, the llama.cpp server, Ollama and TGI's Messages API all speak it.
The schema goes in ``response_format``, in one of two shapes
(``openai_response_format``):

* ``json_schema``: ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``,
  OpenAI's own (vLLM, SGLang, Ollama, llama.cpp);
* ``json_object``: ``{"type": "json_object", "schema": ..., "value": ...}``, the
  variant llama.cpp reads (``schema``) and TGI's Messages API reads (``value``);
  each ignores the other key, so one shape serves both.

With ``none`` no schema is sent, for servers that cannot constrain decoding:
their answers go through the tolerant parser. Standard library HTTP only, so
the image needs no extra client; transient failures (429, 502, 503, 504, a
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

from storyreel.errors import UpstreamFailed
from storyreel_llm.backends.base import ChatMessage
from storyreel_llm.backends.retry import (
    TRANSIENT_STATUSES,
    RetryPolicy,
    Transient,
    wait_until_ready,
)
from storyreel_llm.settings import LLMSettings

log = logging.getLogger(__name__)

#: Name given to the schema in ``json_schema`` requests (the API requires one).
SCHEMA_NAME = "storyboard_step"


def api_base(url: str) -> str:
    """``url`` ending in ``/v1`` ("http://h:8000" and "http://h:8000/v1/" both work)."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


class OpenAIBackend:
    """Asks an OpenAI-compatible server for prose, and for JSON via ``response_format``."""

    name = "openai"

    def __init__(self, settings: LLMSettings) -> None:
        self._settings = settings
        self._base = api_base(settings.openai_url)
        self._stop = threading.Event()
        self._retry = RetryPolicy(
            settings.retries, settings.retry_backoff_s, settings.retry_max_backoff_s, self._stop
        )

    @property
    def constrains_json(self) -> bool:
        """False with ``openai_response_format=none``: answers are parsed tolerantly."""
        return self._settings.openai_response_format != "none"

    @property
    def endpoint(self) -> str:
        """The chat completions URL requests go to."""
        return f"{self._base}/chat/completions"

    def load(self) -> None:
        """Wait until ``/v1/models`` answers 200; ends at once on :meth:`interrupt`."""
        wait_until_ready(
            self._models_problem,
            what=f"OpenAI-compatible server at {self._base}",
            timeout_s=self._settings.tgi_startup_timeout_s,
            poll_s=self._settings.tgi_startup_poll_s,
            stop=self._stop,
        )
        log.info("openai server ready", extra={"url": self._base})

    def _models_problem(self) -> str | None:
        request = urllib.request.Request(f"{self._base}/models", headers=self._headers())
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return None if response.status == 200 else f"/models answered {response.status}"
        except urllib.error.HTTPError as exc:
            return f"/models answered {exc.code}"
        except OSError as exc:
            return str(getattr(exc, "reason", exc))

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = self._settings.openai_api_key.get_secret_value()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def payload(
        self,
        messages: Sequence[ChatMessage],
        schema: dict[str, Any] | None,
        max_new_tokens: int,
        seed: int,
    ) -> dict[str, Any]:
        """The request body for ``messages`` (``schema`` None: a free answer)."""
        s = self._settings
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
        if s.openai_stop:
            body["stop"] = list(s.openai_stop)
        if schema is not None and s.openai_response_format == "json_schema":
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": SCHEMA_NAME, "schema": schema, "strict": True},
            }
        elif schema is not None and s.openai_response_format == "json_object":
            body["response_format"] = {"type": "json_object", "schema": schema, "value": schema}
        return body

    def generate_text(self, messages: Sequence[ChatMessage], max_new_tokens: int, seed: int) -> str:
        """A free answer (no ``response_format``)."""
        return self._complete(self.payload(messages, None, max_new_tokens, seed))

    def generate_json(
        self,
        messages: Sequence[ChatMessage],
        schema: dict[str, Any],
        max_new_tokens: int,
        seed: int,
    ) -> str:
        """An answer under ``schema`` where the server constrains decoding."""
        return self._complete(self.payload(messages, schema, max_new_tokens, seed))

    def _complete(self, body: dict[str, Any]) -> str:
        data = json.dumps(body).encode()
        timeout = self._settings.request_timeout_s
        where = f"OpenAI-compatible server at {self.endpoint}"

        def attempt() -> str:
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
                raise UpstreamFailed(message) from exc
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
                content = answer["choices"][0]["message"].get("content")
            except (KeyError, IndexError, TypeError, AttributeError) as exc:
                raise UpstreamFailed(f"{where} answered without choices[0].message") from exc
            return content if isinstance(content, str) else ""

        return self._retry.run(attempt, where)

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
    value = exc.headers.get("Retry-After") if exc.headers else None
    try:
        return max(float(value), 0.0) if value is not None else None
    except ValueError:
        return None
