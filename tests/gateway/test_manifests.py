"""Manifest writes of one job land in the order they were made.

Each write runs in a thread; without ordering, a slow write of an older state
could land after the final one, and the next gateway would resume a job that
had ended (a cancelled job coming back).
"""

from __future__ import annotations

import asyncio
import threading
import time

from storyreel_gateway.index import JobIndex
from storyreel_gateway.jobs import JobRecord, JobSpec, JobState, JobStore

from storyreel.storage import FileStore


class SlowFirstManifestWrite(FileStore):
    """A real file store whose first manifest write is slow (a stalled upload)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._first = threading.Event()

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream"):
        if key.endswith("manifest.json") and not self._first.is_set():
            self._first.set()
            time.sleep(0.5)
        return super().put_bytes(key, data, content_type)


def _record() -> JobRecord:
    spec = JobSpec(prompt="a fox", scene_count=1, seed=1, width=128, height=96, fps=8)
    return JobRecord(job_id="0123456789abcdef0123456789abcdef", spec=spec)


async def test_the_last_manifest_write_wins_even_when_an_earlier_one_is_slow(tmp_path):
    store = SlowFirstManifestWrite(tmp_path)
    jobs = JobStore(store, JobIndex(store))
    record = _record()
    record.state = JobState.RUNNING
    first = asyncio.create_task(jobs.persist(record.model_copy(deep=True)))
    await asyncio.sleep(0.05)  # the slow write is under way
    record.state = JobState.CANCELLED
    await jobs.persist(record)
    await first
    assert (await jobs.read(record.job_id)).state is JobState.CANCELLED


async def test_a_cancelled_write_still_lands_before_the_next_one(tmp_path):
    store = SlowFirstManifestWrite(tmp_path)
    jobs = JobStore(store, JobIndex(store))
    record = _record()
    record.state = JobState.RUNNING
    first = asyncio.create_task(jobs.persist(record.model_copy(deep=True)))
    await asyncio.sleep(0.05)
    first.cancel()  # the job's task is cancelled mid-write; the upload itself goes on
    record.state = JobState.CANCELLED
    await jobs.persist(record)
    await asyncio.sleep(0.7)  # long enough for the stalled upload to have landed too
    assert (await jobs.read(record.job_id)).state is JobState.CANCELLED
