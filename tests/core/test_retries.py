"""The one backoff rule (storyreel.retries.RetryPolicy) both retry loops follow."""

from __future__ import annotations

from storyreel.retries import RetryPolicy


def test_waits_double_from_the_first_up_to_the_most():
    policy = RetryPolicy(initial_s=0.5, max_backoff_s=3.0)
    assert [policy.wait_before(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert policy.wait_before(10_000) == 3.0  # no overflow on a long run


def test_a_count_of_retries_gives_up_after_the_last():
    policy = RetryPolicy(initial_s=1.0, max_backoff_s=20.0, retries=2)
    assert [policy.wait_before(n) for n in (1, 2, 3)] == [1.0, 2.0, None]
    assert RetryPolicy(retries=0).wait_before(1) is None


def test_a_time_bound_gives_up_when_the_next_wait_would_end_past_it():
    policy = RetryPolicy(initial_s=1.0, max_backoff_s=8.0, give_up_after_s=10.0)
    assert policy.wait_before(2, elapsed_s=7.0) == 2.0  # ends at 9 s
    assert policy.wait_before(3, elapsed_s=7.0) is None  # would end at 11 s
    assert RetryPolicy(give_up_after_s=0.0).wait_before(1) is None


def test_no_bound_retries_for_ever_and_a_zero_backoff_does_not_wait():
    assert RetryPolicy().wait_before(1_000_000) == RetryPolicy().max_backoff_s
    assert RetryPolicy(initial_s=0.0, retries=3).wait_before(3) == 0.0
