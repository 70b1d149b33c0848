"""Run the diffusion service: ``python -m storyreel_diffusion``.

Settings come from ``STORYREEL_DIFFUSION_*`` (see
:class:`~storyreel_diffusion.settings.DiffusionSettings`) and storage from
``STORYREEL_STORAGE_*``.
"""

from __future__ import annotations

import asyncio
import sys

from storyreel.logs import configure_logging
from storyreel.settings import StorageSettings
from storyreel_diffusion.settings import DiffusionSettings


def main() -> int:
    """Serve until SIGTERM or SIGINT; returns the exit code."""
    settings = DiffusionSettings()
    configure_logging("diffusion", settings.log_level)

    # Heavy imports (torch, diffusers) only after logging is set up.
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from storyreel.serving import serve
    from storyreel.storage import open_store
    from storyreel_diffusion.service import DiffusionService

    # Both libraries log through handlers of their own; send their records to
    # the root logger instead, so every line on stderr is one JSON object.
    for library in (diffusers_logging, transformers_logging):
        library.disable_default_handler()
        library.enable_propagation()

    service = DiffusionService(settings, open_store(StorageSettings()))
    return asyncio.run(serve(settings, service))


if __name__ == "__main__":
    sys.exit(main())
