from __future__ import annotations

from pathlib import Path

import pytest
from sysfs_fixtures import DenyingReader, copy_fixture, fixture_root, write

from probes.base import PowerCoverage, PowerReading
from probes.rapl import PERMISSION_REMEDY, RaplProbe, wrap_delta_uj

MAXR = 262143328850
PKG0 = "/sys/class/powercap/intel-rapl:0/energy_uj"


class FakeClock:
    def __init__(self, t: float = 50.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def by_zone(probe: RaplProbe) -> dict[str, object]:
    return {d.zone: d for d in probe.sample().domains}


def test_wrap_delta() -> None:
    assert wrap_delta_uj(100, 350, MAXR) == 250
    assert wrap_delta_uj(500, 500, MAXR) == 0  # equal readings are not a wrap
    assert wrap_delta_uj(MAXR - 1000, 2000, MAXR) == 3000
    assert wrap_delta_uj(MAXR - 1000, 2000, None) is None  # never negative, never guessed


def test_one_package_happy_path(tmp_path: Path) -> None:
    root = copy_fixture("x86-rapl-1pkg", tmp_path)
    clock = FakeClock()
    probe = RaplProbe(root, clock=clock)
    assert probe.check().ok
    first = probe.sample()
    assert first.interval_s is None
    pkg = first.domains[0]
    assert (pkg.zone, pkg.name, pkg.package_id) == ("intel-rapl:0", "package-0", 0)
    assert pkg.energy_uj == 123456789012
    assert pkg.energy_mj is None and pkg.power_mw is None  # first sample of a counter
    assert probe.power(first)[0] == PowerReading(
        "rapl:package-0", PowerCoverage.CPU_PACKAGE, None, None, True
    )

    write(root, PKG0, 123456789012 + 2_500_000)  # +2.5 J
    write(root, "/sys/class/powercap/intel-rapl:0:2/energy_uj", 3456789012 + 500_000)
    write(root, "/sys/class/powercap/intel-rapl:0:0/energy_uj", 45678901234 + 2_000_000)
    clock.t += 0.5
    second = probe.sample()
    assert second.interval_s == 0.5
    power = probe.power(second)
    # core and uncore are inside the package: not power sources
    assert [(p.source, p.covers) for p in power] == [
        ("rapl:package-0", PowerCoverage.CPU_PACKAGE),
        ("rapl:dram-0", PowerCoverage.DRAM),
    ]
    assert power[0].energy_mj == 2500.0 and power[0].power_mw == 5000.0
    assert power[1].energy_mj == 500.0 and power[1].power_mw == 1000.0
    core = next(d for d in second.domains if d.name == "core")
    assert core.energy_mj == 2000.0 and not core.counted


def test_wrap_is_handled_exactly(tmp_path: Path) -> None:
    root = copy_fixture("x86-rapl-1pkg", tmp_path)
    clock = FakeClock()
    write(root, PKG0, MAXR - 1_000_000)
    probe = RaplProbe(root, clock=clock)
    probe.sample()
    write(root, PKG0, 3_000_000)
    clock.t += 1.0
    pkg = probe.sample().domains[0]
    assert pkg.valid and pkg.energy_mj == 4000.0 and pkg.power_mw == 4000.0


def test_equal_readings_are_zero_not_a_wrap(tmp_path: Path) -> None:
    root = copy_fixture("x86-rapl-1pkg", tmp_path)
    clock = FakeClock()
    probe = RaplProbe(root, clock=clock)
    probe.sample()
    clock.t += 0.1
    pkg = probe.sample().domains[0]
    assert pkg.valid and pkg.energy_mj == 0.0


def test_gap_that_could_hide_a_wrap_is_invalid(tmp_path: Path) -> None:
    root = copy_fixture("x86-rapl-1pkg", tmp_path)
    clock = FakeClock()
    probe = RaplProbe(root, clock=clock, max_power_w=500.0)
    probe.sample()
    write(root, PKG0, 123456789012 + 1000)
    clock.t += MAXR / 500e6 + 1  # 525.3 s: a full wrap fits in the gap
    pkg = probe.sample().domains[0]
    assert not pkg.valid
    assert pkg.energy_mj is None and pkg.power_mw is None
    assert "could hide a counter wrap" in pkg.reason
    assert probe.power(probe.sample())[0].valid  # the next short interval is fine again


def test_two_packages_psys_and_mmio_duplicate(tmp_path: Path) -> None:
    root = copy_fixture("x86-rapl-2pkg", tmp_path)
    clock = FakeClock()
    probe = RaplProbe(root, clock=clock)
    probe.sample()
    clock.t += 1.0
    r = probe.sample()
    zones = {d.zone: d for d in r.domains}
    # package id from the name, not the directory index: intel-rapl:2 is package-1
    assert zones["intel-rapl:2"].package_id == 1
    assert zones["intel-rapl:2:0"].source == "rapl:dram-1"
    assert zones["intel-rapl:1"].package_id is None and zones["intel-rapl:1"].name == "psys"
    # the MMIO zone duplicates package-0 read through MSR
    assert not zones["intel-rapl-mmio:0"].counted
    power = {p.source: p.covers for p in probe.power(r)}
    assert power == {
        "rapl:package-0": PowerCoverage.CPU_PACKAGE,
        "rapl:dram-0": PowerCoverage.DRAM,
        "rapl:psys": PowerCoverage.BOARD_INPUT,
        "rapl:package-1": PowerCoverage.CPU_PACKAGE,
        "rapl:dram-1": PowerCoverage.DRAM,
    }


def test_mmio_used_when_msr_package_unreadable() -> None:
    probe = RaplProbe(fixture_root("x86-rapl-2pkg"))
    probe.fs = DenyingReader(probe.fs.root, ["sys/class/powercap/intel-rapl:0/energy_uj"])
    sources = {p.source for p in probe.power(probe.sample())}
    assert "rapl-mmio:package-0" in sources
    assert "rapl:package-0" in sources  # still listed, with valid=False


def test_permission_denied_is_actionable() -> None:
    probe = RaplProbe(fixture_root("x86-rapl-1pkg"))
    probe.fs = DenyingReader(probe.fs.root, ["sys/class/powercap/*/energy_uj"])
    avail = probe.check()
    assert not avail.ok
    assert avail.reason == PERMISSION_REMEDY
    assert "CVE-2020-8694" in avail.reason and "udev" in avail.reason
    r = probe.sample()  # the daemon carries on: no exception
    assert all(d.energy_uj is None and not d.valid for d in r.domains)
    assert "permission denied" in r.domains[0].reason


def test_absent(tmp_path: Path) -> None:
    probe = RaplProbe(tmp_path)
    avail = probe.check()
    assert not avail.ok and "no RAPL zones" in avail.reason
    assert probe.sample().domains == ()


def test_malformed(tmp_path: Path) -> None:
    root = copy_fixture("x86-rapl-1pkg", tmp_path)
    write(root, PKG0, "garbage")
    pkg = RaplProbe(root).sample().domains[0]
    assert pkg.energy_uj is None and not pkg.valid and "malformed" in pkg.reason


def test_backwards_without_range_is_invalid(tmp_path: Path) -> None:
    root = copy_fixture("x86-rapl-1pkg", tmp_path)
    clock = FakeClock()
    # the range is static, read once per discovered layout: unreadable from the start
    write(root, "/sys/class/powercap/intel-rapl:0/max_energy_range_uj", "")
    probe = RaplProbe(root, clock=clock)
    probe.sample()
    write(root, PKG0, 5)
    clock.t += 1.0
    pkg = probe.sample().domains[0]
    assert not pkg.valid and pkg.energy_mj is None


@pytest.mark.parametrize("board", ["x86-rapl-1pkg", "x86-rapl-2pkg"])
def test_fixture_zones_are_links_like_the_kernel(board: str) -> None:
    link = fixture_root(board) / "sys/class/powercap/intel-rapl:0"
    assert link.is_symlink() and link.resolve().is_dir()


def test_zone_layout_cached_counter_read_each_tick(tmp_path: Path) -> None:
    root = copy_fixture("x86-rapl-1pkg", tmp_path)
    clock = FakeClock()
    probe = RaplProbe(root, clock=clock)
    first = probe.sample().domains[0].energy_uj
    assert first is not None
    write(root, PKG0, first + 2_000_000)
    write(root, "/sys/class/powercap/intel-rapl:0/name", "renamed")  # not re-read per tick
    clock.t += 1.0
    pkg = probe.sample().domains[0]
    assert pkg.name == "package-0" and pkg.energy_mj == 2000.0 and pkg.power_mw == 2000.0
    clock.t += 61.0  # past rediscover_s: the layout is read again
    assert probe.sample().domains[0].name == "renamed"
