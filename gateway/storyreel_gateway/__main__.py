"""python -m storyreel_gateway: serve the public StoryReelService."""

from __future__ import annotations

import asyncio
import sys

from storyreel.logs import configure_logging
from storyreel.serving import serve
from storyreel_gateway.settings import GatewaySettings


def main() -> int:
    settings = GatewaySettings()
    configure_logging("gateway", settings.log_level)
    from storyreel_gateway.service import GatewayService

    async def run() -> int:
        # The service opens its upstream channels, which belong to the running event loop.
        return await serve(settings, GatewayService(settings))

    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
