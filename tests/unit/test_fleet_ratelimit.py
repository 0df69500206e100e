from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.fleet.ratelimit import RateLimiter, SlidingWindowBudget, WindowLimits


def test_request_cap_slides() -> None:
    b = SlidingWindowBudget(WindowLimits(10.0, max_requests=2))
    assert b.allows(0.0, 1)
    b.admit(0.0, 1)
    b.admit(1.0, 1)
    assert not b.allows(5.0, 1)
    assert b.next_allowed_at(5.0, 1) > 10.0
    assert b.allows(10.0, 1)  # the entry at t=0 left the window (10, 20]
    assert b.used(10.0) == (1, 1)


def test_token_cap_and_next_allowed() -> None:
    b = SlidingWindowBudget(WindowLimits(60.0, max_tokens=100))
    b.admit(0.0, 60)
    b.admit(30.0, 30)
    assert b.allows(31.0, 10)
    assert not b.allows(31.0, 11)
    assert b.remaining_fraction(31.0) == pytest.approx(0.1)
    at = b.next_allowed_at(31.0, 50)
    assert 60.0 < at < 60.001  # the 60-token entry must expire
    assert b.allows(at, 50)


def test_oversized_request_gets_an_empty_window() -> None:
    b = SlidingWindowBudget(WindowLimits(60.0, max_tokens=100))
    assert b.allows(0.0, 500)
    b.admit(0.0, 500)
    assert not b.allows(1.0, 1)


def test_refund_removes_the_matching_admission() -> None:
    b = SlidingWindowBudget(WindowLimits(60.0, max_requests=1))
    b.admit(0.0, 42)
    assert not b.allows(1.0, 1)
    b.refund(1.0, 42)
    assert b.allows(1.0, 1)


def test_limiter_per_device_limits() -> None:
    lim = RateLimiter(WindowLimits(60.0, max_requests=1), {"big": WindowLimits(60.0, 3)})
    for _ in range(3):
        assert lim.allows("big", 0.0, 1)
        lim.admit("big", 0.0, 1)
    assert not lim.allows("big", 0.0, 1)
    lim.admit("small", 0.0, 1)
    assert not lim.allows("small", 0.0, 1)


def test_bad_limits() -> None:
    with pytest.raises(ValueError):
        WindowLimits(0.0)
    with pytest.raises(ValueError):
        WindowLimits(1.0, max_requests=0)


@given(st.lists(st.tuples(st.floats(0, 5), st.integers(1, 50)), max_size=60))
def test_never_exceeds_budget_within_any_window(steps: list[tuple[float, int]]) -> None:
    limits = WindowLimits(10.0, max_requests=5, max_tokens=120)
    b = SlidingWindowBudget(limits)
    t = 0.0
    admitted: list[tuple[float, int]] = []
    for dt, tokens in steps:
        t += dt
        if b.allows(t, tokens):
            b.admit(t, tokens)
            admitted.append((t, tokens))
        inside = [(s, n) for s, n in admitted if s > t - limits.window_s]
        assert len(inside) <= 5
        assert sum(n for _, n in inside) <= 120 or len(inside) == 1
