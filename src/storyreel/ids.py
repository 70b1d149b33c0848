"""Job ids and the object keys derived from them.

Object keys are built only from ids storyreel generated or validated here,
never from free user text, so no request can reach outside its job's folder.
"""

from __future__ import annotations

import re
import uuid

from storyreel.errors import InvalidInput

_JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


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


def job_key(job_id: str, *parts: str) -> str:
    """Object key under the job's folder: ``jobs/<job_id>/<parts...>``."""
    return "/".join(("jobs", check_job_id(job_id), *parts))
