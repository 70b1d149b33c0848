"""Retries of model-server requests on transient failures, cancellable at shutdown.

The backoff is the shared :class:`storyreel.retries.RetryPolicy`, bounded here by a
number of retries (``STORYREEL_LLM_RETRIES``).
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import TypeVar

from storyreel.errors import Overloaded, UpstreamFailed
from storyreel.retries import RetryPolicy

log = logging.getLogger(__name__)

T = TypeVar("T")

#: HTTP statuses worth retrying: busy, or a proxy/gateway in front of a restarting server.
TRANSIENT_STATUSES = frozenset({429, 502, 503, 504})


class Transient(Exception):
    """A failure worth retrying: 429, 502, 503, 504, or a refused or dropped connection.

    ``overloaded`` marks the server saying it is busy (429): if retries run out the
    caller gets :class:`~storyreel.errors.Overloaded` rather than ``UpstreamFailed``.
    """

    def __init__(
        self, message: str, *, overloaded: bool = False, retry_after_s: float | None = None
    ):
        super().__init__(message)
        self.message = message
        self.overloaded = overloaded
        self.retry_after_s = retry_after_s


def call_with_retries(
    policy: RetryPolicy, attempt: Callable[[], T], what: str, stop: threading.Event
) -> T:
    """``attempt()`` until it succeeds, raises a non-transient error, or ``policy`` gives up.

    Waits as ``policy`` says (or as the server's Retry-After says, never longer than
    ``policy.max_backoff_s``); setting ``stop`` ends a wait at once with UpstreamFailed.
    When retries run out: Overloaded if the server last said it was busy (429), else
    UpstreamFailed.
    """
    started = time.monotonic()
    attempts = 0
    while True:
        attempts += 1
        try:
            return attempt()
        except Transient as exc:
            last = exc
            wait = policy.wait_before(attempts, time.monotonic() - started)
            if wait is None:
                break
            if exc.retry_after_s is not None:
                wait = min(exc.retry_after_s, policy.max_backoff_s)
            log.info(
                "retrying",
                extra={"what": what, "problem": exc.message, "attempt": attempts, "wait_s": wait},
            )
            if stop.wait(wait):
                raise UpstreamFailed(f"{what}: stopped while retrying ({exc.message})") from exc
    if last.overloaded:
        raise Overloaded(f"{last.message} (after {attempts} attempts)") from last
    raise UpstreamFailed(f"{last.message} (after {attempts} attempts)") from last


def wait_until_ready(
    check: Callable[[], str | None],
    *,
    what: str,
    timeout_s: float,
    poll_s: float,
    stop: threading.Event,
) -> None:
    """Call ``check()`` (None: ready, else the problem) until ready, ``timeout_s``, or ``stop``.

    The wait between checks ends at once when ``stop`` is set, so a service asked
    to shut down while its model server is still starting exits promptly.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if stop.is_set():
            raise UpstreamFailed(f"stopped while waiting for {what}")
        problem = check()
        if problem is None:
            return
        if time.monotonic() >= deadline:
            raise UpstreamFailed(f"{what} is not ready: {problem}")
        log.info("waiting for the model server", extra={"what": what, "problem": problem})
        if stop.wait(poll_s):
            raise UpstreamFailed(f"stopped while waiting for {what}")


def http_problem(request: urllib.request.Request | str, path: str) -> str | None:
    """GET ``request`` for :func:`wait_until_ready`: None when it answers 200, else the problem.

    ``path`` names the endpoint in the problem ("/health answered 503").
    """
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return None if response.status == 200 else f"{path} answered {response.status}"
    except urllib.error.HTTPError as exc:
        return f"{path} answered {exc.code}"
    except OSError as exc:
        return str(getattr(exc, "reason", exc))


def retry_after_s(value: str | None) -> float | None:
    """A ``Retry-After`` header's seconds (never negative); None when absent or not a number."""
    try:
        return max(float(value), 0.0) if value is not None else None
    except ValueError:
        return None
