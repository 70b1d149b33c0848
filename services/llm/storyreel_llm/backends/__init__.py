"""Model backends of the LLM service.

Only :mod:`.local` needs torch and transformers, and it imports them when it
loads, so the tgi and openai images run without them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from storyreel_llm.backends.base import Backend, ChatMessage, fold_system

if TYPE_CHECKING:
    from storyreel_llm.settings import LLMSettings

__all__ = ["Backend", "ChatMessage", "create_backend", "fold_system"]


def create_backend(settings: LLMSettings) -> Backend:
    """The backend ``settings.backend`` names, not loaded yet."""
    if settings.backend == "tgi":
        from storyreel_llm.backends.tgi import TGIBackend

        return TGIBackend(settings)
    if settings.backend == "openai":
        from storyreel_llm.backends.openai import OpenAIBackend

        return OpenAIBackend(settings)
    from storyreel_llm.backends.local import LocalBackend

    return LocalBackend(settings)
