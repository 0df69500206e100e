"""Admission parts: sliding-window rate limit, idempotency cache and its on-disk store,
reconnect backoff."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.admission import IdempotencyCache, ResultStore, SlidingWindowRateLimiter
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


def test_rate_limit_reconfigure_keeps_the_log() -> None:
    clock = Clock()
    rl = SlidingWindowRateLimiter(0, 10.0, clock=clock)
    assert all(rl.allow("a")[0] for _ in range(5))  # disabled: nothing logged
    rl.reconfigure(2, 10.0)
    assert [rl.allow("a")[0] for _ in range(3)] == [True, True, False]
    rl.reconfigure(3, 10.0)  # a raised limit applies at once; the two already seen count
    assert [rl.allow("a")[0] for _ in range(2)] == [True, False]
    rl.reconfigure(0, 10.0)
    assert rl.allow("a")[0]


class WallClock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


def test_result_store_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "state" / "idempotency.sqlite3"
    store = ResultStore(path, ttl_s=60)
    store.put("r1", b'{"id":"r1","seq":7}')
    store.put("r2", b"two")
    store.put("r1", b'{"id":"r1","seq":8}')  # a second completion replaces, not duplicates
    assert len(store) == 2
    store.close()
    again = ResultStore(path, ttl_s=60)
    assert again.get("r1") == b'{"id":"r1","seq":8}'
    assert again.get("r2") == b"two"
    assert again.get("r3") is None
    assert len(again) == 2
    again.close()


def test_result_store_ttl_and_bound(tmp_path: Path) -> None:
    clock = WallClock()
    store = ResultStore(tmp_path / "i.sqlite3", ttl_s=10, max_entries=3, clock=clock)
    for rid in ("a", "b", "c"):
        store.put(rid, rid.encode())
        clock.t += 1
    store.put("d", b"d")  # over the bound: the oldest goes
    assert [store.get(r) for r in "abcd"] == [None, b"b", b"c", b"d"]
    assert len(store) == 3
    clock.t += 8.5  # b expired (written at t0+1, ttl 10), c and d not yet
    assert store.get("b") is None and store.get("c") == b"c"
    store.put("e", b"e")  # a write purges the expired rows
    assert len(store) == 3
    store.reconfigure(ttl_s=10, max_entries=1)
    store.put("f", b"f")
    assert len(store) == 1 and store.get("f") == b"f" and store.get("e") is None
    store.close()


def test_result_store_moves_a_corrupt_file_aside(tmp_path: Path) -> None:
    path = tmp_path / "idempotency.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    store = ResultStore(path)
    store.put("r", b"x")
    assert store.get("r") == b"x"
    assert list(tmp_path.glob("idempotency.sqlite3.corrupt-*"))
    store.close()


def test_idempotency_cache_answers_from_the_store_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "idempotency.sqlite3"
    first = IdempotencyCache(ttl_s=60, store=ResultStore(path, ttl_s=60))
    assert first.claim("r1", "reply-a") == (IdempotencyCache.NEW, None)
    assert first.claim("r2", "reply-a") == (IdempotencyCache.NEW, None)
    assert first.complete("r1", b"final-1") == []
    first.forget("r2")  # refused before running: not remembered, on disk either
    # a new process: empty memory, the same file
    second = IdempotencyCache(ttl_s=60, store=ResultStore(path, ttl_s=60))
    assert len(second) == 0
    assert second.claim("r1", "reply-b") == (IdempotencyCache.DONE, b"final-1")
    assert second.claim("r1", "reply-c") == (IdempotencyCache.DONE, b"final-1")
    assert second.claim("r2", "reply-b") == (IdempotencyCache.NEW, None)


def test_idempotency_reconfigure_applies_to_new_ids() -> None:
    clock = Clock()
    cache = IdempotencyCache(ttl_s=100, clock=clock)
    cache.claim("old", None)
    cache.complete("old", b"x")
    cache.reconfigure(ttl_s=5, max_entries=10)
    cache.claim("new", None)
    cache.complete("new", b"y")
    clock.t += 6
    assert cache.claim("new", None)[0] == IdempotencyCache.NEW
