"""What the storyboard writer needs from a model: prose, and JSON under a schema."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Protocol, TypedDict


class ChatMessage(TypedDict):
    """One turn of a chat, in the shape chat templates take."""

    role: Literal["system", "user", "assistant"]
    content: str


class Backend(Protocol):
    """A model that answers a chat, freely or under a JSON schema.

    Methods block; callers run them off the event loop, one at a time, except
    :meth:`interrupt`, which any thread may call.
    """

    #: Short name for logs and errors ("local", "tgi", "openai").
    name: str
    #: False when :meth:`generate_json` cannot constrain decoding (the answer may be
    #: any text, and goes through the tolerant parser).
    constrains_json: bool

    def load(self) -> None:
        """Load the model or wait for the model server; raise if it cannot serve."""

    def generate_text(self, messages: Sequence[ChatMessage], max_new_tokens: int, seed: int) -> str:
        """The model's free-text answer to ``messages``.

        Raises :class:`~storyreel.errors.UpstreamFailed` (or ``Overloaded``) when
        the model cannot answer.
        """
        ...

    def generate_json(
        self,
        messages: Sequence[ChatMessage],
        schema: dict[str, Any],
        max_new_tokens: int,
        seed: int,
    ) -> str:
        """The model's answer to ``messages``, decoded under ``schema`` where it can be.

        The text is meant to parse as JSON but may not (e.g. cut off at
        ``max_new_tokens``); the caller validates it.
        """
        ...

    def interrupt(self) -> None:
        """Make a blocking :meth:`load` or wait between retries return at once (shutdown)."""

    def close(self) -> None:
        """Release the model and connections."""


def fold_system(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    """``messages`` with each system turn's text put at the head of the next user turn.

    For chat formats without a system role: Gemma's and Mistral's first templates
    refuse one, and llama-cpp-python's ``gemma`` chat format silently drops it.
    """
    out: list[ChatMessage] = []
    pending: list[str] = []
    for message in messages:
        if message["role"] == "system":
            pending.append(message["content"])
        elif message["role"] == "user" and pending:
            content = "\n\n".join([*pending, message["content"]])
            out.append({"role": "user", "content": content})
            pending = []
        else:
            out.append({"role": message["role"], "content": message["content"]})
    if pending:
        out.insert(0, {"role": "user", "content": "\n\n".join(pending)})
    return out
