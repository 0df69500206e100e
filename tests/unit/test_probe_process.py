from __future__ import annotations

from pathlib import Path

import pytest
from sysfs_fixtures import DenyingReader, copy_fixture, fixture_root, write

from probes.base import readings_as_dict
from probes.process import ProcessProbe, parse_pid_stat

STAT = "4321 (python3 (agent)) S 1 4321 4321 0 -1 4194560 5000 0 0 0 {u} {s} 0 0 20 0 7 0 {st} 1 1"


class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_happy_path(tmp_path: Path) -> None:
    root = copy_fixture("rpi5", tmp_path)
    clock = FakeClock()
    probe = ProcessProbe(root, {"agent": 4321}, clock=clock, clk_tck=100)
    assert probe.check().ok
    first = probe.sample().processes["agent"]
    assert first.alive and first.reason == ""
    assert first.rss_bytes == 102400 * 1024
    assert first.peak_rss_bytes == 153600 * 1024
    assert first.threads == 7
    assert first.cpu_pct is None  # first sample of a rate

    # 2 s later: utime +150, stime +50 ticks = 2.0 s CPU over 2.0 s wall = 100 %
    write(root, "/proc/4321/stat", STAT.format(u=450, s=150, st=5000))
    clock.t += 2.0
    second = probe.sample().processes["agent"]
    assert second.cpu_pct == pytest.approx(100.0)


def test_multicore_above_100(tmp_path: Path) -> None:
    root = copy_fixture("rpi5", tmp_path)
    clock = FakeClock()
    probe = ProcessProbe(root, {"agent": 4321}, clock=clock, clk_tck=100)
    probe.sample()
    write(root, "/proc/4321/stat", STAT.format(u=600, s=200, st=5000))  # +400 ticks
    clock.t += 1.0
    assert probe.sample().processes["agent"].cpu_pct == pytest.approx(400.0)


def test_comm_with_spaces_and_parens() -> None:
    assert parse_pid_stat(STAT.format(u=1, s=2, st=3)) == (3, 3)
    assert parse_pid_stat("12 (a) b) R") is None


def test_pid_reuse_resets_rate(tmp_path: Path) -> None:
    root = copy_fixture("rpi5", tmp_path)
    clock = FakeClock()
    probe = ProcessProbe(root, {"worker": 4321}, clock=clock, clk_tck=100)
    probe.sample()
    write(root, "/proc/4321/stat", STAT.format(u=10, s=0, st=9999))  # another process
    clock.t += 1.0
    assert probe.sample().processes["worker"].cpu_pct is None


def test_vanished_pid_and_set_pid(tmp_path: Path) -> None:
    root = copy_fixture("rpi5", tmp_path)
    clock = FakeClock()
    probe = ProcessProbe(root, {"agent": 4321}, clock=clock, clk_tck=100)
    probe.set_pid("worker", 999)  # not in the tree: gone
    r = probe.sample().processes
    assert r["agent"].alive
    assert not r["worker"].alive
    assert r["worker"].rss_bytes is None and r["worker"].cpu_pct is None
    assert "999" in r["worker"].reason

    probe.set_pid("worker", None)
    r = probe.sample().processes
    assert r["worker"].pid is None and r["worker"].reason == "no process for this role"
    assert readings_as_dict(probe.sample())["processes"]["worker"]["rss_bytes"] is None


def test_set_pid_resets_rate(tmp_path: Path) -> None:
    root = copy_fixture("rpi5", tmp_path)
    clock = FakeClock()
    probe = ProcessProbe(root, {"worker": 4321}, clock=clock, clk_tck=100)
    probe.sample()
    probe.set_pid("worker", 4321)  # a restart announced by the supervisor
    clock.t += 1.0
    assert probe.sample().processes["worker"].cpu_pct is None


def test_default_watches_self() -> None:
    probe = ProcessProbe()
    r = probe.sample().processes
    assert set(r) == {"agent"}
    assert r["agent"].alive and r["agent"].rss_bytes


def test_absent(tmp_path: Path) -> None:
    probe = ProcessProbe(tmp_path, {"agent": 4321})
    avail = probe.check()
    assert not avail.ok
    assert not probe.sample().processes["agent"].alive  # never raises


def test_permission_denied() -> None:
    probe = ProcessProbe(fixture_root("rpi5"), {"agent": 4321})
    probe.fs = DenyingReader(probe.fs.root, ["proc/4321/stat"])
    r = probe.sample().processes["agent"]
    assert not r.alive and r.rss_bytes is None


def test_malformed(tmp_path: Path) -> None:
    root = copy_fixture("rpi5", tmp_path)
    write(root, "/proc/4321/stat", "4321 (x) S 1 2")
    write(root, "/proc/4321/status", "VmRSS: lots kB\nThreads: many\n")
    r = ProcessProbe(root, {"agent": 4321}, clk_tck=100).sample().processes["agent"]
    assert r.alive
    assert r.rss_bytes is None and r.threads is None and r.cpu_pct is None
