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

# Matched with fullmatch: "$" alone would also accept a trailing newline.
_JOB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_REVISION_FOLDER_RE = re.compile(r"r[0-9]+")

#: How much of a caller's value an error message or a log line shows.
SHOWN_CHARS = 64

#: Largest revision a key may carry (revisions travel as uint32; 2**31 and above are refused).
MAX_REVISION = 2**31 - 1


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` for a message, cut after ``limit`` characters of a long string.

    Every value a caller sent is echoed (in an error or a log line) through this, so a
    request of any size gives a message of bounded size.
    """
    if isinstance(value, str | bytes) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    try:
        text = repr(value)
    except ValueError:  # an int too long to print
        return f"a {type(value).__name__} too long to show"
    return text if len(text) <= 2 * limit else f"{text[: 2 * limit]}..."


def new_job_id() -> str:
    return uuid.uuid4().hex


def is_job_id(value: object) -> bool:
    """Whether ``value`` has the shape of a job id (without raising)."""
    return isinstance(value, str) and _JOB_ID_RE.fullmatch(value) is not None


def check_job_id(job_id: str) -> str:
    """Return ``job_id`` if it is usable in object keys, else raise InvalidInput."""
    if not isinstance(job_id, str) or not _JOB_ID_RE.fullmatch(job_id):
        raise InvalidInput(
            "job_id must be 1-64 characters of letters, digits, '-' or '_', "
            f"starting with a letter or digit (got {shown(job_id)})"
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
        raise InvalidInput(
            f"revision must be a whole number from 0 to 2**31-1, got {shown(revision)}"
        )
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
    if parts and _REVISION_FOLDER_RE.fullmatch(parts[0]):
        raise ValueError(f"{shown(parts[0])} is reserved for revision folders; pass revision=")
    revision_folder = (f"r{revision}",) if revision else ()
    return "/".join(("jobs", job_id, *revision_folder, *parts))
