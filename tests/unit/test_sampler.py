from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest

from agent.sampler import Sampler, Snapshot, next_deadline
from probes.base import Availability, PowerCoverage, PowerReading, Probe, ProbeError


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@dataclass(frozen=True)
class CountReadings:
    n: int
    power_mw: float | None


class CountingProbe(Probe):
    name = "counting"

    def __init__(self, root: str = "/", *, available: bool = True) -> None:
        super().__init__(root)
        self.n = 0
        self.available = available
        self.checks = 0

    def check(self) -> Availability:
        self.checks += 1
        return Availability(self.available, "" if self.available else "no such sensor")

    def sample(self) -> CountReadings:
        self.n += 1
        return CountReadings(self.n, 1000.0 * self.n)

    def power(self, readings: Any) -> list[PowerReading]:
        return [PowerReading("fake:rail", PowerCoverage.BOARD_INPUT, readings.power_mw)]


class FailingProbe(Probe):
    name = "failing"

    def __init__(self, root: str = "/") -> None:
        super().__init__(root)
        self.fail = True

    def check(self) -> Availability:
        return Availability(True)

    def sample(self) -> CountReadings:
        if self.fail:
            raise ProbeError("sensor went away")
        return CountReadings(0, None)


# -- scheduling (pure) ----------------------------------------------------------------------


def test_next_deadline_on_time() -> None:
    assert next_deadline(10.0, 10.3, 1.0) == (11.0, 0)


def test_next_deadline_exactly_on_deadline_is_not_an_overrun() -> None:
    assert next_deadline(10.0, 11.0, 1.0) == (11.0, 0)


def test_next_deadline_overrun_skips_and_counts() -> None:
    # tick at 10 took until 12.5: deadlines 11 and 12 are skipped, next is 13
    assert next_deadline(10.0, 12.5, 1.0) == (13.0, 2)
    assert next_deadline(10.0, 11.25, 0.5) == (11.5, 2)


def test_deadlines_do_not_drift() -> None:
    d = 0.0
    for _ in range(1000):
        d, skipped = next_deadline(d, d + 0.03, 0.1)  # every tick costs 30 ms
        assert skipped == 0
    assert d == pytest.approx(100.0, abs=1e-9)


# -- one tick -------------------------------------------------------------------------------


def test_sample_once_builds_snapshot() -> None:
    clock = FakeClock()
    probe = CountingProbe()
    s = Sampler([probe], interval_s=0.5, clock=clock, wall_clock=lambda: 1718000000.123)
    snap = s.sample_once()
    assert snap.ts_unix_ms == 1718000000123
    assert snap.t_mono_s == 1000.0
    assert snap.readings == {"counting": {"n": 1, "power_mw": 1000.0}}
    assert snap.power == (PowerReading("fake:rail", PowerCoverage.BOARD_INPUT, 1000.0),)
    assert snap.errors == {}
    assert snap.interval_s == 0.5
    assert s.latest() is snap


def test_probe_errors_are_isolated_and_degrade_after_n() -> None:
    good, bad = CountingProbe(), FailingProbe()
    s = Sampler([bad, good], degrade_after=3, clock=FakeClock())
    for i in range(2):
        snap = s.sample_once()
        assert snap.errors == {"failing": "ProbeError: sensor went away"}
        assert snap.readings["counting"]["n"] == i + 1
        assert not s.health()["failing"].degraded
    s.sample_once()
    h = s.health()["failing"]
    assert h.degraded and "3 consecutive" in h.reason and "sensor went away" in h.reason
    assert s.stats().probe_errors == {"failing": 3, "counting": 0}

    bad.fail = False
    snap = s.sample_once()
    assert "failing" in snap.readings and snap.errors == {}
    assert s.health()["failing"] == Availability(True)


def test_unavailable_probe_not_sampled_and_rechecked() -> None:
    clock = FakeClock()
    probe = CountingProbe(available=False)
    s = Sampler([probe], recheck_s=30.0, clock=clock)
    s.sample_once()
    assert probe.n == 0
    assert s.health()["counting"] == Availability(False, "no such sensor")
    clock.t += 10
    s.sample_once()
    assert probe.checks == 1  # not due yet
    probe.available = True
    clock.t += 30
    snap = s.sample_once()
    assert probe.checks == 2 and snap.readings["counting"]["n"] == 1


def test_check_that_raises_is_reported() -> None:
    class Raising(CountingProbe):
        def check(self) -> Availability:
            raise RuntimeError("boom")

    s = Sampler([Raising()], clock=FakeClock())
    s.sample_once()
    assert "boom" in s.health()["counting"].reason


def test_listener_exception_is_counted_not_fatal() -> None:
    seen: list[Snapshot] = []

    def bad(_: Snapshot) -> None:
        raise ValueError("listener bug")

    s = Sampler([CountingProbe()], clock=FakeClock())
    s.add_listener(bad)
    s.add_listener(seen.append)
    s.sample_once()
    s.sample_once()
    assert len(seen) == 2
    assert s.stats().listener_errors == 2
    s.remove_listener(bad)
    s.sample_once()
    assert s.stats().listener_errors == 2


def test_history_is_bounded_and_filtered() -> None:
    clock = FakeClock(0.0)
    s = Sampler([CountingProbe()], history_len=5, clock=clock)
    for i in range(8):
        clock.t = float(i)
        s.sample_once()
    assert [h.t_mono_s for h in s.history()] == [3.0, 4.0, 5.0, 6.0, 7.0]
    assert [h.t_mono_s for h in s.history(5.5)] == [6.0, 7.0]


def test_duplicate_probe_names_get_suffix() -> None:
    s = Sampler([CountingProbe(), CountingProbe()], clock=FakeClock())
    assert set(s.sample_once().readings) == {"counting", "counting#2"}


def test_fast_is_nested_and_reference_counted() -> None:
    s = Sampler([], interval_s=1.0)
    assert s.interval_s == 1.0
    with s.fast():
        assert s.interval_s == 0.1
        with s.fast(0.05):
            assert s.interval_s == 0.05
            with s.fast(0.2):
                assert s.interval_s == 0.05
        assert s.interval_s == 0.1
    assert s.interval_s == 1.0


def test_fast_restores_rate_after_exception() -> None:
    s = Sampler([], interval_s=1.0)
    with pytest.raises(RuntimeError), s.fast():
        raise RuntimeError
    assert s.interval_s == 1.0


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        Sampler([], interval_s=0)
    with pytest.raises(ValueError), Sampler([]).fast(0):
        pass


# -- the thread -----------------------------------------------------------------------------


def test_thread_samples_and_stops() -> None:
    got = threading.Event()
    snaps: list[Snapshot] = []

    def listener(snap: Snapshot) -> None:
        snaps.append(snap)
        if len(snaps) >= 3:
            got.set()

    s = Sampler([CountingProbe()], interval_s=0.01)
    s.add_listener(listener)
    s.start()
    s.start()  # idempotent
    assert got.wait(10)
    s.stop()
    assert not s.running
    n = len(snaps)
    assert [x.seq for x in snaps[:3]] == [1, 2, 3]
    assert s.stats().ticks == n


def test_fast_wakes_a_slow_sampler() -> None:
    got = threading.Event()
    s = Sampler([CountingProbe()], interval_s=3600.0)
    s.add_listener(lambda snap: got.set() if snap.seq >= 2 else None)
    s.start()
    try:
        with s.fast(0.01):
            assert got.wait(10)  # without the wake-up the second tick is an hour away
    finally:
        s.stop()
    assert s.stats().skipped_ticks == 0


@dataclass(frozen=True)
class PlainReadings:
    n: int


class PlainProbe(Probe):
    """A probe with no power source (like cpu or thermal)."""

    name = "plain"

    def __init__(self, root: str = "/") -> None:
        super().__init__(root)
        self.n = 0

    def check(self) -> Availability:
        return Availability(True)

    def sample(self) -> PlainReadings:
        self.n += 1
        return PlainReadings(self.n)


def test_fast_windows_sample_only_power_sources_at_the_high_rate() -> None:
    clock = FakeClock()
    power, plain = CountingProbe(), PlainProbe()
    s = Sampler([power, plain], interval_s=1.0, clock=clock)
    s.sample_once()
    clock.t += 1.0
    s.sample_once()  # two samples without power: "plain" is not a power source
    with s.fast(0.1):
        for _ in range(9):
            clock.t += 0.1
            snap = s.sample_once()
            assert snap.readings["plain"] == {"n": 2}  # carried forward, not re-sampled
        clock.t += 0.1
        snap = s.sample_once()
    assert power.n == 12  # every tick
    assert plain.n == 3  # once per base interval
    assert snap.readings["plain"] == {"n": 3}
    clock.t += 1.0
    s.sample_once()
    assert plain.n == 4  # outside fast windows every probe is sampled every tick


class LateRateProbe(PlainProbe):
    """Like the estimate probe: a rate, so its first sample has no power yet."""

    name = "late"

    def power(self, readings: Any) -> list[PowerReading]:
        if readings.n < 2:
            return []
        return [PowerReading("late:est", PowerCoverage.ESTIMATE, 5000.0)]


def test_a_rate_based_power_source_is_not_mistaken_for_a_plain_probe() -> None:
    clock = FakeClock()
    late = LateRateProbe()
    s = Sampler([late], interval_s=1.0, clock=clock)
    s.sample_once()
    with s.fast(0.1):
        for _ in range(5):
            clock.t += 0.1
            snap = s.sample_once()
    assert late.n == 6
    assert snap.power and snap.power[0].power_mw == 5000.0


# -- on-demand power samples ----------------------------------------------------------------


class CounterProbe(Probe):
    """An energy counter like RAPL: each sample reports the energy since the previous one."""

    name = "counter"

    def __init__(self, root: str = "/") -> None:
        super().__init__(root)
        self.total_uj = 0
        self.prev: int | None = None
        self.lock = threading.Lock()

    def check(self) -> Availability:
        return Availability(True)

    def sample(self) -> CountReadings:
        with self.lock:
            self.total_uj += 1000  # 1 mJ consumed between any two reads
            cur = self.total_uj
        delta = None if self.prev is None else cur - self.prev
        self.prev = cur
        return CountReadings(cur, None if delta is None else delta / 1000.0)

    def power(self, readings: Any) -> list[PowerReading]:
        if readings.power_mw is None:
            return []
        return [PowerReading("counter:pkg", PowerCoverage.CPU_PACKAGE, None,
                             energy_mj=readings.power_mw)]


def test_sample_power_now_needs_a_known_power_source() -> None:
    clock = FakeClock()
    s = Sampler([PlainProbe(), LateRateProbe()], clock=clock)
    assert s.sample_power_now() is None  # nothing sampled yet: no source known
    for _ in range(3):
        clock.t += 1.0
        s.sample_once()
    assert s.latest() is not None and s.latest().power  # the estimate-like source gives power
    # ...but it is a rate-based model: never sampled from a second thread
    assert s.sample_power_now() is None


def test_sample_power_now_is_partial_history_only_and_reads_power_probes_only() -> None:
    clock = FakeClock()
    counter, plain = CounterProbe(), PlainProbe()
    s = Sampler([counter, plain], clock=clock)
    seen: list[Snapshot] = []
    s.add_listener(seen.append)
    for _ in range(3):
        clock.t += 1.0
        s.sample_once()
    tick = s.latest()
    clock.t += 0.25
    snap = s.sample_power_now()
    assert snap is not None and snap.partial
    assert snap.t_mono_s == clock.t
    assert set(snap.readings) == {"counter"}  # the plain probe was not read
    assert plain.n == 3
    assert snap.power[0].energy_mj == pytest.approx(1.0)
    assert s.latest() is tick  # telemetry never sees it
    assert seen == [s.history()[i] for i in range(3)]  # nor do listeners
    assert s.history()[-1] is snap
    assert s.stats().on_demand_samples == 1
    clock.t += 0.75
    after = s.sample_once()  # the next tick's delta starts at the on-demand read
    assert after.power[0].energy_mj == pytest.approx(1.0)
    assert not after.partial
    clock.t += 0.05
    assert s.sample_power_now(max_age_s=0.1) is after  # recent enough: no extra read
    assert s.stats().on_demand_samples == 1
    clock.t += 0.1
    fresh = s.sample_power_now(max_age_s=0.1)
    assert fresh is not None and fresh is not after and fresh.t_mono_s == clock.t


def test_history_stays_in_time_order_when_an_on_demand_sample_lands_mid_tick() -> None:
    clock = FakeClock(10.0)
    s = Sampler([CounterProbe()], history_len=4, clock=clock)
    for _ in range(4):
        clock.t += 1.0
        s.sample_once()
    # a tick taken at t=15 whose snapshot is stored after an on-demand one at t=15.5
    late = Snapshot(ts_unix_ms=0, t_mono_s=15.0, readings={}, power=(), errors={})
    clock.t = 15.5
    s.sample_power_now()
    with s._data_lock:
        s._append_locked(late)
    times = [h.t_mono_s for h in s.history()]
    assert times == sorted(times) == [13.0, 14.0, 15.0, 15.5]


def test_on_demand_and_thread_samples_split_a_counter_exactly() -> None:
    """Two threads reading one counter: every delta is counted once, in time order."""
    counter = CounterProbe()
    s = Sampler([counter], interval_s=0.001, history_len=100_000)
    s.sample_once()
    s.sample_once()  # the counter is now a known power source
    s.start()
    try:
        for _ in range(300):
            assert s.sample_power_now() is not None
    finally:
        s.stop()
    hist = s.history()
    assert [h.t_mono_s for h in hist] == sorted(h.t_mono_s for h in hist)
    total_mj = sum(r.energy_mj or 0.0 for h in hist for r in h.power)
    # every read after the first adds 1 mJ, whichever thread made it
    assert total_mj == pytest.approx(counter.total_uj / 1000.0 - 1.0)
    assert any(h.partial for h in hist) and any(not h.partial for h in hist)


def test_set_interval_changes_the_base_rate() -> None:
    s = Sampler([], interval_s=1.0)
    with s.fast(0.1):
        s.set_interval(5.0)
        assert s.interval_s == 0.1
    assert s.interval_s == 5.0
    with pytest.raises(ValueError):
        s.set_interval(0)


def test_set_interval_wakes_the_thread() -> None:
    ticks = threading.Semaphore(0)
    s = Sampler([CountingProbe()], interval_s=3600.0)
    s.add_listener(lambda _snap: ticks.release())
    s.start()
    try:
        assert ticks.acquire(timeout=5)  # the first tick is immediate
        s.set_interval(0.01)
        assert ticks.acquire(timeout=5)  # not an hour later
    finally:
        s.stop()


class SlowCounterProbe(CounterProbe):
    name = "slow"

    def sample(self) -> CountReadings:
        time.sleep(0.02)  # like a vcgencmd fork on a Pi
        return super().sample()


def test_sample_power_now_can_leave_out_expensive_sources() -> None:
    clock = FakeClock()
    fast_src, slow_src = CounterProbe(), SlowCounterProbe()
    s = Sampler([fast_src, slow_src], clock=clock)
    s.sample_once()
    s.sample_once()
    clock.t += 0.5
    cheap = s.sample_power_now(max_cost_s=0.005)
    assert cheap is not None and set(cheap.readings) == {"counter"}
    clock.t += 0.5
    every = s.sample_power_now()
    assert every is not None and set(every.readings) == {"counter", "slow"}
    assert s.sample_power_now(max_cost_s=0.0) is None  # nothing that cheap
