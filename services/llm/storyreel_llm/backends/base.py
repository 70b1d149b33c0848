"""What the storyboard writer needs from a model: JSON text constrained by a schema."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Protocol, TypedDict


class ChatMessage(TypedDict):
    """One turn of a chat, in the shape chat templates take."""

    role: Literal["system", "user", "assistant"]
    content: str


class Backend(Protocol):
    """A model that answers a chat with JSON matching a schema.

    Methods block; callers run them off the event loop, one at a time.
    """

    #: Short name for logs ("local", "tgi").
    name: str

    def load(self) -> None:
        """Load the model or wait for the model server; raise if it cannot serve."""

    def generate_json(
        self,
        messages: Sequence[ChatMessage],
        schema: dict[str, Any],
        max_new_tokens: int,
        seed: int,
    ) -> str:
        """The model's answer to ``messages``, decoded under ``schema``.

        The text is meant to parse as JSON but may not (e.g. cut off at
        ``max_new_tokens``); the caller validates it. Raises
        :class:`~storyreel.errors.UpstreamFailed` when the model cannot answer.
        """
        ...

    def close(self) -> None:
        """Release the model and connections."""
