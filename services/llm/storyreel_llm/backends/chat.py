"""What a model's chat template takes, found by rendering it before the first request.

Templates differ in ways that break a request only when it is sent: Gemma 2's and
Mistral's first templates refuse a system turn ("System role not supported"),
Gemma 3's folds it into the first user turn, and most refuse two user turns in a
row. Some end an assistant turn with a token the model's configuration does not
list as a stop token (Gemma's ``<end_of_turn>``, Llama 3's ``<|eot_id|>``), so
generation would run on past the answer. :func:`inspect_chat_template` renders
a few small conversations with the template itself and reports what it found;
:class:`ChatFormat` then renders every request the way the template takes it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from storyreel_llm.backends.base import ChatMessage, fold_system

#: ``render(messages, add_generation_prompt)``: the template applied to a conversation.
Render = Callable[[list[dict[str, str]], bool], str]

_SYSTEM = "Sys-7f3a: answer briefly."
_USER = "Usr-51c2: hello?"
_ASSISTANT = "Asst-9d0e: hello."


class UnusableTemplate(ValueError):
    """The chat template cannot render the conversations the LLM service sends."""


@dataclass(frozen=True)
class ChatFormat:
    """A chat template and what it takes: a system turn or not, and how a turn ends."""

    render_fn: Render
    #: False: the template refuses or drops a system turn; its text goes to the first user turn.
    takes_system: bool
    #: What the template writes right after an assistant's answer ("<end_of_turn>\n", "</s>").
    turn_end: str

    def render(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True) -> str:
        """``messages`` as the model reads them, ending where the assistant's answer starts."""
        turns = list(messages) if self.takes_system else fold_system(messages)
        return self.render_fn([dict(m) for m in turns], add_generation_prompt)


def inspect_chat_template(render: Render) -> ChatFormat:
    """Render small conversations with ``render`` and report what the template takes.

    Raises :class:`UnusableTemplate` when the template cannot render a user turn,
    an answer and a second user turn (what every re-ask sends).
    """
    try:
        render([{"role": "user", "content": _USER}], True)
        answered = render(
            [
                {"role": "user", "content": _USER},
                {"role": "assistant", "content": _ASSISTANT},
            ],
            False,
        )
        render(
            [
                {"role": "user", "content": _USER},
                {"role": "assistant", "content": _ASSISTANT},
                {"role": "user", "content": _USER},
            ],
            True,
        )
    except Exception as exc:
        raise UnusableTemplate(f"the chat template cannot render a conversation: {exc}") from exc
    at = answered.rfind(_ASSISTANT)
    if at < 0:
        raise UnusableTemplate("the chat template drops the assistant's answers")
    turn_end = answered[at + len(_ASSISTANT) :]
    try:
        with_system = render(
            [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": _USER}], True
        )
        takes_system = _SYSTEM in with_system
    except Exception:
        takes_system = False
    return ChatFormat(render_fn=render, takes_system=takes_system, turn_end=turn_end)


def tokenizer_render(tokenizer: object) -> Render:
    """``render`` for a transformers tokenizer: its own ``apply_chat_template``."""

    def render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(  # type: ignore[attr-defined]
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    return render
