"""NVIDIA discrete GPUs through NVML (the ``nvidia-ml-py`` package, imported as ``pynvml``).

Calls and units (NVML API reference, "Device Queries")::

    nvmlDeviceGetPowerUsage                 mW, board power of the GPU
    nvmlDeviceGetTotalEnergyConsumption     mJ since the driver was loaded (Volta and later);
                                            NOT microjoules
    nvmlDeviceGetUtilizationRates           .gpu and .memory, percent over the driver's last
                                            sample period
    nvmlDeviceGetTemperature(GPU)           degrees C
    nvmlDeviceGetClockInfo(SM / MEM)        MHz

A call answering ``NVML_ERROR_NOT_SUPPORTED`` gives None for that field. On Jetson, NVML
initialises but every power field is NOT_SUPPORTED, so the probe is chosen by a successful
read, not by a successful ``nvmlInit``: ``check()`` fails unless at least one device answers
a power, energy, utilisation or temperature query (the jetson probe covers those boards).

Energy: where the total-energy counter answers, each sample carries the counter delta (a
``counter`` source for the energy integrator); where only power answers, the source is an
instantaneous rail and the integrator integrates it (trapezoid), labelling the method so.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from probes.base import Availability, PowerCoverage, PowerReading, Probe

logger = logging.getLogger(__name__)

_NOT_SUPPORTED = 3  # NVML_ERROR_NOT_SUPPORTED in nvml.h


@dataclass(frozen=True)
class GpuReading:
    """One GPU.

    Attributes:
        index: NVML device index.
        name: Device name.
        power_mw: Power draw, mW.
        energy_total_mj: Counter since driver load, mJ.
        energy_mj: Energy since the previous sample, mJ (None first / unsupported).
        mean_power_mw: ``energy_mj`` over the interval, mW.
        util_gpu_pct: GPU busy percent.
        util_mem_pct: Memory controller busy percent.
        temp_c: Die temperature, degrees C.
        sm_clock_mhz: SM clock, MHz.
        mem_clock_mhz: Memory clock, MHz.
    """

    index: int
    name: str | None
    power_mw: float | None
    energy_total_mj: int | None
    energy_mj: float | None
    mean_power_mw: float | None
    util_gpu_pct: float | None
    util_mem_pct: float | None
    temp_c: float | None
    sm_clock_mhz: int | None
    mem_clock_mhz: int | None


@dataclass(frozen=True)
class NvmlReadings:
    """All GPUs.

    Attributes:
        gpus: One reading per device, by index.
        interval_s: Time since the previous sample, s.
    """

    gpus: tuple[GpuReading, ...]
    interval_s: float | None


def _import_pynvml() -> ModuleType:
    import pynvml  # optional (nvidia-ml-py): imported only when the probe is used

    module: ModuleType = pynvml
    return module


class NvmlProbe(Probe):
    """Power, energy, utilisation, temperature and clocks of NVIDIA GPUs.

    Args:
        root: Unused (NVML is a library, not a file tree); kept for the probe contract.
        nvml: The ``pynvml`` module or a fake with the same functions (tests).
        clock: Monotonic clock, s.
    """

    name = "nvml"

    def __init__(
        self,
        root: str | os.PathLike[str] = "/",
        *,
        nvml: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(root)
        self._nvml: Any = nvml
        self._clock = clock
        self._initialised = False
        self._prev_energy: dict[int, int] = {}
        self._prev_t: float | None = None

    def _lib(self) -> Any:
        if self._nvml is None:
            self._nvml = _import_pynvml()
        if not self._initialised:
            self._nvml.nvmlInit()
            self._initialised = True
        return self._nvml

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call an NVML function; NOT_SUPPORTED (and any NVML error) gives None."""
        try:
            return fn(*args)
        except self._nvml.NVMLError as exc:
            if getattr(exc, "value", None) != getattr(
                self._nvml, "NVML_ERROR_NOT_SUPPORTED", _NOT_SUPPORTED
            ):
                logger.debug("%s failed: %s", getattr(fn, "__name__", fn), exc)
            return None

    def check(self) -> Availability:
        """Available when NVML loads and one device answers a measurement query."""
        try:
            lib = self._lib()
        except ImportError:
            return Availability(
                False, "nvidia-ml-py not installed (pip install edgelm-agent[nvml])"
            )
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            return Availability(False, f"NVML unavailable: {exc}")
        count = self._call(lib.nvmlDeviceGetCount) or 0
        if count == 0:
            return Availability(False, "NVML initialised but reports no GPU")
        for i in range(count):
            h = self._call(lib.nvmlDeviceGetHandleByIndex, i)
            if h is None:
                continue
            probes = (
                self._call(lib.nvmlDeviceGetPowerUsage, h),
                self._call(lib.nvmlDeviceGetTotalEnergyConsumption, h),
                self._call(lib.nvmlDeviceGetUtilizationRates, h),
                self._call(lib.nvmlDeviceGetTemperature, h, lib.NVML_TEMPERATURE_GPU),
            )
            if any(p is not None for p in probes):
                return Availability(True)
        return Availability(
            False,
            "NVML initialised but every query answered NOT_SUPPORTED (on Jetson use the jetson "
            "probe)",
        )

    def sample(self) -> NvmlReadings:
        """Query every GPU; unsupported fields are None."""
        lib = self._lib()
        now = self._clock()
        interval = now - self._prev_t if self._prev_t is not None else None
        self._prev_t = now
        gpus: list[GpuReading] = []
        for i in range(self._call(lib.nvmlDeviceGetCount) or 0):
            h = self._call(lib.nvmlDeviceGetHandleByIndex, i)
            if h is None:
                continue
            name = self._call(lib.nvmlDeviceGetName, h)
            if isinstance(name, bytes):
                name = name.decode("utf-8", "replace")
            power = self._call(lib.nvmlDeviceGetPowerUsage, h)
            total = self._call(lib.nvmlDeviceGetTotalEnergyConsumption, h)
            energy: float | None = None
            mean: float | None = None
            prev = self._prev_energy.get(i)
            if total is not None:
                self._prev_energy[i] = int(total)
                # the counter is 64-bit and only resets with the driver: going back is a reset
                if prev is not None and interval and int(total) >= prev:
                    energy = float(int(total) - prev)
                    mean = energy / interval
            else:
                self._prev_energy.pop(i, None)
            util = self._call(lib.nvmlDeviceGetUtilizationRates, h)
            temp = self._call(lib.nvmlDeviceGetTemperature, h, lib.NVML_TEMPERATURE_GPU)
            sm = self._call(lib.nvmlDeviceGetClockInfo, h, lib.NVML_CLOCK_SM)
            mem = self._call(lib.nvmlDeviceGetClockInfo, h, lib.NVML_CLOCK_MEM)
            gpus.append(
                GpuReading(
                    index=i,
                    name=name if isinstance(name, str) else None,
                    power_mw=float(power) if power is not None else None,
                    energy_total_mj=int(total) if total is not None else None,
                    energy_mj=energy,
                    mean_power_mw=mean,
                    util_gpu_pct=float(util.gpu) if util is not None else None,
                    util_mem_pct=float(util.memory) if util is not None else None,
                    temp_c=float(temp) if temp is not None else None,
                    sm_clock_mhz=int(sm) if sm is not None else None,
                    mem_clock_mhz=int(mem) if mem is not None else None,
                )
            )
        return NvmlReadings(gpus=tuple(gpus), interval_s=interval)

    def power(self, readings: NvmlReadings) -> list[PowerReading]:
        """One ``gpu`` source per device: the energy counter when supported, else power."""
        out: list[PowerReading] = []
        for g in readings.gpus:
            source = f"nvml:gpu{g.index}"
            if g.energy_total_mj is not None:
                out.append(PowerReading(source, PowerCoverage.GPU, g.mean_power_mw, g.energy_mj))
            elif g.power_mw is not None:
                out.append(PowerReading(source, PowerCoverage.GPU, g.power_mw))
        return out

    def close(self) -> None:
        """Shut NVML down."""
        if self._initialised and self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # shutdown errors are irrelevant at close
                logger.debug("nvmlShutdown failed", exc_info=True)
            self._initialised = False
