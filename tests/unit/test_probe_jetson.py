from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from sysfs_fixtures import DenyingReader, copy_fixture, fixture_root, write

from probes.base import PowerCoverage, PowerReading, readings_as_dict
from probes.jetson import JetsonProbe, parse_l4t_release


def sysfs_only(board: str) -> JetsonProbe:
    return JetsonProbe(fixture_root(board), use_jtop=False)


def test_orin_nano_jp6_vdd_in_is_the_total() -> None:
    probe = sysfs_only("jetson-orin-nano-jp6")
    assert probe.check().ok and not probe.check().degraded
    r = probe.sample()
    assert set(r.rails) == {"VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"}  # no shunt sum
    assert r.rails["VDD_IN"].power_mw == pytest.approx(5016 * 1384 / 1000)  # 6942.144 mW
    assert r.rails["VDD_SOC"].power_mw == pytest.approx(5024 * 588 / 1000)
    assert r.total_source == "VDD_IN"
    assert r.total_power_mw == pytest.approx(6942.144)  # never VDD_IN + sub-rails
    assert probe.power(r) == [
        PowerReading("jetson:VDD_IN", PowerCoverage.BOARD_INPUT, pytest.approx(6942.144))
    ]
    assert r.model == "NVIDIA Jetson Orin Nano Developer Kit"
    assert r.l4t_release == "R36.3.0"
    assert r.gpu_load_pct == 23.5  # 235 per-mille
    assert r.gpu_cur_freq_hz == 624750000 and r.gpu_governor == "nvhost_podgov"
    assert r.backend == "sysfs"


def test_agx_orin_sums_rails_and_skips_nc() -> None:
    r = sysfs_only("jetson-agx-orin").sample()
    assert set(r.rails) == {"VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO"}
    expected = (4984 * 1200 + 4984 * 800 + 4976 * 600 + 4992 * 200) / 1000
    assert r.total_source == "rails_sum"
    assert r.total_power_mw == pytest.approx(expected)  # 14939.2 mW
    assert r.l4t_release == "R35.4.1"
    assert r.gpu_load_pct == 51.2


def test_nano_jp4_iio_rails_in_mw() -> None:
    r = sysfs_only("jetson-nano-jp4").sample()
    assert r.rails["POM_5V_IN"].power_mw == 3212.0
    assert r.rails["POM_5V_IN"].current_ma == 640.0
    assert r.rails["POM_5V_CPU"].voltage_mv == 5016.0
    assert r.total_source == "POM_5V_IN" and r.total_power_mw == 3212.0
    assert r.l4t_release == "R32.7.1"
    assert r.gpu_load_pct == 87.0
    assert readings_as_dict(r)["rails"]["POM_5V_GPU"]["power_mw"] == 0.0  # a real 0, measured


def test_absent(tmp_path: Path) -> None:
    probe = JetsonProbe(tmp_path, use_jtop=False)
    avail = probe.check()
    assert not avail.ok and "not a Jetson" in avail.reason
    r = probe.sample()
    assert r.rails == {} and r.total_power_mw is None and r.total_source is None
    assert probe.power(r) == []


def test_permission_denied_rail_gives_none_total() -> None:
    probe = JetsonProbe(fixture_root("jetson-agx-orin"), use_jtop=False)
    probe.fs = DenyingReader(probe.fs.root, ["sys/bus/i2c/devices/1-0041/hwmon/hwmon4/curr2_input"])
    r = probe.sample()
    assert r.rails["VDDQ_VDD2_1V8AO"].power_mw is None
    assert r.total_power_mw is None  # a sum missing a rail is not reported as the total
    assert r.total_source == "rails_sum"


def test_malformed_value(tmp_path: Path) -> None:
    root = copy_fixture("jetson-orin-nano-jp6", tmp_path)
    write(root, "/sys/bus/i2c/devices/1-0040/hwmon/hwmon1/curr1_input", "n/a")
    r = JetsonProbe(root, use_jtop=False).sample()
    assert r.rails["VDD_IN"].power_mw is None and r.total_power_mw is None


def test_first_sample_is_complete() -> None:
    # rails are instantaneous: no delta, the first sample carries power
    assert sysfs_only("jetson-orin-nano-jp6").sample().total_power_mw is not None


def test_l4t_parse() -> None:
    assert parse_l4t_release("# R32 (release), REVISION: 7.1, GCID: 1") == "R32.7.1"
    assert parse_l4t_release("garbage") is None


# -- jtop -------------------------------------------------------------------------------------


class FakeJtop:
    def __init__(self, fail_start: bool = False) -> None:
        self.fail_start = fail_start
        self.alive = True
        self.closed = False
        self.power: Any = {
            "rail": {
                "VDD_IN": {"online": True, "volt": 5000, "curr": 2000, "power": 10000},
                "NC": {"online": True, "volt": 0, "curr": 0, "power": 0},
            },
            "tot": {"power": 10000, "name": "VDD_IN"},
        }

    def start(self) -> None:
        if self.fail_start:
            raise RuntimeError("The jtop.service is not active")

    def ok(self) -> bool:
        return self.alive

    def close(self) -> None:
        self.closed = True


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_jtop_used_when_service_answers() -> None:
    fake = FakeJtop()
    probe = JetsonProbe(fixture_root("jetson-orin-nano-jp6"), jtop_factory=lambda: fake)
    r = probe.sample()
    assert r.backend == "jtop" and r.backend_reason == ""
    assert set(r.rails) == {"VDD_IN"} and r.total_power_mw == 10000.0


def test_jtop_goes_inactive_falls_back_with_backoff() -> None:
    clock = Clock()
    starts: list[FakeJtop] = []

    def factory() -> FakeJtop:
        fake = FakeJtop(fail_start=len(starts) > 0 and len(starts) < 3)
        starts.append(fake)
        return fake

    probe = JetsonProbe(
        fixture_root("jetson-orin-nano-jp6"), jtop_factory=factory, clock=clock,
        retry_initial_s=5.0, retry_max_s=8.0,
    )  # fmt: skip
    assert probe.sample().backend == "jtop"
    starts[0].alive = False  # service stopped
    r = probe.sample()
    assert r.backend == "sysfs" and r.total_power_mw == pytest.approx(6942.144)
    assert "stopped answering" in r.backend_reason and "retry in 5 s" in r.backend_reason
    assert starts[0].closed
    avail = probe.check()
    assert avail.ok and avail.degraded and "sysfs" in avail.reason

    clock.t = 4.9
    probe.sample()
    assert len(starts) == 1  # backoff not elapsed
    clock.t = 5.0
    r = probe.sample()  # retry fails (start raises)
    assert len(starts) == 2 and "retry in 8 s" in r.backend_reason  # doubled, capped
    clock.t = 13.0
    probe.sample()
    assert len(starts) == 3
    clock.t = 21.0
    r = probe.sample()
    assert len(starts) == 4 and r.backend == "jtop" and r.backend_reason == ""
    assert not probe.check().degraded


def test_jtop_not_installed_is_plain_sysfs() -> None:
    def factory() -> FakeJtop:
        raise ImportError("No module named 'jtop'")

    probe = JetsonProbe(fixture_root("jetson-orin-nano-jp6"), jtop_factory=factory)
    r = probe.sample()
    assert r.backend == "sysfs" and r.backend_reason == ""
    assert not probe.check().degraded


def test_rail_layout_cached_values_fresh_and_unplug_rediscovered(tmp_path: Path) -> None:
    root = copy_fixture("jetson-orin-nano-jp6", tmp_path)
    probe = JetsonProbe(root, use_jtop=False)
    hw = root / "sys/bus/i2c/devices/1-0040/hwmon/hwmon1"
    assert probe.sample().rails["VDD_IN"].power_mw == pytest.approx(5016 * 1384 / 1000)
    write(root, "/sys/bus/i2c/devices/1-0040/hwmon/hwmon1/curr1_input", "2000")
    assert probe.sample().rails["VDD_IN"].power_mw == pytest.approx(5016 * 2000 / 1000)
    shutil.rmtree(hw)
    gone = probe.sample()
    assert gone.rails["VDD_IN"].power_mw is None and gone.total_power_mw is None
    assert probe.sample().rails == {}  # rediscovered: no rails left, not stale ones
