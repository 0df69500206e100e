"""Temperatures from the thermal framework and from hwmon, keyed by what the sensor is.

Files read (below the injectable root)::

    /sys/class/thermal/thermal_zone<N>/type     zone type, e.g. "cpu-thermal" (Raspberry Pi),
                                                "cpu-thermal", "gpu-thermal", "tj-thermal"
                                                (Jetson Orin), "x86_pkg_temp", "acpitz"
    /sys/class/thermal/thermal_zone<N>/temp     milli-degrees Celsius, integer
                                                (Documentation/driver-api/thermal/sysfs-api.rst)
    /sys/class/hwmon/hwmon<N>/name              chip name, e.g. "coretemp", "k10temp",
                                                "cpu_thermal", "nvme"
    /sys/class/hwmon/hwmon<N>/temp<i>_input     milli-degrees Celsius
    /sys/class/hwmon/hwmon<N>/temp<i>_label     optional channel label, e.g. "Package id 0"
    /sys/class/hwmon/hwmon<N>/temp<i>_max       optional, milli-degrees Celsius
    /sys/class/hwmon/hwmon<N>/temp<i>_crit      optional, milli-degrees Celsius
                                                (Documentation/hwmon/sysfs-interface.rst)

Zones are keyed by ``type`` and hwmon chips by ``name``, never by their number: thermal zone
and hwmon numbers follow driver probe order and change across boots and kernels. Two chips
with the same name (two NVMe drives, two coretemp packages) are told apart by the device they
belong to (the ``device`` link's target, e.g. ``coretemp.1``), which is stable.

A zone whose read fails (some drivers answer EINVAL or ENODATA while the sensor is powered
down) gives None. Tegra kernels report -256000 for zones whose sensor is off; any value below
-100 degrees C is such a placeholder and gives None rather than a temperature.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from probes.base import Availability, LayoutCache, Probe

logger = logging.getLogger(__name__)

_MIN_PLAUSIBLE_MC = -100_000
_TEMP_INPUT = re.compile(r"^temp(\d+)_input$")


@dataclass(frozen=True)
class ZoneReading:
    """One thermal zone.

    Attributes:
        zone: Kernel zone directory (``thermal_zone3``), for diagnosis only: it changes.
        temp_c: Temperature, degrees Celsius; None when the read failed or is a placeholder.
    """

    zone: str
    temp_c: float | None


@dataclass(frozen=True)
class HwmonTempReading:
    """One hwmon temperature channel.

    Attributes:
        temp_c: ``temp<i>_input``, degrees Celsius.
        max_c: ``temp<i>_max``, degrees Celsius, when the chip has one.
        crit_c: ``temp<i>_crit``, degrees Celsius, when the chip has one.
    """

    temp_c: float | None
    max_c: float | None
    crit_c: float | None


@dataclass(frozen=True)
class ThermalReadings:
    """All temperatures.

    Attributes:
        zones: Zone type -> reading (duplicate types get ``#2``, ``#3`` in zone order).
        hwmon: Chip key (``name``, or ``name@device`` when names repeat) -> channel label (or
            ``temp<i>``) -> reading.
        max_temp_c: Hottest valid value over zones and hwmon channels, degrees Celsius.
    """

    zones: dict[str, ZoneReading]
    hwmon: dict[str, dict[str, HwmonTempReading]]
    max_temp_c: float | None


def _mc_to_c(value: int | None) -> float | None:
    if value is None or value < _MIN_PLAUSIBLE_MC:
        return None
    return value / 1000.0


@dataclass(frozen=True)
class _Layout:
    """What to read each tick.

    Attributes:
        zones: (key, zone directory name, machine path of ``temp``).
        channels: (chip key, channel label, machine path of ``temp<i>_input``, max_c, crit_c).
    """

    zones: tuple[tuple[str, str, str], ...]
    channels: tuple[tuple[str, str, str, float | None, float | None], ...]


class ThermalProbe(Probe):
    """Thermal zones by type and hwmon temperatures by chip name.

    Args:
        root: Filesystem root (``/`` in production, a fixture tree in tests).
        hwmon_names: Only these hwmon chip names (all when None).
        ignore_types: Zone types not reported. Default: Jetson's ``PMIC-Die``, which reports a
            fixed 100 degrees C and is not a measurement.
        rediscover_s: How long the discovered list of files is trusted before it is rebuilt
            (sooner when a file vanishes), s.
    """

    name = "thermal"

    def __init__(
        self,
        root: str | os.PathLike[str] = "/",
        *,
        hwmon_names: Sequence[str] | None = None,
        ignore_types: Sequence[str] = ("PMIC-Die",),
        rediscover_s: float = 60.0,
    ) -> None:
        super().__init__(root)
        self._hwmon_names = set(hwmon_names) if hwmon_names is not None else None
        self._ignore = set(ignore_types)
        self._layout = LayoutCache(self._discover, max_age_s=rediscover_s)

    def check(self) -> Availability:
        """Available when at least one zone or hwmon temperature channel exists."""
        zones = self.fs.glob("/sys/class/thermal", "thermal_zone*")
        hwmons = [h for h in self._hwmon_dirs() if self._temp_channels(h)]
        if not zones and not hwmons:
            return Availability(
                False,
                "no thermal zones (/sys/class/thermal/thermal_zone*) and no hwmon temperature "
                "channels (/sys/class/hwmon/hwmon*/temp*_input)",
            )
        return Availability(True)

    def sample(self) -> ThermalReadings:
        """Read every zone and hwmon temperature channel; unreadable values are None.

        Which files to read comes from a cached layout (:class:`probes.base.LayoutCache`):
        only the ``temp``/``temp<i>_input`` files are read each tick. A file that vanished
        (ENOENT: a hot-unplugged drive) makes the next tick rediscover.
        """
        layout = self._layout.get()
        vanished = False

        def temp(path: str) -> float | None:
            nonlocal vanished
            text, err = self.fs.read_text_or_errno(path)
            if err == errno.ENOENT:
                vanished = True
            try:
                return _mc_to_c(int(text.split()[0])) if text else None
            except ValueError:
                return None

        zones = {key: ZoneReading(zone=zone, temp_c=temp(path)) for key, zone, path in layout.zones}
        hwmon: dict[str, dict[str, HwmonTempReading]] = {}
        for chip, label, path, max_c, crit_c in layout.channels:
            hwmon.setdefault(chip, {})[label] = HwmonTempReading(temp(path), max_c, crit_c)
        if vanished:
            self._layout.invalidate()
        temps = [z.temp_c for z in zones.values() if z.temp_c is not None]
        temps += [c.temp_c for ch in hwmon.values() for c in ch.values() if c.temp_c is not None]
        return ThermalReadings(zones=zones, hwmon=hwmon, max_temp_c=max(temps) if temps else None)

    def _discover(self) -> _Layout:
        """Find the zones and channels to read, with their stable keys and static limits."""
        zones: list[tuple[str, str, str]] = []
        seen: dict[str, None] = {}
        for zdir in self.fs.glob("/sys/class/thermal", "thermal_zone*"):
            zpath = self.fs.machine_path(zdir)
            ztype = self.fs.read_text(f"{zpath}/type") or zdir.name
            if ztype in self._ignore:
                continue
            key = _unique(seen, ztype)
            seen[key] = None
            zones.append((key, zdir.name, f"{zpath}/temp"))

        chips: list[tuple[str, str, list[tuple[str, str, float | None, float | None]]]] = []
        for hdir in self._hwmon_dirs():
            hpath = self.fs.machine_path(hdir)
            name = self.fs.read_text(f"{hpath}/name") or hdir.name
            if self._hwmon_names is not None and name not in self._hwmon_names:
                continue
            labels: dict[str, None] = {}
            channels = []
            for idx in self._temp_channels(hdir):
                label = _unique(labels, self.fs.read_text(f"{hpath}/temp{idx}_label")
                                or f"temp{idx}")
                labels[label] = None
                # Limits are trip points set by the driver or firmware: read once per layout.
                channels.append((label, f"{hpath}/temp{idx}_input",
                                 _mc_to_c(self.fs.read_int(f"{hpath}/temp{idx}_max")),
                                 _mc_to_c(self.fs.read_int(f"{hpath}/temp{idx}_crit"))))
            if channels:
                chips.append((name, self._device_id(hdir), channels))

        names = [c[0] for c in chips]
        keys: dict[str, None] = {}
        flat: list[tuple[str, str, str, float | None, float | None]] = []
        for name, device, channels in chips:
            key = _unique(keys, name if names.count(name) == 1 else f"{name}@{device}")
            keys[key] = None
            flat += [(key, *ch) for ch in channels]
        return _Layout(zones=tuple(zones), channels=tuple(flat))

    def _hwmon_dirs(self) -> list[Path]:
        return self.fs.glob("/sys/class/hwmon", "hwmon*")

    def _temp_channels(self, hdir: Path) -> list[int]:
        try:
            names = os.listdir(hdir)
        except OSError:
            return []
        found = (_TEMP_INPUT.match(n) for n in names)
        return sorted(int(m.group(1)) for m in found if m)

    def _device_id(self, hdir: Path) -> str:
        link = hdir / "device"
        if not link.exists():
            return hdir.name
        return Path(os.path.realpath(link)).name


def _unique(existing: Mapping[str, object], key: str) -> str:
    if key not in existing:
        return key
    n = 2
    while f"{key}#{n}" in existing:
        n += 1
    return f"{key}#{n}"
