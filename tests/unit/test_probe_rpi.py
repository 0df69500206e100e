from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from sysfs_fixtures import DenyingReader, copy_fixture, fixture_root, write

from probes.base import PowerCoverage
from probes.rpi import RpiProbe, parse_pmic_read_adc


def canned(board: str, overrides: dict[str, str | None] | None = None):  # type: ignore[no-untyped-def]
    """A runner answering vcgencmd from the fixture's vcgencmd/<cmd>.txt files."""
    calls: list[list[str]] = []

    def run(argv: Sequence[str]) -> str | None:
        calls.append(list(argv))
        cmd = argv[1]
        if overrides and cmd in overrides:
            return overrides[cmd]
        f = fixture_root(board) / "vcgencmd" / f"{cmd}.txt"
        return f.read_text() if f.exists() else None

    run.calls = calls  # type: ignore[attr-defined]
    return run


def test_pi5_pmic_rails_paired_and_summed() -> None:
    probe = RpiProbe(fixture_root("rpi5"), runner=canned("rpi5"))
    assert probe.check().degraded is False
    r = probe.sample()
    assert r.model == "Raspberry Pi 5 Model B Rev 1.0"
    assert r.throttled_raw == 0 and r.throttled_source == "vcgencmd"  # no sysfs file on the Pi 5
    assert r.under_voltage_now is False
    core = r.pmic_rails["VDD_CORE"]
    assert core.current_a == 0.8126299 and core.voltage_v == 0.8818795
    assert core.power_mw == pytest.approx(0.8126299 * 0.8818795 * 1000)
    assert "EXT5V" not in r.pmic_rails and r.input_voltage_v == 5.15766
    expected = 0.8126299 * 0.8818795 * 1000 + 0.1415099 * 3.310033 * 1000
    assert r.pmic_total_mw == pytest.approx(expected)  # 1185.05 mW
    (pw,) = probe.power(r)
    assert pw.source == "rpi5-pmic:rails_sum" and pw.covers == PowerCoverage.BOARD_INPUT
    assert r.soc_temp_c == 48.25


def test_pi4_throttled_bits_from_firmware_sysfs() -> None:
    runner = canned("rpi4")
    probe = RpiProbe(fixture_root("rpi4"), runner=runner)
    r = probe.sample()
    assert r.throttled_raw == 0x50005 and r.throttled_source == "sysfs"
    assert (r.under_voltage_now, r.freq_capped_now, r.throttled_now, r.soft_temp_limit_now) == (
        True, False, True, False,
    )  # fmt: skip
    assert (r.under_voltage_occurred, r.freq_capped_occurred, r.throttled_occurred) == (
        True, False, True,
    )  # fmt: skip
    assert r.soft_temp_limit_occurred is False
    assert r.pmic_rails == {} and probe.power(r) == []  # no PMIC ADC on a Pi 4
    assert all(c[1] != "pmic_read_adc" for c in runner.calls)  # type: ignore[attr-defined]


def test_vcgencmd_missing_is_degraded_with_none() -> None:
    probe = RpiProbe(fixture_root("rpi5"), runner=lambda argv: None)
    avail = probe.check()
    assert avail.ok and avail.degraded and "video" in avail.reason
    r = probe.sample()
    assert r.throttled_raw is None and r.under_voltage_now is None
    assert r.pmic_total_mw is None and probe.power(r) == []


def test_absent(tmp_path: Path) -> None:
    probe = RpiProbe(tmp_path, runner=lambda argv: None)
    assert not probe.check().ok


def test_permission_denied_on_throttled_file_falls_back_to_vcgencmd() -> None:
    probe = RpiProbe(fixture_root("rpi4"), runner=canned("rpi4"))
    probe.fs = DenyingReader(probe.fs.root, ["sys/devices/platform/soc/soc:firmware/get_throttled"])
    r = probe.sample()
    assert r.throttled_raw == 0x50005 and r.throttled_source == "vcgencmd"


def test_malformed_outputs(tmp_path: Path) -> None:
    root = copy_fixture("rpi4", tmp_path)
    write(root, "/sys/devices/platform/soc/soc:firmware/get_throttled", "zz")
    r = RpiProbe(root, runner=canned("rpi4", {"get_throttled": "error"})).sample()
    assert r.throttled_raw is None
    assert parse_pmic_read_adc("VDD_CORE_A current(7)=xA\nnonsense\n") == {}


def test_pmic_rail_without_voltage_has_no_power() -> None:
    rails = parse_pmic_read_adc(" DDR_VDD2_A current(4)=0.1A\n")
    assert rails["DDR_VDD2"].power_mw is None


def test_first_sample_is_complete() -> None:
    r = RpiProbe(fixture_root("rpi5"), runner=canned("rpi5")).sample()
    assert r.pmic_total_mw is not None
