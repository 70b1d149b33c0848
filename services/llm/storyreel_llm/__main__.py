"""``python -m storyreel_llm``: run the LLM service until SIGTERM."""

from __future__ import annotations

import asyncio
import sys

from storyreel.logs import configure_logging
from storyreel_llm.settings import LLMSettings


def main() -> int:
    """Read settings, configure logging, then import the heavy libraries and serve."""
    settings = LLMSettings()
    configure_logging("llm", settings.log_level)
    if settings.backend == "local":
        # Imported here, after logging is set up, so a broken install fails loudly
        # at start-up rather than on the first request.
        import llguidance  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401

    from storyreel.serving import serve
    from storyreel_llm.service import LlmService

    return asyncio.run(serve(settings, LlmService(settings)))


if __name__ == "__main__":
    sys.exit(main())
