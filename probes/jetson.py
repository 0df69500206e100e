"""NVIDIA Jetson power rails (INA3221), iGPU load and clock, and board identity.

Files read (below the injectable root)::

    JetPack 5/6 (Orin, Xavier on L4T 35+): hwmon driver, Documentation/hwmon/ina3221.rst
    /sys/bus/i2c/devices/<bus>-00<addr>/name                 "ina3221"
    /sys/bus/i2c/devices/<bus>-00<addr>/hwmon/hwmon<N>/
        in[1-3]_label      rail name, e.g. "VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"; "NC" = unused
        in[1-3]_input      bus voltage, mV
        curr[1-3]_input    current, mA
        in7_*              "sum of shunt voltages" (not a rail; never read)

    JetPack <= 4 (Nano, TX2, Xavier on L4T 32): NVIDIA's iio driver
    /sys/bus/i2c/devices/<bus>-00<addr>/name                 "ina3221x"
    /sys/bus/i2c/devices/<bus>-00<addr>/iio:device<N>/
        rail_name_<n>        rail name, e.g. "POM_5V_IN", "POM_5V_GPU", "POM_5V_CPU"
        in_power<n>_input    power, mW
        in_current<n>_input  current, mA
        in_voltage<n>_input  voltage, mV

    /sys/class/devfreq/<dev>/   the iGPU (``device/of_node/name`` is "gpu"; dev 17000000.ga10b,
                                17000000.gpu, 57000000.gpu, ...): cur_freq, min_freq, max_freq
                                (Hz), governor; ``device/load`` is the busy share in per-mille
    /etc/nv_tegra_release       "# R36 (release), REVISION: 3.0, ..." (L4T release)
    /proc/device-tree/model     NUL-terminated board name

Power is mV * mA / 1000 = mW on hwmon; the iio driver reports mW directly. The board-input rail
(``VDD_IN`` on Orin Nano/NX, ``POM_5V_IN`` on Nano/TX2, ``VIN`` on Thor) already contains every
other rail, so it alone is the total and sub-rails are never added to it. A board without one
(AGX Orin: VDD_GPU_SOC, VDD_CPU_CV, VIN_SYS_5V0, VDDQ_VDD2_1V8AO) reports the sum of its rails,
labelled ``rails_sum``; that sum misses the carrier board's conversion losses.

jetson-stats (jtop) is AGPL-3.0 and only an optional extra: when it is installed and its
``jtop.service`` answers, rails are read through it; when the service is missing or stops,
the probe falls back to sysfs, reports itself degraded with the reason, and retries the
service with exponential backoff. Nothing of jetson-stats' code is used, only its client API.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from probes.base import Availability, LayoutCache, PowerCoverage, PowerReading, Probe

logger = logging.getLogger(__name__)

TOTAL_RAILS = ("VDD_IN", "POM_5V_IN", "VIN")
_NC = re.compile(r"(^|_)NC($|_)")
_L4T = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)")
_GPU_DEV = re.compile(r"(gpu|ga10b|gv11b|gp10b|gb10b)", re.IGNORECASE)


@dataclass(frozen=True)
class JetsonRail:
    """One INA3221 channel.

    Attributes:
        voltage_mv: Bus voltage, mV.
        current_ma: Current, mA.
        power_mw: Power, mW (hwmon: voltage * current / 1000; iio: ``in_power<n>_input``).
    """

    voltage_mv: float | None
    current_ma: float | None
    power_mw: float | None


@dataclass(frozen=True)
class JetsonReadings:
    """Jetson board state.

    Attributes:
        model: ``/proc/device-tree/model``.
        l4t_release: L4T release from ``/etc/nv_tegra_release``, e.g. ``"R36.3.0"``.
        backend: ``"jtop"`` or ``"sysfs"``: where the rails were read.
        backend_reason: Why jtop is not used (empty when it is, or was never configured).
        rails: Rail name -> reading (``NC`` channels and the shunt sum excluded).
        total_power_mw: Board-input rail, or the sum of rails when there is none, mW.
        total_source: Rail used as the total, or ``"rails_sum"``; None without rails.
        gpu_load_pct: iGPU busy share, percent (``device/load`` per-mille / 10).
        gpu_cur_freq_hz: iGPU clock, Hz.
        gpu_min_freq_hz: iGPU devfreq minimum, Hz.
        gpu_max_freq_hz: iGPU devfreq maximum, Hz.
        gpu_governor: iGPU devfreq governor.
    """

    model: str | None
    l4t_release: str | None
    backend: str
    backend_reason: str
    rails: dict[str, JetsonRail]
    total_power_mw: float | None
    total_source: str | None
    gpu_load_pct: float | None
    gpu_cur_freq_hz: int | None
    gpu_min_freq_hz: int | None
    gpu_max_freq_hz: int | None
    gpu_governor: str | None


@dataclass(frozen=True)
class _Layout:
    """What the sysfs path reads each tick, and the static identity.

    Attributes:
        rails: (label, voltage file, current file, power file or "", is_iio).
        gpu: Machine path of the iGPU devfreq node, or None.
        model / l4t_release: Board identity (does not change while running).
    """

    rails: tuple[tuple[str, str, str, str, bool], ...]
    gpu: str | None
    model: str | None
    l4t_release: str | None


class JtopClient(Protocol):
    """The part of ``jtop.jtop`` (jetson-stats >= 4.2) this probe uses."""

    def start(self) -> None:
        """Connect to jtop.service; raises when it is not active."""
        ...

    def ok(self) -> bool:
        """True while the connection delivers data."""
        ...

    def close(self) -> None:
        """Disconnect."""
        ...

    @property
    def power(self) -> Any:
        """``{"rail": {name: {"volt": mV, "curr": mA, "power": mW, ...}}, "tot": {...}}``."""
        ...


def _default_jtop_factory() -> JtopClient:
    import jtop  # optional, AGPL-3.0: imported only here, only when enabled

    client: JtopClient = jtop.jtop()
    return client


def parse_l4t_release(text: str | None) -> str | None:
    """``"# R35 (release), REVISION: 4.1, ..."`` -> ``"R35.4.1"``."""
    if not text:
        return None
    m = _L4T.search(text)
    return f"R{m.group(1)}.{m.group(2)}" if m else None


def _is_rail_label(label: str) -> bool:
    return bool(label) and not _NC.search(label) and "sum" not in label.lower()


def _total(rails: dict[str, JetsonRail]) -> tuple[float | None, str | None]:
    if not rails:
        return None, None
    for name in TOTAL_RAILS:
        if name in rails:
            return rails[name].power_mw, name
    values = [r.power_mw for r in rails.values()]
    if any(v is None for v in values):
        return None, "rails_sum"  # a missing rail would make the sum a silent underestimate
    return sum(v for v in values if v is not None), "rails_sum"


class JetsonProbe(Probe):
    """INA3221 rails, iGPU load/clock and board identity on NVIDIA Jetson.

    Args:
        root: Filesystem root (``/`` in production, a fixture tree in tests).
        use_jtop: Read rails through jtop.service when jetson-stats is installed.
        jtop_factory: Builds the jtop client (tests pass a fake); default imports ``jtop``.
        retry_initial_s: First delay before retrying an unavailable jtop service, s.
        retry_max_s: Longest retry delay, s.
        clock: Monotonic clock, s.
        rediscover_s: How long the discovered rail files and devfreq node are trusted, s.
    """

    name = "jetson"

    def __init__(
        self,
        root: str | os.PathLike[str] = "/",
        *,
        use_jtop: bool = True,
        jtop_factory: Callable[[], JtopClient] | None = None,
        retry_initial_s: float = 5.0,
        retry_max_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        rediscover_s: float = 60.0,
    ) -> None:
        super().__init__(root)
        self._use_jtop = use_jtop
        self._jtop_factory = jtop_factory or _default_jtop_factory
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._clock = clock
        self._jtop: JtopClient | None = None
        self._retry_at = float("-inf")
        self._backoff_s = retry_initial_s
        self._jtop_reason = ""
        self._jtop_missing = False
        self._layout = LayoutCache(self._discover, max_age_s=rediscover_s, clock=clock)

    # -- identity and discovery --------------------------------------------------------------

    def _model(self) -> str | None:
        text = self.fs.read_text("/proc/device-tree/model")
        return text.rstrip("\x00").strip() or None if text else None

    def _ina_devices(self, driver: str) -> list[str]:
        out = []
        for dev in self.fs.glob("/sys/bus/i2c/devices", "*"):
            path = self.fs.machine_path(dev)
            if self.fs.read_text(f"{path}/name") == driver:
                out.append(path)
        return out

    def _discover(self) -> _Layout:
        """Find the rail files, the iGPU devfreq node and the board identity (static facts).

        Walking ``/sys/bus/i2c/devices`` reads every device's ``name``; done once per layout,
        not per tick.
        """
        rails: list[tuple[str, str, str, str, bool]] = []
        for dev in self._ina_devices("ina3221"):
            for hw in self.fs.glob(f"{dev}/hwmon", "hwmon*"):
                h = self.fs.machine_path(hw)
                for ch in (1, 2, 3):
                    label = self.fs.read_text(f"{h}/in{ch}_label")
                    if label is not None and _is_rail_label(label):
                        rails.append((label, f"{h}/in{ch}_input", f"{h}/curr{ch}_input", "",
                                      False))
        for dev in self._ina_devices("ina3221x"):
            for iio in self.fs.glob(dev, "iio:device*"):
                d = self.fs.machine_path(iio)
                for rn in self.fs.glob(d, "rail_name_*"):
                    n = rn.name.rsplit("_", 1)[-1]
                    label = self.fs.read_text(f"{d}/rail_name_{n}")
                    if label is not None and _is_rail_label(label):
                        rails.append((label, f"{d}/in_voltage{n}_input",
                                      f"{d}/in_current{n}_input", f"{d}/in_power{n}_input", True))
        return _Layout(
            rails=tuple(rails),
            gpu=self._gpu_devfreq(),
            model=self._model(),
            l4t_release=parse_l4t_release(self.fs.read_text("/etc/nv_tegra_release")),
        )

    def _sysfs_rails(self) -> dict[str, JetsonRail]:
        """Rails from the cached layout: hwmon gives mV and mA (power = V x I), iio gives mW."""
        out: dict[str, JetsonRail] = {}
        for label, mv_path, ma_path, mw_path, iio in self._layout.get().rails:
            mv = self.fs.read_int(mv_path)
            ma = self.fs.read_int(ma_path)
            if iio:
                mw_i = self.fs.read_int(mw_path)
                mw = float(mw_i) if mw_i is not None else None
            else:
                mw = mv * ma / 1000.0 if mv is not None and ma is not None else None
            if mv is None and ma is None and not self.fs.exists(mv_path):
                self._layout.invalidate()  # the device went away: rediscover next tick
            out[label] = JetsonRail(float(mv) if mv is not None else None,
                                    float(ma) if ma is not None else None, mw)
        return out

    def _gpu_devfreq(self) -> str | None:
        for dev in self.fs.glob("/sys/class/devfreq", "*"):
            path = self.fs.machine_path(dev)
            of_name = self.fs.read_text(f"{path}/device/of_node/name") or ""
            if "gpu" in of_name or _GPU_DEV.search(dev.name):
                return path
        return None

    # -- jtop ----------------------------------------------------------------------------------

    def _jtop_rails(self) -> dict[str, JetsonRail] | None:
        if not self._use_jtop or self._jtop_missing:
            return None
        now = self._clock()
        if self._jtop is None:
            if now < self._retry_at:
                return None
            try:
                client = self._jtop_factory()
                client.start()
            except ImportError:
                self._jtop_missing = True
                self._jtop_reason = ""
                logger.debug("jetson-stats not installed: rails read from sysfs")
                return None
            except Exception as exc:
                self._schedule_retry(now, f"jtop.service unavailable ({exc})")
                return None
            self._jtop = client
            self._backoff_s = self._retry_initial_s
            self._jtop_reason = ""
        try:
            if not self._jtop.ok():
                raise RuntimeError("jtop connection lost")
            return self._parse_jtop_power(self._jtop.power)
        except Exception as exc:
            try:
                self._jtop.close()
            except Exception:  # closing a dead client must not fail the sample
                logger.debug("closing jtop failed", exc_info=True)
            self._jtop = None
            self._schedule_retry(now, f"jtop.service stopped answering ({exc})")
            return None

    def _schedule_retry(self, now: float, why: str) -> None:
        self._retry_at = now + self._backoff_s
        self._jtop_reason = f"{why}; reading rails from sysfs, retry in {self._backoff_s:.0f} s"
        logger.warning("jetson: %s", self._jtop_reason)
        self._backoff_s = min(self._retry_max_s, self._backoff_s * 2)

    @staticmethod
    def _parse_jtop_power(power: Any) -> dict[str, JetsonRail]:
        rails: dict[str, JetsonRail] = {}
        for name, rail in dict(power["rail"]).items():
            if not _is_rail_label(str(name)) or not rail.get("online", True):
                continue

            def num(key: str, r: Any = rail) -> float | None:
                v = r.get(key)
                return float(v) if isinstance(v, (int, float)) else None

            rails[str(name)] = JetsonRail(num("volt"), num("curr"), num("power"))
        return rails

    # -- probe ---------------------------------------------------------------------------------

    def check(self) -> Availability:
        """Available on a Jetson with INA3221 rails or an iGPU devfreq node."""
        is_jetson = self.fs.exists("/etc/nv_tegra_release") or "jetson" in (
            (self._model() or "").lower()
        )
        has_rails = bool(self._ina_devices("ina3221") or self._ina_devices("ina3221x"))
        has_gpu = self._gpu_devfreq() is not None
        if not is_jetson and not has_rails:
            return Availability(False, "not a Jetson (no /etc/nv_tegra_release, no INA3221)")
        if not has_rails and not has_gpu:
            return Availability(False, "Jetson without readable INA3221 rails or iGPU devfreq")
        if self._jtop_reason:
            return Availability(True, self._jtop_reason, degraded=True)
        if not has_rails:
            return Availability(True, "no INA3221 rails: power unavailable", degraded=True)
        return Availability(True)

    def sample(self) -> JetsonReadings:
        """Read rails (jtop when it answers, else sysfs), the iGPU and identity."""
        rails = self._jtop_rails()
        backend = "jtop"
        if rails is None:
            rails = self._sysfs_rails()
            backend = "sysfs"
        total, total_source = _total(rails)
        layout = self._layout.get()
        gpu = layout.gpu
        load = self.fs.read_int(f"{gpu}/device/load") if gpu else None
        return JetsonReadings(
            model=layout.model,
            l4t_release=layout.l4t_release,
            backend=backend,
            backend_reason=self._jtop_reason,
            rails=rails,
            total_power_mw=total,
            total_source=total_source,
            gpu_load_pct=load / 10.0 if load is not None else None,
            gpu_cur_freq_hz=self.fs.read_int(f"{gpu}/cur_freq") if gpu else None,
            gpu_min_freq_hz=self.fs.read_int(f"{gpu}/min_freq") if gpu else None,
            gpu_max_freq_hz=self.fs.read_int(f"{gpu}/max_freq") if gpu else None,
            gpu_governor=self.fs.read_text(f"{gpu}/governor") if gpu else None,
        )

    def power(self, readings: JetsonReadings) -> list[PowerReading]:
        """One board-input source: the input rail, or the labelled sum of rails."""
        if readings.total_source is None:
            return []
        return [
            PowerReading(
                f"jetson:{readings.total_source}",
                PowerCoverage.BOARD_INPUT,
                readings.total_power_mw,
            )
        ]

    def close(self) -> None:
        """Disconnect from jtop.service."""
        if self._jtop is not None:
            try:
                self._jtop.close()
            finally:
                self._jtop = None
