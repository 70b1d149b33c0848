"""Run the composer service: ``python -m storyreel_composer``.

Settings come from ``STORYREEL_COMPOSER_*`` (see
:class:`~storyreel_composer.settings.ComposerSettings`) and storage from
``STORYREEL_STORAGE_*``.
"""

from __future__ import annotations

import asyncio
import sys

from storyreel.logs import configure_logging
from storyreel.settings import StorageSettings
from storyreel_composer.settings import ComposerSettings


def main() -> int:
    """Serve until SIGTERM or SIGINT; returns the exit code."""
    settings = ComposerSettings()
    configure_logging("composer", settings.log_level)

    # Heavy imports (numpy, PIL, piper) only after logging is set up.
    from storyreel.serving import serve
    from storyreel.storage import open_store
    from storyreel_composer.service import ComposerService

    service = ComposerService(settings, open_store(StorageSettings()))
    return asyncio.run(serve(settings, service))


if __name__ == "__main__":
    sys.exit(main())
