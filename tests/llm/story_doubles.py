"""Canned model answers and a scripted backend for the LLM service tests.

Imported by test modules as ``llm.story_doubles`` (``tests`` is on the path).
"""

from __future__ import annotations

import json
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
