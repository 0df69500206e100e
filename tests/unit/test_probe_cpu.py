from __future__ import annotations

from pathlib import Path

import pytest
from sysfs_fixtures import DenyingReader, copy_fixture, fixture_root, write

from probes.base import ProbeError, readings_as_dict
from probes.cpu import CpuProbe, parse_proc_stat

STAT2 = """cpu  1300 20 600 8500 100 0 30 0 0 0
cpu0 400 5 150 2100 25 0 10 0 0 0
cpu1 250 5 125 2100 25 0 10 0 0 0
cpu2 350 5 175 2150 25 0 5 0 0 0
cpu3 300 5 150 2150 25 0 5 0 0 0
"""


def test_happy_path_first_sample_then_deltas(tmp_path: Path) -> None:
    root = copy_fixture("rpi5", tmp_path)
    probe = CpuProbe(root)
    assert probe.check().ok
    assert not probe.check().degraded

    first = probe.sample()
    assert first.util_pct is None  # a rate needs two samples
    assert all(c.util_pct is None for c in first.cores)
    assert first.core_count == 4
    assert (first.load_1m, first.load_5m, first.load_15m) == (0.52, 0.58, 0.59)
    assert first.cores[0].cur_freq_khz == 2_400_000
    assert first.cores[0].min_freq_khz == 1_500_000
    assert first.cores[0].max_freq_khz == 2_400_000
    assert first.cores[0].governor == "ondemand"

    write(root, "/proc/stat", STAT2)
    second = probe.sample()
    # aggregate: busy 1530 -> 1930 (+400), total 9650 -> 10550 (+900)
    assert second.util_pct == pytest.approx(400 / 900 * 100)
    # cpu0: busy 390 -> 565 (+175), total 2415 -> 2690 (+275)
    assert second.cores[0].util_pct == pytest.approx(175 / 275 * 100)
    # cpu1: only idle advanced
    assert second.cores[1].util_pct == 0.0
    d = readings_as_dict(second)
    assert d["cores"][2]["cur_freq_khz"] == 2_400_000


def test_guest_time_not_counted_twice() -> None:
    # guest (field 9) is already inside user: total must ignore it.
    ticks = parse_proc_stat("cpu  100 0 0 100 0 0 0 0 80 0\n")
    assert ticks["cpu"].total == 200
    assert ticks["cpu"].busy == 100


def test_counters_unchanged_gives_none(tmp_path: Path) -> None:
    root = copy_fixture("rpi5", tmp_path)
    probe = CpuProbe(root)
    probe.sample()
    assert probe.sample().util_pct is None  # zero elapsed ticks: no rate, not 0


def test_hotplugged_core_has_no_rate_until_second_sample(tmp_path: Path) -> None:
    root = copy_fixture("rpi5", tmp_path)
    probe = CpuProbe(root)
    probe.sample()
    write(root, "/proc/stat", STAT2 + "cpu4 10 0 10 100 0 0 0 0 0 0\n")
    r = probe.sample()
    assert r.core_count == 5
    assert r.cores[4].util_pct is None
    assert r.cores[4].cur_freq_khz is None  # no cpufreq dir in the fixture for cpu4


def test_absent(tmp_path: Path) -> None:
    probe = CpuProbe(tmp_path)
    avail = probe.check()
    assert not avail.ok
    assert "/proc/stat" in avail.reason
    with pytest.raises(ProbeError):
        probe.sample()


def test_no_cpufreq_is_degraded_not_unavailable(tmp_path: Path) -> None:
    write(tmp_path, "/proc/stat", STAT2)
    probe = CpuProbe(tmp_path)
    avail = probe.check()
    assert avail.ok and avail.degraded
    assert "cpufreq" in avail.reason
    r = probe.sample()
    assert r.cores[0].cur_freq_khz is None
    assert r.cores[0].governor is None
    assert r.load_1m is None  # no /proc/loadavg either


def test_permission_denied() -> None:
    probe = CpuProbe(fixture_root("rpi5"))
    probe.fs = DenyingReader(probe.fs.root, ["proc/stat"])
    avail = probe.check()
    assert not avail.ok
    assert "Permission denied" in avail.reason


def test_permission_denied_on_cpufreq_gives_none() -> None:
    probe = CpuProbe(fixture_root("rpi5"))
    probe.fs = DenyingReader(probe.fs.root, ["sys/devices/system/cpu/cpu*/cpufreq/*"])
    r = probe.sample()
    assert r.cores[0].cur_freq_khz is None
    assert r.core_count == 4


def test_malformed(tmp_path: Path) -> None:
    write(tmp_path, "/proc/stat", "cpu  12 x 3 4\n")
    probe = CpuProbe(tmp_path)
    assert not probe.check().ok
    with pytest.raises(ProbeError, match="malformed"):
        probe.sample()


def test_malformed_freq_and_loadavg(tmp_path: Path) -> None:
    root = copy_fixture("rpi5", tmp_path)
    write(root, "/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq", "<unknown>")
    write(root, "/proc/loadavg", "garbage")
    r = CpuProbe(root).sample()
    assert r.cores[0].cur_freq_khz is None
    assert r.cores[1].cur_freq_khz == 2_400_000
    assert r.load_1m is None
