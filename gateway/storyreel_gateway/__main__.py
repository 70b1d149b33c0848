"""python -m storyreel_gateway [serve | migrate | import-manifests].

``serve`` (the default) serves the public StoryReelService. ``migrate`` brings
the database schema up to date and exits (the gateway also does it at start).
``import-manifests`` moves jobs that earlier versions kept as manifests in the
artifact store into the database; it can run any number of times.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from storyreel.logs import configure_logging
from storyreel.serving import serve
from storyreel_gateway.settings import GatewaySettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m storyreel_gateway")
    parser.add_argument(
        "command", nargs="?", default="serve", choices=("serve", "migrate", "import-manifests")
    )
    command = parser.parse_args(argv).command
    settings = GatewaySettings()
    configure_logging("gateway", settings.log_level)
    if command == "migrate":
        return asyncio.run(_migrate(settings))
    if command == "import-manifests":
        return asyncio.run(_import(settings))
    from storyreel_gateway.service import GatewayService

    async def run() -> int:
        # The service opens its upstream channels, which belong to the running event loop.
        return await serve(settings, GatewayService(settings))

    return asyncio.run(run())


def _database(settings: GatewaySettings):
    from storyreel_gateway.db import Database, default_url

    return Database(settings.database_url or default_url(), settings.database_pool_size)


async def _migrate(settings: GatewaySettings) -> int:
    from storyreel_gateway.db import describe

    database = _database(settings)
    try:
        await database.migrate()
    finally:
        await database.close()
    print(f"database {describe(str(database.url))} is up to date")
    return 0


async def _import(settings: GatewaySettings) -> int:
    from storyreel.settings import StorageSettings
    from storyreel.storage import open_store
    from storyreel_gateway.imports import import_manifests
    from storyreel_gateway.store import JobStore

    database = _database(settings)
    try:
        await database.migrate()
        report = await import_manifests(open_store(StorageSettings()), JobStore(database))
    finally:
        await database.close()
    print(
        f"imported {len(report.imported)} jobs; {len(report.already_there)} were there already; "
        f"{len(report.unreadable)} manifests could not be read"
    )
    for key in report.unreadable:
        print(f"  unreadable: {key}")
    return 1 if report.unreadable else 0


if __name__ == "__main__":
    sys.exit(main())
