"""Moving jobs that earlier versions kept as manifests in the artifact store into the database.

Earlier gateways wrote each job to ``jobs/<id>/manifest.json`` and read it back
as the job's state. :func:`import_manifests` reads every such manifest and
inserts the job it describes, unless the database has it already, so the
import can run any number of times. A job that was unfinished is queued, and
a replica resumes it where its manifest says it was. A manifest that cannot
be read is reported by key and skipped: without it nobody knows whose job it
was.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from pydantic import ValidationError

from storyreel.errors import StoryreelError
from storyreel.storage import ArtifactStore
from storyreel_gateway.jobs import JobRecord
from storyreel_gateway.store import JobStore

log = logging.getLogger(__name__)


@dataclass
class ImportReport:
    imported: list[str] = field(default_factory=list)
    already_there: list[str] = field(default_factory=list)
    # Manifest keys that could not be read.
    unreadable: list[str] = field(default_factory=list)


async def import_manifests(store: ArtifactStore, jobs: JobStore) -> ImportReport:
    report = ImportReport()
    uris = await asyncio.to_thread(lambda: list(store.list("jobs/")))
    for uri in uris:
        key = store.key_of(uri)
        parts = key.split("/")
        if len(parts) != 3 or parts[2] != "manifest.json":
            continue
        try:
            data = await asyncio.to_thread(store.get_bytes, uri)
            record = JobRecord.model_validate_json(data)
            if record.job_id != parts[1]:
                raise ValueError("the manifest names another job")
        except (ValidationError, ValueError, StoryreelError) as exc:
            log.error("unreadable manifest", extra={"key": key, "error": type(exc).__name__})
            report.unreadable.append(key)
            continue
        if await jobs.import_record(record):
            report.imported.append(record.job_id)
        else:
            report.already_there.append(record.job_id)
    return report
