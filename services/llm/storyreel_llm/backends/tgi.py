"""Backend for a text-generation-inference (TGI) server: ``/generate`` with a JSON grammar.

Requests go through ``huggingface_hub.InferenceClient``; JSON answers carry
``grammar={"type": "json", "value": <schema>}``. The chat is rendered with the
served model's own chat template when its tokenizer can be found, otherwise in
zephyr-7b-beta's documented ``<|system|>``/``<|user|>``/``<|assistant|>`` format.
Transient failures (429, 502, 503, 504, a refused or dropped connection) are
retried with backoff. Needs only huggingface_hub and jinja2: the tgi image
installs no torch.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import InferenceClient
from huggingface_hub.errors import (
    HfHubHTTPError,
    InferenceTimeoutError,
    OverloadedError,
    TextGenerationError,
)

from storyreel.errors import UpstreamFailed
from storyreel_llm.backends.base import ChatMessage, fold_system
from storyreel_llm.backends.chat import UnusableTemplate, inspect_chat_template
from storyreel_llm.backends.retry import (
    TRANSIENT_STATUSES,
    Transient,
    call_with_retries,
    http_problem,
    retry_after_s,
    wait_until_ready,
)
from storyreel_llm.settings import LLMSettings

try:  # huggingface_hub 2.x sends with httpx2, 1.x with httpx.
    from httpx2 import HTTPError as _TransportError
    from httpx2 import TimeoutException as _TransportTimeout
except ImportError:  # pragma: no cover - depends on the hub version installed
    from httpx import HTTPError as _TransportError
    from httpx import TimeoutException as _TransportTimeout

log = logging.getLogger(__name__)


def zephyr_prompt(messages: Sequence[ChatMessage]) -> str:
    """Render ``messages`` in zephyr's chat format, ending with the assistant's turn."""
    turns = [f"<|{m['role']}|>\n{m['content']}</s>\n" for m in messages]
    return "".join(turns) + "<|assistant|>\n"


class ChatTemplate:
    """A tokenizer's Jinja chat template, rendered the way transformers renders it."""

    def __init__(self, template: str, special_tokens: dict[str, str], source: str) -> None:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda value, indent=None: json.dumps(
            value, ensure_ascii=False, indent=indent
        )
        self._template = env.from_string(template)
        self._special = special_tokens
        self.source = source

    def render(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True) -> str:
        """The prompt for ``messages``, ending where the assistant's answer starts."""
        return self._template.render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            **self._special,
        )

    @classmethod
    def from_tokenizer_files(
        cls, read: Callable[[str], str | None], source: str
    ) -> ChatTemplate | None:
        """The template in ``chat_template.jinja`` or ``tokenizer_config.json``, if any.

        ``read(name)`` returns a file's text or None when the file is missing.
        """
        config: dict[str, Any] = {}
        raw = read("tokenizer_config.json")
        if raw:
            try:
                config = json.loads(raw)
            except ValueError:
                config = {}
        template = read("chat_template.jinja") or config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if not isinstance(template, str) or not template.strip():
            return None
        special = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            special[key] = value if isinstance(value, str) else ""
        return cls(template, special, source)


def find_chat_template(source: str, *, allow_download: bool) -> ChatTemplate | None:
    """The chat template of ``source``: a local model dir, or a hub id (cache or download)."""
    if not source:
        return None
    folder = Path(source)
    if folder.is_dir():

        def read_local(name: str) -> str | None:
            path = folder / name
            return path.read_text(encoding="utf-8") if path.is_file() else None

        return ChatTemplate.from_tokenizer_files(read_local, str(folder))

    from huggingface_hub import hf_hub_download

    def read_hub(name: str) -> str | None:
        try:
            path = hf_hub_download(source, name, local_files_only=not allow_download)
        except Exception:  # missing file, missing repo, offline: no template from here
            return None
        return Path(path).read_text(encoding="utf-8")

    try:
        return ChatTemplate.from_tokenizer_files(read_hub, source)
    except Exception as exc:  # a template jinja cannot compile
        log.warning("unusable chat template", extra={"source": source, "problem": str(exc)})
        return None


class TGIBackend:
    """Asks a TGI server for prose, and for JSON constrained by TGI's JSON grammar."""

    name = "tgi"
    constrains_json = True

    def __init__(self, settings: LLMSettings) -> None:
        self._settings = settings
        self._url = settings.tgi_url.rstrip("/")
        self._client = InferenceClient(base_url=self._url, timeout=settings.request_timeout_s)
        self._stop = threading.Event()
        self._retry = settings.retry_policy()
        self._template: ChatTemplate | None = None
        self._takes_system = True

    @property
    def template_source(self) -> str:
        """Where the chat template came from ("zephyr" when the built-in format is used)."""
        return self._template.source if self._template else "zephyr"

    def load(self) -> None:
        """Wait until ``/health`` answers 200 (TGI's model is loaded); find the chat template.

        The wait ends at once when the service is told to stop (:meth:`interrupt`).
        """
        wait_until_ready(
            self._health_problem,
            what=f"TGI server at {self._url}",
            timeout_s=self._settings.tgi_startup_timeout_s,
            poll_s=self._settings.tgi_startup_poll_s,
            stop=self._stop,
        )
        source, allow_download = self._settings.tgi_tokenizer, True
        if not source:
            # The model TGI serves, from the local cache only: no download at start-up.
            source, allow_download = self._served_model(), False
        self._template = find_chat_template(source, allow_download=allow_download)
        if self._template is not None:
            try:
                found = inspect_chat_template(self._template.render)
                self._takes_system = found.takes_system
            except UnusableTemplate as exc:
                log.warning(
                    "unusable chat template; using zephyr's format",
                    extra={"source": self._template.source, "problem": str(exc)},
                )
                self._template = None
        log.info(
            "tgi ready",
            extra={
                "url": self._url,
                "chat_template": self.template_source,
                "system_role": self._takes_system,
            },
        )

    def _health_problem(self) -> str | None:
        return http_problem(f"{self._url}/health", "/health")

    def _served_model(self) -> str:
        try:
            with urllib.request.urlopen(f"{self._url}/info", timeout=5) as response:
                return str(json.load(response).get("model_id") or "")
        except (OSError, ValueError):
            return ""

    def prompt(self, messages: Sequence[ChatMessage]) -> str:
        """``messages`` rendered for ``/generate``."""
        if self._template is not None:
            try:
                # A template without a system role gets the system text in the first user turn.
                turns = list(messages) if self._takes_system else fold_system(messages)
                return self._template.render(turns)
            except Exception as exc:  # e.g. a template that rejects a system turn
                log.warning(
                    "chat template failed; using zephyr's format", extra={"problem": str(exc)}
                )
        return zephyr_prompt(messages)

    def generate_text(self, messages: Sequence[ChatMessage], max_new_tokens: int, seed: int) -> str:
        """A free answer from ``/generate`` (no grammar)."""
        return self._generate(messages, None, max_new_tokens, seed)

    def generate_json(
        self,
        messages: Sequence[ChatMessage],
        schema: dict[str, Any],
        max_new_tokens: int,
        seed: int,
    ) -> str:
        """An answer from ``/generate`` under ``grammar={"type": "json", "value": schema}``."""
        return self._generate(messages, {"type": "json", "value": schema}, max_new_tokens, seed)

    def _generate(
        self,
        messages: Sequence[ChatMessage],
        grammar: dict[str, Any] | None,
        max_new_tokens: int,
        seed: int,
    ) -> str:
        settings = self._settings
        inputs = self.prompt(messages)

        def attempt() -> str:
            try:
                return self._client.text_generation(
                    inputs,
                    grammar=grammar,
                    max_new_tokens=max_new_tokens,
                    stop=list(settings.tgi_stop),
                    do_sample=True,
                    temperature=settings.temperature,
                    top_p=settings.top_p,
                    repetition_penalty=settings.repetition_penalty,
                    # TGI takes a u64 seed; keep it in range whatever the caller passes.
                    seed=seed % 2**64,
                )
            except (InferenceTimeoutError, _TransportTimeout) as exc:
                raise UpstreamFailed(
                    f"TGI server at {self._url} did not answer within "
                    f"{settings.request_timeout_s} s"
                ) from exc
            except OverloadedError as exc:
                raise Transient(
                    f"TGI server at {self._url} is overloaded: {exc}", overloaded=True
                ) from exc
            except TextGenerationError as exc:
                status = _status_of(exc.__cause__)
                message = (
                    f"TGI server at {self._url} failed: {type(exc).__name__}: {str(exc)[:300]}"
                )
                if status in TRANSIENT_STATUSES:
                    raise Transient(message, overloaded=status == 429) from exc
                raise UpstreamFailed(message) from exc
            except HfHubHTTPError as exc:
                status = _status_of(exc)
                message = f"TGI server at {self._url} answered HTTP {status}: {str(exc)[:300]}"
                if status in TRANSIENT_STATUSES:
                    raise Transient(
                        message, overloaded=status == 429, retry_after_s=_retry_after(exc)
                    ) from exc
                raise UpstreamFailed(message) from exc
            except (_TransportError, OSError) as exc:
                raise Transient(f"cannot reach TGI server at {self._url}: {exc}") from exc

        return call_with_retries(self._retry, attempt, f"TGI server at {self._url}", self._stop)

    def interrupt(self) -> None:
        """End a wait for ``/health`` or between retries at once."""
        self._stop.set()

    def close(self) -> None:
        """Close the HTTP session."""
        self._stop.set()
        self._client.close()


def _status_of(exc: BaseException | None) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _retry_after(exc: BaseException) -> float | None:
    response = getattr(exc, "response", None)
    value = getattr(response, "headers", {}).get("retry-after") if response is not None else None
    return retry_after_s(value)
