"""Intel and AMD RAPL energy counters through the powercap sysfs interface.

Files read (below the injectable root), see Documentation/power/powercap/powercap.rst::

    /sys/class/powercap/intel-rapl:<i>            link to a top-level zone (one per package,
                                                  plus "psys" where the platform has it)
    /sys/class/powercap/intel-rapl:<i>:<j>        link to a sub-zone ("core", "uncore", "dram")
    /sys/class/powercap/intel-rapl-mmio:<i>       the same package counter read through MMIO
                                                  (Tiger Lake and later laptops): a duplicate
        name                  "package-<n>", "core", "uncore", "dram", "psys"
        energy_uj             energy counter, microjoules, wraps to 0 after max_energy_range_uj;
                              mode 0400 (root only) since the CVE-2020-8694 fix (Platypus)
        max_energy_range_uj   counter range, microjoules (world-readable)

AMD Zen CPUs expose their package and core counters through the same ``intel-rapl`` control
type (``intel_rapl_msr`` driver, Linux 5.8+), so this probe reads them too.

Why not pyRAPL: it hard-codes the ``/sys`` paths (it cannot read a fixture tree) and does not
handle the counter wrap, so powercap is read directly.

Counting rules, so nothing is counted twice:

* ``core`` and ``uncore`` lie inside their package: reported, never a power source.
* ``dram`` is outside the package (its own power plane): a ``dram`` source.
* ``psys`` covers the whole platform (packages, DRAM and more): a ``board_input`` source; the
  energy integrator then ignores the packages and DRAM.
* ``intel-rapl-mmio:<i>`` duplicates the package of the same name: used only when the MSR zone
  of that package is missing or unreadable.
* The package id comes from the zone's ``name`` (``package-1``), not from the directory index:
  ``intel-rapl:1`` may be ``psys`` while ``package-1`` is ``intel-rapl:2``.

Wrap-around: a reading below the previous one wrapped once, and the delta is
``max_energy_range_uj - prev + cur``; equal readings are a delta of 0, not a wrap. Two wraps
between reads cannot be detected, so an interval longer than the time the counter takes to
wrap at ``max_power_w`` (``max_energy_range_uj / max_power_w``: 524 s for the common
262143328850 uJ range at 500 W) is marked invalid and its energy is None rather than guessed.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from probes.base import Availability, LayoutCache, PowerCoverage, PowerReading, Probe

logger = logging.getLogger(__name__)

_ZONE = re.compile(r"^(intel-rapl(?:-mmio)?):(\d+)(?::(\d+))?$")
_PACKAGE = re.compile(r"^package-(\d+)$")

PERMISSION_REMEDY = (
    "RAPL energy_uj is readable by root only since the CVE-2020-8694 fix; grant the agent's "
    "group read access at boot instead of running as root, e.g. the udev rule "
    '\'SUBSYSTEM=="powercap", ACTION=="add", RUN+="/bin/chgrp edgelm /sys%p/energy_uj", '
    'RUN+="/bin/chmod g+r /sys%p/energy_uj"\' or the RAPL drop-in described in systemd/README.md'
)


@dataclass(frozen=True)
class RaplDomain:
    """One powercap zone.

    Attributes:
        zone: Zone directory name, e.g. ``intel-rapl:0:2`` (diagnosis only).
        name: Zone ``name``: ``package-0``, ``core``, ``uncore``, ``dram``, ``psys``.
        package_id: Package the zone belongs to, from the package zone's name; None for psys.
        source: Power source id when the zone is counted (``rapl:package-0``), else None.
        counted: True when the zone is a power source (not nested in one, not a duplicate).
        energy_uj: Raw counter, microjoules.
        energy_mj: Energy since the previous sample, mJ; None on the first sample or invalid.
        power_mw: Mean power since the previous sample, mW.
        valid: False when the interval was long enough to hide a wrap, or the read failed.
        reason: Why values are None; empty otherwise.
    """

    zone: str
    name: str
    package_id: int | None
    source: str | None
    counted: bool
    energy_uj: int | None
    energy_mj: float | None
    power_mw: float | None
    valid: bool
    reason: str


@dataclass(frozen=True)
class RaplReadings:
    """All RAPL zones.

    Attributes:
        domains: One entry per zone, top-level zones first.
        interval_s: Time since the previous sample, s; None on the first.
    """

    domains: tuple[RaplDomain, ...]
    interval_s: float | None


@dataclass(frozen=True)
class _Zone:
    zone: str
    path: str
    interface: str  # "intel-rapl" or "intel-rapl-mmio"
    top: int
    sub: int | None


@dataclass(frozen=True)
class _Layout:
    """The zones and their static attributes (``name``, package id, ``max_energy_range_uj``)."""

    zones: tuple[_Zone, ...]
    names: dict[str, str]
    pkg_of_top: dict[tuple[str, int], int | None]
    max_range_uj: dict[str, int | None]


def wrap_delta_uj(prev: int, cur: int, max_range_uj: int | None) -> int | None:
    """Counter delta with at most one wrap; None when it went backwards and the range is unknown.

    Args:
        prev: Previous counter value, microjoules.
        cur: Current counter value, microjoules.
        max_range_uj: ``max_energy_range_uj``.
    """
    if cur >= prev:
        return cur - prev
    if max_range_uj is None or max_range_uj <= 0 or prev > max_range_uj:
        return None
    return max_range_uj - prev + cur


class RaplProbe(Probe):
    """Package, DRAM and platform energy from powercap, with wrap handling.

    Args:
        root: Filesystem root (``/`` in production, a fixture tree in tests).
        max_power_w: Highest power one zone can draw, W; sets the longest interval in which a
            wrap is still detectable (see module docstring).
        clock: Monotonic clock, s (injectable for tests).
        rediscover_s: How long the discovered zones are trusted before they are re-read, s.
    """

    name = "rapl"

    def __init__(
        self,
        root: str | os.PathLike[str] = "/",
        *,
        max_power_w: float = 500.0,
        clock: Callable[[], float] = time.monotonic,
        rediscover_s: float = 60.0,
    ) -> None:
        super().__init__(root)
        self._max_power_w = max_power_w
        self._clock = clock
        self._prev: dict[str, int] = {}
        self._prev_t: float | None = None
        # Only energy_uj changes; reading the rest (12 files on a 2-package machine) every
        # tick was ~90 % of the probe's cost.
        self._layout = LayoutCache(self._discover, max_age_s=rediscover_s, clock=clock)

    def _zones(self) -> list[_Zone]:
        zones: list[_Zone] = []
        for p in self.fs.glob("/sys/class/powercap", "intel-rapl*"):
            m = _ZONE.match(p.name)
            if m is None:
                continue
            zones.append(
                _Zone(
                    zone=p.name,
                    path=f"/sys/class/powercap/{p.name}",
                    interface=m.group(1),
                    top=int(m.group(2)),
                    sub=int(m.group(3)) if m.group(3) is not None else None,
                )
            )
        zones.sort(key=lambda z: (z.interface, z.top, -1 if z.sub is None else z.sub))
        return zones

    def _discover(self) -> _Layout:
        """Zones, their names, package ids and counter ranges: fixed while the driver is loaded."""
        zones = self._zones()
        names = {z.zone: self.fs.read_text(f"{z.path}/name") or "" for z in zones}
        pkg_of_top: dict[tuple[str, int], int | None] = {}
        for z in zones:
            if z.sub is None:
                m = _PACKAGE.match(names[z.zone])
                pkg_of_top[(z.interface, z.top)] = int(m.group(1)) if m else None
        max_range = {z.zone: self.fs.read_int(f"{z.path}/max_energy_range_uj") for z in zones}
        return _Layout(tuple(zones), names, pkg_of_top, max_range)

    def check(self) -> Availability:
        """Available when at least one zone's ``energy_uj`` can be read."""
        zones = self._zones()
        if not zones:
            return Availability(
                False,
                "no RAPL zones under /sys/class/powercap (not an Intel/AMD x86 machine, or the "
                "intel_rapl_msr module is not loaded: modprobe intel_rapl_msr)",
            )
        denied = 0
        for z in zones:
            text, err = self.fs.read_text_or_errno(f"{z.path}/energy_uj")
            if text is not None:
                return Availability(True)
            if err in (errno.EACCES, errno.EPERM):
                denied += 1
        if denied:
            return Availability(False, PERMISSION_REMEDY)
        return Availability(False, "RAPL zones found but no energy_uj could be read")

    def sample(self) -> RaplReadings:
        """Read every zone's counter and turn it into a delta since the previous sample."""
        now = self._clock()
        interval = now - self._prev_t if self._prev_t is not None else None
        self._prev_t = now
        layout = self._layout.get()
        zones, names, pkg_of_top = layout.zones, layout.names, layout.pkg_of_top

        raw: dict[str, tuple[int | None, str]] = {}
        for z in zones:
            text, err = self.fs.read_text_or_errno(f"{z.path}/energy_uj")
            if text is None:
                if err == errno.ENOENT:
                    self._layout.invalidate()  # zone gone (module unloaded): rediscover
                why = "permission denied (root only)" if err == errno.EACCES else "unreadable"
                raw[z.zone] = (None, why)
                continue
            try:
                raw[z.zone] = (int(text.split()[0]), "")
            except (ValueError, IndexError):
                raw[z.zone] = (None, f"malformed energy_uj {text!r}")

        msr_packages = {
            pkg_of_top[("intel-rapl", z.top)]
            for z in zones
            if z.interface == "intel-rapl" and z.sub is None and raw[z.zone][0] is not None
        }

        domains: list[RaplDomain] = []
        for z in zones:
            name = names[z.zone]
            pkg = pkg_of_top.get((z.interface, z.top))
            source, counted = self._classify(z, name, pkg, msr_packages)
            value, why = raw[z.zone]
            energy_mj: float | None = None
            power_mw: float | None = None
            valid = value is not None
            prev = self._prev.get(z.zone)
            if value is not None:
                self._prev[z.zone] = value
                if prev is not None and interval is not None and interval > 0:
                    max_range = layout.max_range_uj[z.zone]
                    if max_range and interval >= max_range / (self._max_power_w * 1e6):
                        valid = False
                        why = (
                            f"{interval:.1f} s since the previous read could hide a counter wrap; "
                            "sample more often"
                        )
                    else:
                        delta = wrap_delta_uj(prev, value, max_range)
                        if delta is None:
                            valid = False
                            why = "counter went backwards and max_energy_range_uj is unreadable"
                        else:
                            energy_mj = delta / 1000.0
                            power_mw = energy_mj / interval
            else:
                self._prev.pop(z.zone, None)
            domains.append(
                RaplDomain(
                    zone=z.zone,
                    name=name,
                    package_id=pkg,
                    source=source,
                    counted=counted,
                    energy_uj=value,
                    energy_mj=energy_mj,
                    power_mw=power_mw,
                    valid=valid,
                    reason=why,
                )
            )
        return RaplReadings(domains=tuple(domains), interval_s=interval)

    @staticmethod
    def _classify(
        z: _Zone, name: str, pkg: int | None, msr_packages: set[int | None]
    ) -> tuple[str | None, bool]:
        prefix = "rapl" if z.interface == "intel-rapl" else "rapl-mmio"
        if z.sub is None:
            if name == "psys":
                return f"{prefix}:psys", True
            if _PACKAGE.match(name):
                if z.interface == "intel-rapl-mmio" and pkg in msr_packages:
                    return None, False  # duplicate of the MSR package counter
                return f"{prefix}:{name}", True
            if name == "dram":  # some servers expose DRAM as a top-level zone
                return f"{prefix}:dram", True
            return None, False
        if name == "dram":
            return f"{prefix}:dram-{pkg if pkg is not None else z.top}", True
        return None, False  # core / uncore: inside the package

    def power(self, readings: RaplReadings) -> list[PowerReading]:
        """One counter source per counted zone (package, DRAM, psys)."""
        out: list[PowerReading] = []
        for d in readings.domains:
            if not d.counted or d.source is None:
                continue
            if d.name == "psys":
                covers = PowerCoverage.BOARD_INPUT
            elif d.name == "dram":
                covers = PowerCoverage.DRAM
            else:
                covers = PowerCoverage.CPU_PACKAGE
            out.append(PowerReading(d.source, covers, d.power_mw, d.energy_mj, d.valid))
        return out
