"""Helpers of the LLM service tests: canned model answers, a scripted backend and the
writer driven by it, a tiny random Llama, and the interrupted wait for a model server.

Imported by test modules as ``llm.story_doubles`` (``tests`` is on the path).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

STORY = (
    "Ada kept the lighthouse on the cliff. One night she saw a whale stranded in the bay. "
    "She rowed out at dawn and sang to it. The tide rose and the whale swam free. "
    "Every spring the whale came back to visit."
)
CAST = {
    "title": "The Keeper and the Whale",
    "logline": "A lighthouse keeper helps a stranded whale back to sea.",
    "characters": [
        {"name": "Ada", "appearance": "a young woman with red hair and a yellow raincoat"},
        {"name": "Moby", "appearance": "a huge blue whale with a white scar"},
    ],
}


def shot(characters: Sequence[str] = ("Ada",), **changes: Any) -> dict[str, Any]:
    """A valid shot answer, with ``changes``."""
    data = {
        "characters": list(characters),
        "setting": "on a rocky beach at dawn",
        "action": "Ada rows a small boat toward the whale",
        "camera": "wide shot",
    }
    data.update(changes)
    return data


def answers_for(scene_count: int, story: str = STORY, cast: dict | None = None) -> list[str]:
    """A model's answers to one storyboard: the story, the cast, one shot per scene."""
    return [
        story,
        json.dumps(cast or CAST),
        *(json.dumps(shot()) for _ in range(scene_count)),
    ]


@dataclass
class Call:
    """One backend call a :class:`ScriptedBackend` answered."""

    kind: str  # "text" or "json"
    messages: list[dict[str, str]]
    schema: dict[str, Any] | None
    max_new_tokens: int
    seed: int


class ScriptedBackend:
    """A backend that answers from a list, in order, and records every call."""

    name = "scripted"

    def __init__(self, answers: Sequence[str] = (), constrains_json: bool = True) -> None:
        self.answers = list(answers)
        self.calls: list[Call] = []
        self.constrains_json = constrains_json

    def load(self) -> None:
        pass

    def _next(self, call: Call) -> str:
        self.calls.append(call)
        if not self.answers:
            raise AssertionError(f"the script has no answer left for call {len(self.calls)}")
        return self.answers.pop(0)

    def generate_text(self, messages, max_new_tokens, seed) -> str:
        return self._next(Call("text", [dict(m) for m in messages], None, max_new_tokens, seed))

    def generate_json(self, messages, schema, max_new_tokens, seed) -> str:
        return self._next(Call("json", [dict(m) for m in messages], schema, max_new_tokens, seed))

    def interrupt(self) -> None:
        pass

    def close(self) -> None:
        pass


def write_board(
    settings, answers, scene_count=2, style="", prompt="a whale story", **backend_args
) -> tuple[Any, ScriptedBackend]:
    """The storyboard a StoryboardWriter writes with a :class:`ScriptedBackend` answering
    ``answers`` (every one of them used), and the backend with its calls."""
    from storyreel_llm.writer import StoryboardWriter

    backend = ScriptedBackend(answers, **backend_args)
    board = StoryboardWriter(backend, settings).write(prompt, scene_count, style, seed=41)
    assert not backend.answers, f"unused answers: {backend.answers}"
    return board, backend


def tiny_llama(vocab_size: int, **config: Any):
    """A Llama of random weights, one layer of width 16, with ``config`` added: a stand-in
    for SmolLM2 where only the model's files and shapes matter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            **config,
        )
    )


def interrupted_load(backend, double) -> BaseException:
    """What ``backend.load()`` raises when ``backend.interrupt()`` comes while it waits for
    ``double`` (a model-server double answering 503 to every readiness check) to be ready.

    Joined with a hang guard of 10 s: the backend's settings should poll far less often,
    so that only the interrupt can end the wait in time.
    """
    double.health_statuses[:] = [503] * 100_000
    failures: list[BaseException] = []

    def load() -> None:
        try:
            backend.load()
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=load)
    thread.start()
    while double.health_checks == 0:
        time.sleep(0.01)
    backend.interrupt()
    thread.join(timeout=10)
    assert not thread.is_alive()
    return failures[0]
