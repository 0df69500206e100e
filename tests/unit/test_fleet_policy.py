from __future__ import annotations

import random
from collections import Counter

import pytest

from agent.fleet.policy import (
    BUSY,
    NO_CAPACITY,
    NO_CONTEXT,
    NO_MODEL,
    RATE_LIMITED,
    Demand,
    DeviceState,
    FleetState,
    LoadAwarePolicy,
    jain_index,
    make_policy,
)
from agent.fleet.ratelimit import RateLimiter, WindowLimits


def fleet_of(*speeds: float, limits: WindowLimits | None = None, max_wait_s: float = 10.0
             ) -> FleetState:
    fleet = FleetState(RateLimiter(limits or WindowLimits(60.0)), max_wait_s=max_wait_s)
    for i, s in enumerate(speeds):
        fleet.add(DeviceState(f"d{i}", decode_tok_s=s, prefill_tok_s=10 * s,
                              context_tokens=512, models=frozenset({"m"})))
    return fleet


def test_jain_index() -> None:
    assert jain_index([1, 1, 1, 1]) == pytest.approx(1.0)
    assert jain_index([1, 0, 0, 0]) == pytest.approx(0.25)
    assert jain_index([]) == 1.0
    assert jain_index([0, 0]) == 1.0
    assert jain_index([2, 1]) == pytest.approx(9 / 10)


def test_static_reasons() -> None:
    fleet = fleet_of(10.0)
    policy = make_policy("random", fleet, random.Random(0))
    assert fleet.route(policy, 0.0, Demand(10, 10, model="other")).reason == NO_MODEL
    assert fleet.route(policy, 0.0, Demand(600, 10, model="m")).reason == NO_CONTEXT
    fleet.set_online("d0", False, 0.0)
    assert fleet.route(policy, 0.0, Demand(10, 10)).reason == NO_MODEL
    fleet.set_online("d0", True, 1.0)
    assert fleet.route(policy, 1.0, Demand(10, 10)).device is fleet.devices["d0"]


def test_weighted_follows_speed() -> None:
    fleet = fleet_of(10.0, 30.0, max_wait_s=1e9)
    policy = make_policy("weighted", fleet, random.Random(1))
    picks: Counter[str] = Counter()
    for _ in range(4000):
        dev = policy.select(0.0, Demand(1, 1), frozenset())
        assert dev is not None
        picks[dev.name] += 1
    assert 2.5 < picks["d1"] / picks["d0"] < 3.5


def test_random_is_uniform_and_seeded() -> None:
    def run(seed: int) -> list[str]:
        fleet = fleet_of(10.0, 30.0, 50.0, max_wait_s=1e9)
        policy = make_policy("random", fleet, random.Random(seed))
        out = []
        for _ in range(300):
            dev = policy.select(0.0, Demand(1, 1), frozenset())
            assert dev is not None
            out.append(dev.name)
        return out

    a = run(3)
    assert a == run(3)
    counts = Counter(a)
    assert all(70 < counts[n] < 130 for n in ("d0", "d1", "d2"))


def test_load_aware_prefers_idle_fast_then_spreads() -> None:
    fleet = fleet_of(10.0, 40.0, max_wait_s=1e9)
    policy = LoadAwarePolicy(fleet)
    first = fleet.route(policy, 0.0, Demand(100, 100))
    assert first.device is not None and first.device.name == "d1"  # fastest idle device
    # d1 now has a backlog of 2.75 s; three more go to d1, then d0 (11 s) finishes as soon
    names = [fleet.route(policy, 0.0, Demand(100, 100)).device.name  # type: ignore[union-attr]
             for _ in range(6)]
    assert "d0" in names and "d1" in names


def test_load_aware_skips_rate_limited_and_busy_devices() -> None:
    fleet = fleet_of(10.0, 40.0, limits=WindowLimits(60.0, max_requests=1), max_wait_s=5.0)
    policy = LoadAwarePolicy(fleet)
    a = fleet.route(policy, 0.0, Demand(10, 10))
    b = fleet.route(policy, 0.0, Demand(10, 10))
    assert {a.device.name, b.device.name} == {"d0", "d1"}  # type: ignore[union-attr]
    assert fleet.refusal(fleet.devices["d1"], 0.0, Demand(10, 10)) == RATE_LIMITED
    assert fleet.route(policy, 1.0, Demand(10, 10)).reason == NO_CAPACITY
    # after the window both are available again
    assert fleet.route(policy, 61.0, Demand(10, 10)).device is not None


def test_busy_when_backlog_exceeds_max_wait() -> None:
    fleet = fleet_of(10.0, max_wait_s=2.0)
    dev = fleet.devices["d0"]
    fleet.commit(dev, 0.0, Demand(0, 50))  # 5 s of work
    assert fleet.refusal(dev, 0.0, Demand(1, 1)) == BUSY
    assert fleet.retry_at(dev, 0.0, Demand(1, 1), BUSY) == pytest.approx(3.0)
    assert fleet.refusal(dev, 3.5, Demand(1, 1)) is None
    fleet.finish(dev, 5.0)
    assert dev.outstanding == 0 and dev.free_at == 5.0


def test_offline_device_leaves_selection_at_once() -> None:
    for name in ("random", "weighted", "load_aware"):
        fleet = fleet_of(10.0, 40.0, max_wait_s=1e9)
        policy = make_policy(name, fleet, random.Random(0), attempts=2)
        fleet.set_online("d1", False, 0.0)
        for _ in range(20):
            d = policy.select(0.0, Demand(1, 1), frozenset())
            assert d is not None and d.name == "d0"


def test_exclude_is_respected() -> None:
    for name in ("random", "weighted", "load_aware"):
        fleet = fleet_of(10.0, 40.0, max_wait_s=1e9)
        policy = make_policy(name, fleet, random.Random(0), attempts=2)
        for _ in range(10):
            d = policy.select(0.0, Demand(1, 1), frozenset({"d1"}))
            assert d is not None and d.name == "d0"


def test_unknown_policy() -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("nope", fleet_of(1.0))
