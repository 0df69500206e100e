from __future__ import annotations

from pathlib import Path

import pytest
from sysfs_fixtures import DenyingReader, fixture_root, write

from probes.base import ProbeError
from probes.memory import MemoryProbe


def test_happy_path_bytes() -> None:
    probe = MemoryProbe(fixture_root("rpi5"))
    assert probe.check().ok
    r = probe.sample()
    assert r.total_bytes == 8245424 * 1024
    assert r.free_bytes == 6123456 * 1024
    assert r.available_bytes == 7345612 * 1024
    assert r.used_bytes == (8245424 - 7345612) * 1024
    assert r.used_pct == pytest.approx((8245424 - 7345612) / 8245424 * 100)
    assert r.buffers_bytes == 45678 * 1024
    assert r.cached_bytes == 1098765 * 1024
    assert r.swap_total_bytes == 204796 * 1024
    assert r.swap_free_bytes == 200700 * 1024
    assert r.swap_used_bytes == 4096 * 1024


def test_first_sample_is_complete() -> None:
    # memory has no rates: the first sample already carries every value
    r = MemoryProbe(fixture_root("rpi5")).sample()
    assert r.used_bytes is not None


def test_old_kernel_without_memavailable(tmp_path: Path) -> None:
    write(tmp_path, "/proc/meminfo", "MemTotal: 1000 kB\nMemFree: 400 kB\nCached: 300 kB\n")
    probe = MemoryProbe(tmp_path)
    avail = probe.check()
    assert avail.ok and avail.degraded
    r = probe.sample()
    assert r.available_bytes is None
    assert r.used_bytes is None  # never MemFree + Cached guessed
    assert r.swap_total_bytes is None


def test_absent(tmp_path: Path) -> None:
    probe = MemoryProbe(tmp_path)
    assert not probe.check().ok
    with pytest.raises(ProbeError):
        probe.sample()


def test_permission_denied() -> None:
    probe = MemoryProbe(fixture_root("rpi5"))
    probe.fs = DenyingReader(probe.fs.root, ["proc/meminfo"])
    avail = probe.check()
    assert not avail.ok and "Permission denied" in avail.reason


def test_malformed(tmp_path: Path) -> None:
    write(tmp_path, "/proc/meminfo", "MemTotal: lots kB\nMemFree: 5 kB\n")
    probe = MemoryProbe(tmp_path)
    assert not probe.check().ok
    with pytest.raises(ProbeError, match="MemTotal"):
        probe.sample()
