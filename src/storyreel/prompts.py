"""The rule every service applies to a caller's story prompt, written once.

A prompt is data for a language model, never instructions: chat-template
control tokens (``<|system|>``, ``</s>``, ``<|im_start|>``, ``[INST]``,
``<<SYS>>``, Gemma's turns) are stripped from it, so it cannot end the user's
turn and forge a system turn. What is left must still say something. The
LLM service applies this before any model work, and the gateway applies the
same function at CreateVideo, so a prompt the LLM service would refuse is
refused before a job exists.
"""

from __future__ import annotations

import re

from storyreel.errors import InvalidInput

# Chat-template control tokens of the common formats (zephyr and ChatML <|...|>,
# Llama's [INST] and <<SYS>>, Gemma's turns, </s>): in a caller's text they could
# end the user's turn and start a forged system turn.
CONTROL_TOKENS = re.compile(
    r"<\|[^|<>\s]{1,32}\|>|</?s>|\[/?INST\]|<</?SYS>>|<(?:start|end)_of_turn>",
    re.IGNORECASE,
)


def neutralize(text: str) -> str:
    """``text`` without chat-template control tokens, whitespace runs collapsed."""
    return " ".join(CONTROL_TOKENS.sub(" ", text).split())


def check_prompt(prompt: str, field: str = "prompt") -> str:
    """``prompt`` without surrounding whitespace; InvalidInput if nothing usable is left.

    Refused: an empty (or all-whitespace) prompt, and one made only of
    chat-template control tokens and whitespace. Length limits are each
    service's own setting and are checked by the caller.
    """
    stripped = prompt.strip()
    if not stripped:
        raise InvalidInput(f"{field} must not be empty")
    if not neutralize(stripped):
        raise InvalidInput(f"{field} must contain text, not only chat-template markup")
    return stripped
