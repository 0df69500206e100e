"""Admission parts: sliding-window rate limit, idempotency cache, reconnect backoff."""

from __future__ import annotations

import pytest

from agent.admission import IdempotencyCache, SlidingWindowRateLimiter
from agent.mqtt import ReconnectBackoff


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_rate_limit_sliding_window() -> None:
    clock = Clock()
    rl = SlidingWindowRateLimiter(3, 10.0, clock=clock)
    assert [rl.allow("a")[0] for _ in range(3)] == [True, True, True]
    ok, retry = rl.allow("a")
    assert not ok and retry == pytest.approx(10.0)
    assert rl.allow("b")[0]  # per client
    clock.t += 5
    assert not rl.allow("a")[0]
    clock.t += 5.01
    assert rl.allow("a")[0]


def test_rate_limit_disabled_and_bounded_keys() -> None:
    assert all(SlidingWindowRateLimiter(0, 1.0).allow("x")[0] for _ in range(1000))
    rl = SlidingWindowRateLimiter(1, 60.0, max_keys=10)
    for i in range(100):
        assert rl.allow(f"c{i}")[0]
    assert len(rl._log) == 10


def test_idempotency_new_pending_done() -> None:
    cache = IdempotencyCache(ttl_s=60, clock=Clock())
    assert cache.claim("r1", "reply-a") == (IdempotencyCache.NEW, None)
    assert cache.claim("r1", "reply-b") == (IdempotencyCache.PENDING, None)
    assert cache.claim("r1", "reply-c") == (IdempotencyCache.PENDING, None)
    assert cache.complete("r1", b"final") == ["reply-b", "reply-c"]
    assert cache.claim("r1", "reply-d") == (IdempotencyCache.DONE, b"final")


def test_idempotency_forget_lets_a_retry_run() -> None:
    cache = IdempotencyCache()
    cache.claim("r1", "a")
    cache.claim("r1", "b")
    assert cache.forget("r1") == ["b"]
    assert cache.claim("r1", "c")[0] == IdempotencyCache.NEW


def test_idempotency_ttl_and_bound() -> None:
    clock = Clock()
    cache = IdempotencyCache(ttl_s=10, max_entries=3, clock=clock)
    cache.claim("a", None)
    cache.complete("a", b"x")
    clock.t += 11
    assert cache.claim("a", None)[0] == IdempotencyCache.NEW
    for i in range(10):
        cache.claim(f"k{i}", None)
    assert len(cache) <= 3


def test_backoff_is_capped_exponential_with_jitter() -> None:
    b = ReconnectBackoff(1.0, 30.0, rand=lambda lo, hi: hi)  # upper edge of the jitter
    assert [b.next_delay() for _ in range(7)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    b.reset()
    assert b.next_delay() == 1.0
    low = ReconnectBackoff(1.0, 30.0, rand=lambda lo, hi: lo)
    assert {low.next_delay() for _ in range(5)} == {1.0}


def test_backoff_real_jitter_spreads_and_never_exceeds_cap() -> None:
    b = ReconnectBackoff(0.5, 8.0)
    delays = [b.next_delay() for _ in range(200)]
    assert max(delays) <= 8.0 and min(delays) >= 0.5
    assert len({round(d, 3) for d in delays[10:]}) > 50  # not lockstep


def test_backoff_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError):
        ReconnectBackoff(5.0, 1.0)
