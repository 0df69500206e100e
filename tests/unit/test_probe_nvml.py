# ruff: noqa: N802  (the fake mirrors pynvml's camelCase function names)
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from probes.base import PowerCoverage, PowerReading
from probes.nvml import NvmlProbe


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


@dataclass
class Util:
    gpu: int
    memory: int


class FakeNvml:
    """A stand-in for the pynvml module: same function names, canned values."""

    NVMLError = NVMLError
    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1
    NVML_CLOCK_MEM = 2

    def __init__(self, **unsupported: bool) -> None:
        self.unsupported = unsupported
        self.energy_mj = 1_000_000
        self.init_error: Exception | None = None
        self.shutdown = False

    def _maybe(self, key: str, value: Any) -> Any:
        if self.unsupported.get(key):
            raise NVMLError(3)
        return value

    def nvmlInit(self) -> None:
        if self.init_error:
            raise self.init_error

    def nvmlShutdown(self) -> None:
        self.shutdown = True

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, i: int) -> str:
        return f"h{i}"

    def nvmlDeviceGetName(self, h: str) -> bytes:
        return b"NVIDIA RTX A2000"

    def nvmlDeviceGetPowerUsage(self, h: str) -> int:
        return self._maybe("power", 45_250)

    def nvmlDeviceGetTotalEnergyConsumption(self, h: str) -> int:
        return self._maybe("energy", self.energy_mj)

    def nvmlDeviceGetUtilizationRates(self, h: str) -> Util:
        return self._maybe("util", Util(87, 40))

    def nvmlDeviceGetTemperature(self, h: str, sensor: int) -> int:
        return self._maybe("temp", 61)

    def nvmlDeviceGetClockInfo(self, h: str, clock: int) -> int:
        return self._maybe("clock", 1800 if clock == 1 else 7000)


class Clock:
    t = 10.0

    def __call__(self) -> float:
        return self.t


def test_happy_path_energy_counter_in_mj() -> None:
    fake, clock = FakeNvml(), Clock()
    probe = NvmlProbe(nvml=fake, clock=clock)
    assert probe.check().ok
    first = probe.sample().gpus[0]
    assert first.name == "NVIDIA RTX A2000"
    assert first.power_mw == 45_250.0 and first.energy_mj is None  # first sample of a counter
    assert (first.util_gpu_pct, first.util_mem_pct, first.temp_c) == (87.0, 40.0, 61.0)
    assert (first.sm_clock_mhz, first.mem_clock_mhz) == (1800, 7000)
    fake.energy_mj += 22_500  # mJ, not uJ: 22.5 J
    clock.t += 0.5
    r = probe.sample()
    g = r.gpus[0]
    assert g.energy_mj == 22_500.0 and g.mean_power_mw == 45_000.0
    assert probe.power(r) == [PowerReading("nvml:gpu0", PowerCoverage.GPU, 45_000.0, 22_500.0)]
    probe.close()
    assert fake.shutdown


def test_no_energy_counter_falls_back_to_power_rail() -> None:
    probe = NvmlProbe(nvml=FakeNvml(energy=True), clock=Clock())
    r = probe.sample()
    assert r.gpus[0].energy_total_mj is None
    assert probe.power(r) == [PowerReading("nvml:gpu0", PowerCoverage.GPU, 45_250.0)]


def test_jetson_like_everything_not_supported_is_unavailable() -> None:
    fake = FakeNvml(power=True, energy=True, util=True, temp=True, clock=True)
    probe = NvmlProbe(nvml=fake)
    avail = probe.check()  # init succeeded, but no read did
    assert not avail.ok and "NOT_SUPPORTED" in avail.reason
    g = probe.sample().gpus[0]
    assert g.power_mw is None and g.temp_c is None and g.sm_clock_mhz is None
    assert probe.power(probe.sample()) == []


def test_absent_library_not_found() -> None:
    fake = FakeNvml()
    fake.init_error = NVMLError(12)  # NVML_ERROR_LIBRARY_NOT_FOUND
    avail = NvmlProbe(nvml=fake).check()
    assert not avail.ok and "NVML unavailable" in avail.reason


def test_permission_denied_is_none() -> None:
    class Denied(FakeNvml):
        def nvmlDeviceGetPowerUsage(self, h: str) -> int:
            raise NVMLError(4)  # NVML_ERROR_NO_PERMISSION

    g = NvmlProbe(nvml=Denied(), clock=Clock()).sample().gpus[0]
    assert g.power_mw is None and g.temp_c == 61.0


def test_counter_reset_is_not_negative() -> None:
    fake, clock = FakeNvml(), Clock()
    probe = NvmlProbe(nvml=fake, clock=clock)
    probe.sample()
    fake.energy_mj = 5  # driver reloaded
    clock.t += 1
    assert probe.sample().gpus[0].energy_mj is None


@pytest.mark.parametrize("installed", [False])
def test_not_installed(installed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    import probes.nvml as mod

    def missing() -> Any:
        raise ImportError("No module named 'pynvml'")

    monkeypatch.setattr(mod, "_import_pynvml", missing)
    avail = NvmlProbe().check()
    assert not avail.ok and "nvidia-ml-py" in avail.reason
