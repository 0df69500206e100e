from __future__ import annotations

import shutil
from pathlib import Path

from sysfs_fixtures import DenyingReader, copy_fixture, fixture_root, write

from probes.thermal import ThermalProbe


def test_rpi5_zone_and_hwmon() -> None:
    probe = ThermalProbe(fixture_root("rpi5"))
    assert probe.check().ok
    r = probe.sample()
    assert r.zones["cpu-thermal"].temp_c == 48.25
    assert r.hwmon["cpu_thermal"]["temp1"].temp_c == 48.25
    assert "cooling_fan" not in r.hwmon  # no temperature channel
    assert r.max_temp_c == 48.25


def test_hwmon_matched_by_name_not_number() -> None:
    r = ThermalProbe(fixture_root("x86-rapl-2pkg")).sample()
    # hwmon0 is coretemp.1 and hwmon1 is coretemp.0 in this tree: keys follow the device
    assert r.hwmon["coretemp@coretemp.0"]["Package id 0"].temp_c == 52.0
    assert r.hwmon["coretemp@coretemp.1"]["Package id 1"].temp_c == 55.0
    assert r.hwmon["coretemp@coretemp.0"]["Core 0"].crit_c == 100.0
    assert r.zones["x86_pkg_temp"].temp_c == 55.0
    assert r.zones["x86_pkg_temp#2"].temp_c == 52.0
    assert r.max_temp_c == 55.0


def test_hwmon_name_filter() -> None:
    r = ThermalProbe(fixture_root("x86-rapl-2pkg"), hwmon_names=["nvme"]).sample()
    assert r.hwmon == {}


def test_jetson_placeholder_and_pmic_skipped() -> None:
    r = ThermalProbe(fixture_root("jetson-orin-nano-jp6")).sample()
    assert r.zones["cv0-thermal"].temp_c is None  # -256000 = sensor off
    assert r.zones["tj-thermal"].temp_c == 46.0
    r = ThermalProbe(fixture_root("jetson-nano-jp4")).sample()
    assert "PMIC-Die" not in r.zones
    assert r.zones["CPU-therm"].temp_c == 43.0


def test_absent(tmp_path: Path) -> None:
    probe = ThermalProbe(tmp_path)
    assert not probe.check().ok
    r = probe.sample()
    assert r.zones == {} and r.hwmon == {} and r.max_temp_c is None


def test_permission_denied() -> None:
    probe = ThermalProbe(fixture_root("rpi5"))
    probe.fs = DenyingReader(probe.fs.root, ["sys/class/thermal/thermal_zone0/temp"])
    assert probe.sample().zones["cpu-thermal"].temp_c is None


def test_malformed(tmp_path: Path) -> None:
    root = copy_fixture("rpi5", tmp_path)
    write(root, "/sys/class/thermal/thermal_zone0/temp", "hot")
    r = ThermalProbe(root).sample()
    assert r.zones["cpu-thermal"].temp_c is None
    assert r.max_temp_c == 48.25  # from hwmon


def test_first_sample_is_complete() -> None:
    assert ThermalProbe(fixture_root("rpi4")).sample().zones["cpu-thermal"].temp_c == 61.835


def test_layout_is_discovered_once_values_every_tick(tmp_path: Path) -> None:
    root = copy_fixture("rpi5", tmp_path)
    probe = ThermalProbe(root)
    first = probe.sample()
    write(root, "/sys/class/thermal/thermal_zone0/temp", "71500")
    write(root, "/sys/class/thermal/thermal_zone9/type", "gpu-thermal")
    write(root, "/sys/class/thermal/thermal_zone9/temp", "50000")
    second = probe.sample()
    assert second.zones["cpu-thermal"].temp_c == 71.5  # values are read every tick
    assert second.zones.keys() == first.zones.keys()  # the layout is not re-globbed per tick
    assert ThermalProbe(root, rediscover_s=0).sample().zones["gpu-thermal"].temp_c == 50.0


def test_vanished_zone_is_none_then_dropped(tmp_path: Path) -> None:
    root = copy_fixture("rpi5", tmp_path)
    write(root, "/sys/class/thermal/thermal_zone9/type", "gpu-thermal")
    write(root, "/sys/class/thermal/thermal_zone9/temp", "50000")
    probe = ThermalProbe(root)
    assert probe.sample().zones["gpu-thermal"].temp_c == 50.0
    shutil.rmtree(root / "sys/class/thermal/thermal_zone9")
    assert probe.sample().zones["gpu-thermal"].temp_c is None  # the tick it vanished
    assert "gpu-thermal" not in probe.sample().zones  # rediscovered on the next tick
