"""When a failed call is tried again: one backoff rule for every retry in storyreel.

Two loops retry calls, each where it can see what failed, and both follow a
:class:`RetryPolicy`:

* the gateway retries a stage (a call to the LLM, diffusion or composer service)
  that failed with a transient status, bounded by time
  (:meth:`storyreel_gateway.pipeline.JobPipeline.run`; settings
  ``STORYREEL_GATEWAY_RETRY_*``). The gateway's channels have no retry policy of
  their own (:mod:`storyreel.channels`), so a stage is retried in that one place;
* the LLM service retries a request to its model server (TGI, an OpenAI-compatible
  server) that failed with 429, 502, 503, 504 or a dropped connection, bounded by
  a number of retries (:func:`storyreel_llm.backends.retry.call_with_retries`;
  settings ``STORYREEL_LLM_RETRIES`` and ``STORYREEL_LLM_RETRY_*``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff between attempts, and when to give up.

    The first retry waits ``initial_s``, each later one twice the wait before it,
    never more than ``max_backoff_s``. The caller gives up once ``retries``
    retries have failed (None: no limit on the count), or when the next wait
    would end more than ``give_up_after_s`` after the first attempt began (None:
    no limit in time).
    """

    initial_s: float = 0.5
    max_backoff_s: float = 8.0
    give_up_after_s: float | None = None
    retries: int | None = None

    def wait_before(self, retry: int, elapsed_s: float = 0.0) -> float | None:
        """Seconds to wait before retry number ``retry`` (1 for the first), or None: give up.

        ``elapsed_s`` is the time since the first attempt began.
        """
        if self.retries is not None and retry > self.retries:
            return None
        # The exponent is capped: past 2**64 the wait is max_backoff_s anyway.
        wait = min(self.initial_s * 2.0 ** min(retry - 1, 64), self.max_backoff_s)
        if self.give_up_after_s is not None and elapsed_s + wait > self.give_up_after_s:
            return None
        return wait
