"""Backend for a text-generation-inference (TGI) server, with TGI's JSON grammar.

Needs only huggingface_hub: the tgi image installs no torch.
"""

from __future__ import annotations

import logging
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from huggingface_hub import InferenceClient
from huggingface_hub.errors import (
    HfHubHTTPError,
    InferenceTimeoutError,
    OverloadedError,
    TextGenerationError,
)

from storyreel.errors import Overloaded, UpstreamFailed
from storyreel_llm.backends.base import ChatMessage
from storyreel_llm.settings import LLMSettings

try:  # huggingface_hub 2.x sends with httpx2, 1.x with httpx.
    from httpx2 import HTTPError as _TransportError
except ImportError:  # pragma: no cover - depends on the hub version installed
    from httpx import HTTPError as _TransportError

log = logging.getLogger(__name__)


def zephyr_prompt(messages: Sequence[ChatMessage]) -> str:
    """Render ``messages`` in zephyr's chat format, ending with the assistant's turn."""
    turns = [f"<|{m['role']}|>\n{m['content']}</s>\n" for m in messages]
    return "".join(turns) + "<|assistant|>\n"


class TGIBackend:
    """Asks a TGI server for JSON constrained by ``grammar={"type": "json", ...}``."""

    name = "tgi"

    def __init__(self, settings: LLMSettings) -> None:
        self._settings = settings
        self._url = settings.tgi_url.rstrip("/")
        self._client = InferenceClient(base_url=self._url, timeout=settings.tgi_timeout_s)

    def load(self) -> None:
        """Wait until the server's ``/health`` answers 200 (TGI's model is loaded)."""
        deadline = time.monotonic() + self._settings.tgi_startup_timeout_s
        while True:
            problem = self._health_problem()
            if problem is None:
                log.info("tgi ready", extra={"url": self._url})
                return
            if time.monotonic() >= deadline:
                raise UpstreamFailed(f"TGI server at {self._url} is not ready: {problem}")
            log.info("waiting for tgi", extra={"url": self._url, "problem": problem})
            time.sleep(self._settings.tgi_startup_poll_s)

    def _health_problem(self) -> str | None:
        try:
            with urllib.request.urlopen(f"{self._url}/health", timeout=5) as response:
                return None if response.status == 200 else f"/health answered {response.status}"
        except urllib.error.HTTPError as exc:
            return f"/health answered {exc.code}"
        except OSError as exc:
            return str(getattr(exc, "reason", exc))

    def generate_json(
        self,
        messages: Sequence[ChatMessage],
        schema: dict[str, Any],
        max_new_tokens: int,
        seed: int,
    ) -> str:
        """One non-streaming ``/`` generate call; errors become UpstreamFailed naming the URL."""
        settings = self._settings
        try:
            return self._client.text_generation(
                zephyr_prompt(messages),
                grammar={"type": "json", "value": schema},
                max_new_tokens=max_new_tokens,
                stop=list(settings.tgi_stop),
                do_sample=True,
                temperature=settings.temperature,
                top_p=settings.top_p,
                repetition_penalty=settings.repetition_penalty,
                # TGI takes a u64 seed; keep it in range whatever the caller passes.
                seed=seed % 2**64,
            )
        except InferenceTimeoutError as exc:
            raise UpstreamFailed(
                f"TGI server at {self._url} did not answer within {settings.tgi_timeout_s} s"
            ) from exc
        except OverloadedError as exc:
            raise Overloaded(f"TGI server at {self._url} is overloaded: {exc}") from exc
        except TextGenerationError as exc:
            raise UpstreamFailed(
                f"TGI server at {self._url} failed: {type(exc).__name__}: {str(exc)[:300]}"
            ) from exc
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else "?"
            raise UpstreamFailed(
                f"TGI server at {self._url} answered HTTP {status}: {str(exc)[:300]}"
            ) from exc
        except (_TransportError, OSError) as exc:
            raise UpstreamFailed(f"cannot reach TGI server at {self._url}: {exc}") from exc

    def close(self) -> None:
        """Close the HTTP session."""
        self._client.close()
