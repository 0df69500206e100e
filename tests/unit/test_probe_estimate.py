from __future__ import annotations

from pathlib import Path

import pytest
from sysfs_fixtures import DenyingReader, copy_fixture, fixture_root, write

from probes.base import PowerCoverage, ProbeError
from probes.cpu import CpuProbe
from probes.estimate import EstimateProbe
from probes.jetson import JetsonProbe
from probes.memory import MemoryProbe
from probes.nvml import NvmlProbe
from probes.rapl import RaplProbe
from probes.rpi import RpiProbe
from probes.thermal import ThermalProbe

STAT2 = "cpu  1300 20 600 8500 100 0 30 0 0 0\n"  # +400 busy of +900 ticks vs the rpi5 tree


def test_model_is_exact_and_labelled(tmp_path: Path) -> None:
    root = copy_fixture("rpi5", tmp_path)
    probe = EstimateProbe(root, idle_mw=2000.0, max_mw=11000.0)
    avail = probe.check()
    assert avail.ok and avail.degraded and "modelled" in avail.reason
    first = probe.sample()
    assert first.power_mw is None  # first sample: no utilisation yet
    write(root, "/proc/stat", STAT2)
    r = probe.sample()
    assert r.util_pct == pytest.approx(400 / 900 * 100)
    assert r.power_mw == pytest.approx(2000 + 400 / 900 * 9000)  # 6000 mW
    (pw,) = probe.power(r)
    assert pw.source == "estimate:cpu_util" and pw.covers == PowerCoverage.ESTIMATE


def test_unconfigured_is_unavailable_never_defaulted() -> None:
    probe = EstimateProbe(fixture_root("rpi5"))
    assert not probe.check().ok
    with pytest.raises(ProbeError):
        probe.sample()
    assert not EstimateProbe(fixture_root("rpi5"), idle_mw=5, max_mw=1).check().ok


def test_absent_and_permission_denied(tmp_path: Path) -> None:
    assert not EstimateProbe(tmp_path, idle_mw=1, max_mw=2).check().ok
    probe = EstimateProbe(fixture_root("rpi5"), idle_mw=1, max_mw=2)
    probe.fs = DenyingReader(probe.fs.root, ["proc/stat"])
    assert not probe.check().ok


def test_malformed(tmp_path: Path) -> None:
    write(tmp_path, "/proc/stat", "intr 1 2 3\n")
    with pytest.raises(ProbeError):
        EstimateProbe(tmp_path, idle_mw=1, max_mw=2).sample()


def test_machine_with_nothing() -> None:
    root = fixture_root("empty")
    for probe in (
        CpuProbe(root),
        MemoryProbe(root),
        ThermalProbe(root),
        RaplProbe(root),
        JetsonProbe(root, use_jtop=False),
        RpiProbe(root, runner=lambda argv: None),
        EstimateProbe(root, idle_mw=1, max_mw=2),
    ):
        avail = probe.check()
        assert not avail.ok and avail.reason, probe.name
    assert NvmlProbe(root, nvml=None).name == "nvml"  # its absence is tested with a fake
