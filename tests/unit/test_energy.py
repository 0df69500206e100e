from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from agent.energy import EnergyIntegrator, IdleBaseline, integrate
from agent.sampler import Sampler, Snapshot
from probes.base import PowerCoverage, PowerReading
from probes.rapl import RaplProbe
from tests.unit.sysfs_fixtures import copy_fixture, write

B = PowerCoverage.BOARD_INPUT
CPU = PowerCoverage.CPU_PACKAGE
GPU = PowerCoverage.GPU
DRAM = PowerCoverage.DRAM
EST = PowerCoverage.ESTIMATE


def snap(t: float, *power: PowerReading, interval: float = 1.0) -> Snapshot:
    return Snapshot(int(t * 1000), t, {}, tuple(power), {}, interval)


def rail(source: str, mw: float | None, covers: PowerCoverage = B) -> PowerReading:
    return PowerReading(source, covers, mw)


def counter(
    source: str, mj: float | None, covers: PowerCoverage = CPU, valid: bool = True
) -> PowerReading:
    return PowerReading(source, covers, None, mj, valid)


def rails(values: Sequence[tuple[float, float]], source: str = "ina:VDD_IN") -> list[Snapshot]:
    return [snap(t, rail(source, p)) for t, p in values]


def test_trapezoid_exact() -> None:
    # 0..2 s at 1000 -> 3000 -> 3000 mW: (1000+3000)/2*1 + 3000*1 = 5000 mJ
    r = integrate(rails([(0, 1000), (1, 3000), (2, 3000)]), 0.0, 2.0, tokens=10)
    assert r.gross_energy_mj == pytest.approx(5000.0)
    assert r.mean_power_mw == pytest.approx(2500.0)
    assert r.coverage == 1.0
    assert r.method == "board_input"
    assert r.sources == ("ina:VDD_IN",)
    assert r.sample_interval_s == 1.0
    assert r.gross_mj_per_token == pytest.approx(500.0)
    assert r.gross_tokens_per_j == pytest.approx(2.0)
    assert r.net_energy_mj is None and "no idle baseline" in r.reason
    assert not r.estimated


def test_trapezoid_interpolates_at_edges() -> None:
    # window [0.5, 1.5]: p(0.5)=2000, p(1)=3000, p(1.5)=3000 -> 1250 + 1500 = 2750 mJ
    r = integrate(rails([(0, 1000), (1, 3000), (2, 3000)]), 0.5, 1.5)
    assert r.gross_energy_mj == pytest.approx(2750.0)
    # window inside one interval, no sample in it: still covered by the line through it
    r = integrate(rails([(0, 1000), (1, 3000)]), 0.25, 0.75)
    assert r.gross_energy_mj == pytest.approx(1000.0)  # mean 2000 mW * 0.5 s


def test_counter_deltas_prorated_at_edges() -> None:
    snaps = [
        snap(0.0, counter("rapl:package-0", None)),  # first sample of a counter
        snap(1.0, counter("rapl:package-0", 4000.0)),
        snap(2.0, counter("rapl:package-0", 6000.0)),
        snap(3.0, counter("rapl:package-0", 2000.0)),
    ]
    r = integrate(snaps, 0.5, 2.5)
    # half of 4000 + 6000 + half of 2000
    assert r.gross_energy_mj == pytest.approx(9000.0)
    assert r.coverage == 1.0
    assert r.per_source[0].method == "counter"
    assert r.method == "components"


def test_invalid_counter_interval_is_a_gap_not_a_guess() -> None:
    snaps = [
        snap(0.0, counter("rapl:package-0", None)),
        snap(1.0, counter("rapl:package-0", 1000.0)),
        snap(2.0, counter("rapl:package-0", None, valid=False)),  # could hide a wrap
        snap(3.0, counter("rapl:package-0", 1000.0)),
    ]
    r = integrate(snaps, 0.0, 3.0)
    assert r.coverage == pytest.approx(2 / 3)
    assert r.gross_energy_mj is None
    assert "coverage 0.67" in r.reason
    r = integrate(snaps, 0.0, 3.0, min_coverage=0.5)
    assert r.gross_energy_mj == pytest.approx(3000.0)  # 2000 mJ over 2 s, taken over 3 s
    assert "33.3% of the window" in r.reason


def test_board_input_alone_never_adds_sub_rails() -> None:
    snaps = [
        snap(t, rail("ina:VDD_IN", 5000), rail("nvml:gpu0", 2000, GPU),
             counter("rapl:package-0", None if t == 0 else 1500.0))
        for t in (0.0, 1.0, 2.0)
    ]  # fmt: skip
    r = integrate(snaps, 0.0, 2.0)
    assert r.sources == ("ina:VDD_IN",)
    assert r.gross_energy_mj == pytest.approx(10000.0)


def test_components_are_summed_without_overlap() -> None:
    snaps = [
        snap(t, counter("rapl:package-0", None if t == 0 else 1500.0),
             counter("rapl:dram-0", None if t == 0 else 500.0, DRAM),
             rail("nvml:gpu0", 2000, GPU), rail("estimate:cpu", 9999, EST))
        for t in (0.0, 1.0, 2.0)
    ]  # fmt: skip
    r = integrate(snaps, 0.0, 2.0)
    assert r.sources == ("nvml:gpu0", "rapl:dram-0", "rapl:package-0")
    assert r.covers == ("gpu", "dram", "cpu_package")
    assert r.gross_energy_mj == pytest.approx(4000 + 1000 + 3000)
    assert not r.estimated


def test_two_board_inputs_pick_one_and_say_so() -> None:
    snaps = [snap(t, rail("plug:shelly", 7000), rail("ina:VDD_IN", 5000)) for t in (0.0, 1.0)]
    r = integrate(snaps, 0.0, 1.0)
    assert r.sources == ("ina:VDD_IN",)  # equal coverage: by name
    assert "plug:shelly" in r.reason


def test_estimate_only_when_nothing_else_and_labelled() -> None:
    snaps = [snap(t, rail("estimate:cpu_util", 3000, EST)) for t in (0.0, 1.0)]
    r = integrate(snaps, 0.0, 1.0)
    assert r.method == "estimate" and r.estimated
    assert r.gross_energy_mj == pytest.approx(3000.0)
    assert "estimated" in r.reason


def test_no_power_source_is_none_with_reason_never_zero() -> None:
    r = integrate([snap(0.0), snap(1.0)], 0.0, 1.0, tokens=5)
    assert r.gross_energy_mj is None and r.mean_power_mw is None
    assert r.gross_mj_per_token is None and r.gross_tokens_per_j is None
    assert r.method == "none" and r.sources == ()
    assert "no power source" in r.reason


def test_rail_with_none_power_is_a_gap() -> None:
    snaps = [snap(0.0, rail("ina:VDD_IN", None)), snap(1.0, rail("ina:VDD_IN", None))]
    r = integrate(snaps, 0.0, 1.0)
    assert r.gross_energy_mj is None and "no valid power samples" in r.reason


def test_long_gap_between_rail_samples_is_not_interpolated() -> None:
    # sampler stalled for 10 s at a 1 s interval
    r = integrate(rails([(0, 1000), (1, 1000), (11, 1000), (12, 1000)]), 0.0, 12.0)
    assert r.coverage == pytest.approx(2 / 12)
    assert r.gross_energy_mj is None


def test_rate_change_inside_window_is_not_a_gap() -> None:
    # slow 1 s sampling until t0, then 10 Hz (fast()): the 1 s interval straddling t0 counts
    snaps = [snap(0.0, rail("ina:VDD_IN", 1000), interval=1.0)]
    snaps += [snap(1.0 + i / 10, rail("ina:VDD_IN", 1000), interval=0.1) for i in range(11)]
    r = integrate(snaps, 0.5, 2.0)
    assert r.coverage == 1.0
    assert r.gross_energy_mj == pytest.approx(1500.0)


def test_baseline_gives_net() -> None:
    base = IdleBaseline(1000.0, ("ina:VDD_IN",), 0.0, 10.0, 1.0)
    r = integrate(rails([(0, 3000), (1, 3000), (2, 3000)]), 0.0, 2.0, tokens=4, baseline=base)
    assert r.gross_energy_mj == pytest.approx(6000.0)
    assert r.net_energy_mj == pytest.approx(4000.0)
    assert r.baseline_power_mw == 1000.0
    assert r.net_mj_per_token == pytest.approx(1000.0)
    assert r.net_tokens_per_j == pytest.approx(1.0)


def test_baseline_on_other_sources_gives_no_net() -> None:
    base = IdleBaseline(1000.0, ("rapl:package-0",), 0.0, 10.0, 1.0)
    r = integrate(rails([(0, 3000), (1, 3000)]), 0.0, 1.0, baseline=base)
    assert r.gross_energy_mj is not None
    assert r.net_energy_mj is None and "baseline measured on rapl:package-0" in r.reason


def test_empty_window() -> None:
    r = integrate(rails([(0, 1000), (1, 1000)]), 1.0, 1.0)
    assert r.gross_energy_mj is None and "empty window" in r.reason


class FakeHistory:
    def __init__(self, snaps: list[Snapshot]) -> None:
        self.snaps = snaps

    def history(self, since_mono_s: float = float("-inf")) -> list[Snapshot]:
        return [s for s in self.snaps if s.t_mono_s >= since_mono_s]


def test_integrator_with_measured_baseline() -> None:
    idle = rails([(float(t), 1000) for t in range(0, 11)])
    load = rails([(float(t), 4000) for t in range(11, 21)])
    integ = EnergyIntegrator(FakeHistory(idle + load), lookback_s=2.0)
    base = integ.measure_baseline(0.0, 10.0)
    assert base is not None and base.power_mw == pytest.approx(1000.0)
    r = integ.measure(12.0, 20.0, tokens=80)
    assert r.gross_energy_mj == pytest.approx(32000.0)
    assert r.net_energy_mj == pytest.approx(24000.0)
    assert r.net_mj_per_token == pytest.approx(300.0)


def test_integrator_settle_waits_for_sample_after_window() -> None:
    snaps = rails([(0, 1000), (1, 1000)])
    hist = FakeHistory(snaps)
    t = [0.0]

    def sleep(dt: float) -> None:
        t[0] += dt
        if len(hist.snaps) == 2:
            hist.snaps.append(snap(2.0, rail("ina:VDD_IN", 1000)))

    integ = EnergyIntegrator(hist, clock=lambda: t[0], sleep=sleep)
    r = integ.measure(0.0, 1.5, settle_timeout_s=1.0)
    assert r.coverage == 1.0 and r.gross_energy_mj == pytest.approx(1500.0)


def test_no_baseline_without_power() -> None:
    integ = EnergyIntegrator(FakeHistory([snap(0.0), snap(1.0)]))
    assert integ.measure_baseline(0.0, 1.0) is None
    assert integ.baseline is None


def test_short_window_is_covered_by_on_demand_samples_on_the_rapl_fixture(
    tmp_path: Path,
) -> None:
    """A 0.25 s request that starts just after a 1 Hz tick: bracketed, it has energy."""
    root = copy_fixture("x86-rapl-1pkg", tmp_path)
    pkg = "/sys/class/powercap/intel-rapl:0/energy_uj"
    energy_uj = int((root / pkg.lstrip("/")).resolve().read_text())
    clock = FakeClock(100.0)
    sampler = Sampler([RaplProbe(root, clock=clock)], interval_s=1.0, clock=clock)
    integrator = EnergyIntegrator(sampler, min_coverage=0.9, clock=clock)
    sampler.sample_once()
    clock.t = 101.0
    energy_uj += 2_000_000  # 2 W while idle
    write(root, pkg, energy_uj)
    sampler.sample_once()  # the last 1 Hz tick before the request
    clock.t = 101.02
    energy_uj += 40_000
    write(root, pkg, energy_uj)
    assert sampler.sample_power_now() is not None  # window start
    t0, t1 = 101.03, 101.28
    clock.t = 101.29
    energy_uj += 2_700_000  # 10 W over the 0.27 s since the start sample
    write(root, pkg, energy_uj)
    # no sampler-thread tick after t1 yet: without an end sample there is nothing to close
    unclosed = integrator.measure(t0, t1, tokens=4)
    assert unclosed.gross_energy_mj is None and unclosed.reason
    assert sampler.sample_power_now() is not None  # window end
    res = integrator.measure(t0, t1, tokens=4)
    assert res.coverage == pytest.approx(1.0)
    assert res.sources == ("rapl:dram-0", "rapl:package-0")  # the dram counter stood still
    # the interval between the two on-demand samples is pro-rated: 2700 mJ * 0.25 / 0.27
    assert res.gross_energy_mj == pytest.approx(2700.0 * 0.25 / 0.27)
    assert res.mean_power_mw == pytest.approx(10_000.0)


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t
