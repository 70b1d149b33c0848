"""Fixtures of the LLM service tests: settings, the shared SmolLM2, model-server doubles.

The doubles are real HTTP servers on 127.0.0.1:0 standing in for servers that
cannot run here (TGI and OpenAI-compatible servers need GPUs and hub weights).
They answer from a script and record every request, so tests can check the
exact payload the backends send.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from model_server_doubles import Reply, ServerDouble, TGITestDouble
from storyreel_llm.settings import LLMSettings
from support import MODELS

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


# --- HTTP doubles (tests/model_server_doubles.py) --------------------------------------------


@pytest.fixture
def start_double() -> Iterator[Any]:
    """``start_double(double)`` starts a :class:`ServerDouble`; all stop after the test."""
    started: list[ServerDouble] = []

    def start(double: ServerDouble) -> ServerDouble:
        started.append(double.start())
        return double

    yield start
    for double in started:
        double.stop()


@pytest.fixture
def tgi_double(start_double) -> TGITestDouble:
    """A running TGI double answering from its script; ``/info`` names a model in no cache."""
    return start_double(TGITestDouble())


class OpenAITestDouble(ServerDouble):
    """An OpenAI-compatible server answering ``/v1/chat/completions`` from a script.

    ``/v1/models`` is its readiness check.
    """

    def __init__(self) -> None:
        super().__init__("/v1/models")

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
        self.replies.append(Reply(200, self.completion(content)))

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

        self.responder = respond

    @property
    def story_requests(self) -> list[dict[str, Any]]:
        """The requests that were no capability probe."""
        return [
            r
            for r in self.requests
            if r["body"].get("messages") != [{"role": "user", "content": "Say hello."}]
        ]


@pytest.fixture
def openai_double(start_double) -> OpenAITestDouble:
    """A running OpenAI-compatible double (``/v1/models`` is its readiness check)."""
    return start_double(OpenAITestDouble())


@pytest.fixture
def openai_settings_for(settings_for, openai_double):
    """``openai_settings_for(**overrides)``: settings of the OpenAI-compatible backend on
    ``openai_double``, polled for readiness every 0.01 s, with ``overrides``."""

    def make(**overrides: Any) -> LLMSettings:
        values = {"backend": "openai", "openai_url": openai_double.url, "tgi_startup_poll_s": 0.01}
        return settings_for(**(values | overrides))

    return make
