"""Job ids and the object keys derived from them.

Object keys are built only from ids storyreel generated or validated here,
never from free user text, so no request can reach outside its job's folder.
Each run of a job (its revision) has a folder of its own, so a later run never
overwrites what an earlier one stored.
"""

from __future__ import annotations

import re
import uuid

from storyreel.errors import InvalidInput

_JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_REVISION_FOLDER_RE = re.compile(r"^r[0-9]+$")

#: Largest revision a key may carry (revisions travel as uint32; 2**31 and above are refused).
MAX_REVISION = 2**31 - 1


def new_job_id() -> str:
    return uuid.uuid4().hex


def check_job_id(job_id: str) -> str:
    """Return ``job_id`` if it is usable in object keys, else raise InvalidInput."""
    if not isinstance(job_id, str) or not _JOB_ID_RE.match(job_id):
        raise InvalidInput(
            "job_id must be 1-64 characters of letters, digits, '-' or '_', "
            f"starting with a letter or digit (got {job_id!r})"
        )
    return job_id


def check_revision(revision: int) -> int:
    """Return ``revision`` if it names a run of a job, else raise InvalidInput.

    A revision is an int (not a bool) from 0 to :data:`MAX_REVISION` (``2**31 - 1``).
    """
    if (
        isinstance(revision, bool)
        or not isinstance(revision, int)
        or not 0 <= revision <= MAX_REVISION
    ):
        raise InvalidInput(f"revision must be a whole number from 0 to 2**31-1, got {revision!r}")
    return revision


def job_key(job_id: str, *parts: str, revision: int = 0) -> str:
    """Object key under the folder of the job's run ``revision``.

    The one rule for every object a job stores: revision 0 (the first run) keeps the
    job's own folder, ``jobs/<job_id>/<parts...>``; revision N > 0 puts the same parts
    under ``jobs/<job_id>/r<N>/<parts...>``, so each run writes new keys and the
    objects of earlier runs stay readable. Raises InvalidInput for a bad ``job_id``
    or a ``revision`` outside :func:`check_revision`'s range; ``parts`` may not start
    with an ``r<digits>`` folder, which would alias another revision's keys.
    """
    check_job_id(job_id)
    check_revision(revision)
    if parts and _REVISION_FOLDER_RE.match(parts[0]):
        raise ValueError(f"{parts[0]!r} is reserved for revision folders; pass revision=")
    revision_folder = (f"r{revision}",) if revision else ()
    return "/".join(("jobs", job_id, *revision_folder, *parts))
