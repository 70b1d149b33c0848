"""The LLM service's code in the caller's process, without the service.

What the ``storyreel`` command line runs itself: ``storyreel storyboard --local``
(:func:`local_writer`, configured by the same ``STORYREEL_LLM_*`` settings as the
service) and ``storyreel parse-storyboard``
(:func:`~storyreel_llm.freeform.parse_storyboard`). The command line finds this
module through the ``storyreel.local`` entry point this package declares (its
pyproject.toml): the shared core imports no service package. ``pip install
'storyreel[llm]'`` installs it.
"""

from __future__ import annotations

from storyreel_llm.backends import Backend, create_backend
from storyreel_llm.freeform import UnusableAnswer, parse_storyboard
from storyreel_llm.settings import LLMSettings
from storyreel_llm.writer import StoryboardWriter

__all__ = ["UnusableAnswer", "local_writer", "parse_storyboard"]


def local_writer() -> tuple[Backend, StoryboardWriter]:
    """The backend the ``STORYREEL_LLM_*`` settings name (not loaded yet) and a writer over it."""
    settings = LLMSettings()
    backend = create_backend(settings)
    return backend, StoryboardWriter(backend, settings)
