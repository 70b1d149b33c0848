"""Retries of model-server requests on transient failures, cancellable at shutdown."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

from storyreel.errors import Overloaded, UpstreamFailed

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


class RetryPolicy:
    """``retries`` more attempts after the first, waiting ``backoff_s``, then twice that..."""

    def __init__(
        self,
        retries: int,
        backoff_s: float,
        max_backoff_s: float,
        stop: threading.Event,
    ) -> None:
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.stop = stop

    def run(self, attempt: Callable[[], T], what: str) -> T:
        """``attempt()`` until it succeeds, raises a non-transient error, or retries run out."""
        delay = self.backoff_s
        for number in range(self.retries + 1):
            try:
                return attempt()
            except Transient as exc:
                last = exc
                if number == self.retries:
                    break
                wait = delay if exc.retry_after_s is None else exc.retry_after_s
                wait = min(wait, self.max_backoff_s)
                log.info(
                    "retrying",
                    extra={
                        "what": what,
                        "problem": exc.message,
                        "attempt": number + 1,
                        "wait_s": wait,
                    },
                )
                if self.stop.wait(wait):
                    raise UpstreamFailed(f"{what}: stopped while retrying ({exc.message})") from exc
                delay = min(delay * 2, self.max_backoff_s) if delay else 0.0
        attempts = self.retries + 1
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
    import time

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
