"""CPU utilisation, clocks and load from procfs and the cpufreq sysfs interface.

Files read (below the injectable root)::

    /proc/stat                      "cpu  user nice system idle iowait irq softirq steal guest
                                    guest_nice" then one "cpuN ..." line per online CPU, in
                                    USER_HZ ticks since boot (proc(5)).
    /proc/loadavg                   "0.52 0.58 0.59 3/154 6985": 1, 5, 15 minute load averages
                                    (runnable + uninterruptible tasks), then running/total tasks.
    /sys/devices/system/cpu/cpuN/cpufreq/
        scaling_cur_freq            current frequency, kHz
                                    (Documentation/admin-guide/pm/cpufreq.rst)
        scaling_min_freq            policy minimum, kHz
        scaling_max_freq            policy maximum, kHz
        scaling_governor            governor name, e.g. "schedutil", "ondemand", "performance"

``guest`` and ``guest_nice`` are already counted inside ``user`` and ``nice`` (kernel
``fs/proc/stat.c`` accounts guest time into both), so they are excluded from the total to avoid
counting them twice. Busy time is everything except ``idle`` and ``iowait``.

Utilisation is a rate: the first sample, a CPU that appeared since the previous sample, and an
interval in which the counters did not advance (or went backwards after a hotplug) all give
``None``. Frequencies stay in kHz, the unit the kernel uses, so no precision is lost.
``cpuinfo_cur_freq`` is not used: it is readable by root only.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

from probes.base import Availability, Probe, ProbeError

logger = logging.getLogger(__name__)

_CPU_LINE = re.compile(r"^cpu(\d*)\s+(.*)$")


@dataclass(frozen=True)
class CoreReading:
    """One logical CPU.

    Attributes:
        cpu: Logical CPU number (the N of ``cpuN``).
        util_pct: Busy share of the last interval, 0-100; None on the first sample.
        cur_freq_khz: ``scaling_cur_freq``, kHz; None without cpufreq (VMs, some containers).
        min_freq_khz: ``scaling_min_freq``, kHz.
        max_freq_khz: ``scaling_max_freq``, kHz.
        governor: ``scaling_governor``; None without cpufreq.
    """

    cpu: int
    util_pct: float | None
    cur_freq_khz: int | None
    min_freq_khz: int | None
    max_freq_khz: int | None
    governor: str | None


@dataclass(frozen=True)
class CpuReadings:
    """Machine-wide CPU state.

    Attributes:
        util_pct: Busy share of all CPUs over the last interval, 0-100; None on the first sample.
        core_count: Online logical CPUs (``cpuN`` lines in /proc/stat).
        load_1m: 1-minute load average (tasks, dimensionless); None if /proc/loadavg is absent.
        load_5m: 5-minute load average.
        load_15m: 15-minute load average.
        cores: One :class:`CoreReading` per online CPU, in CPU order.
    """

    util_pct: float | None
    core_count: int | None
    load_1m: float | None
    load_5m: float | None
    load_15m: float | None
    cores: tuple[CoreReading, ...]


@dataclass(frozen=True)
class _Ticks:
    busy: int
    total: int


def parse_proc_stat(text: str) -> dict[str, _Ticks]:
    """Parse the ``cpu`` lines of /proc/stat into busy/total tick counts.

    Args:
        text: Content of /proc/stat.

    Returns:
        Mapping from ``"cpu"`` (aggregate) and ``"cpuN"`` to tick counts.

    Raises:
        ProbeError: When a ``cpu`` line has fewer than 4 numeric fields.
    """
    out: dict[str, _Ticks] = {}
    for line in text.splitlines():
        m = _CPU_LINE.match(line)
        if m is None:
            continue
        try:
            fields = [int(v) for v in m.group(2).split()]
        except ValueError as exc:
            raise ProbeError(f"malformed /proc/stat line: {line!r}") from exc
        if len(fields) < 4:
            raise ProbeError(f"malformed /proc/stat line: {line!r}")
        # user nice system idle iowait irq softirq steal [guest guest_nice]
        base = fields[:8]
        idle = base[3] + (base[4] if len(base) > 4 else 0)
        total = sum(base)
        out["cpu" + m.group(1)] = _Ticks(busy=total - idle, total=total)
    return out


def _util_pct(prev: _Ticks | None, cur: _Ticks) -> float | None:
    if prev is None:
        return None
    d_total = cur.total - prev.total
    d_busy = cur.busy - prev.busy
    if d_total <= 0 or d_busy < 0:
        return None
    return min(100.0, max(0.0, 100.0 * d_busy / d_total))


class CpuProbe(Probe):
    """Total and per-core utilisation, cpufreq clocks and governor, load average.

    Args:
        root: Filesystem root (``/`` in production, a fixture tree in tests).
    """

    name = "cpu"

    def __init__(self, root: str | os.PathLike[str] = "/") -> None:
        super().__init__(root)
        self._prev: dict[str, _Ticks] = {}

    def check(self) -> Availability:
        """Available when /proc/stat can be read and parsed."""
        text, err = self.fs.read_text_or_errno("/proc/stat")
        if text is None:
            return Availability(
                False, f"cannot read {self.fs.path('/proc/stat')}: {os.strerror(err or 0)}"
            )
        try:
            ticks = parse_proc_stat(text)
        except ProbeError as exc:
            return Availability(False, str(exc))
        if "cpu" not in ticks:
            return Availability(False, "/proc/stat has no aggregate 'cpu' line")
        if not self.fs.exists("/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq"):
            return Availability(
                True, "no cpufreq interface: clocks and governor unavailable", degraded=True
            )
        return Availability(True)

    def sample(self) -> CpuReadings:
        """Read /proc/stat, /proc/loadavg and cpufreq.

        Raises:
            ProbeError: When /proc/stat is missing or malformed.
        """
        text = self.fs.read_text("/proc/stat")
        if text is None:
            raise ProbeError(f"cannot read {self.fs.path('/proc/stat')}")
        ticks = parse_proc_stat(text)
        if "cpu" not in ticks:
            raise ProbeError("/proc/stat has no aggregate 'cpu' line")
        prev, self._prev = self._prev, ticks

        cores: list[CoreReading] = []
        for key in sorted((k for k in ticks if k != "cpu"), key=lambda k: int(k[3:])):
            n = int(key[3:])
            freq_dir = f"/sys/devices/system/cpu/cpu{n}/cpufreq"
            cores.append(
                CoreReading(
                    cpu=n,
                    util_pct=_util_pct(prev.get(key), ticks[key]),
                    cur_freq_khz=self.fs.read_int(f"{freq_dir}/scaling_cur_freq"),
                    min_freq_khz=self.fs.read_int(f"{freq_dir}/scaling_min_freq"),
                    max_freq_khz=self.fs.read_int(f"{freq_dir}/scaling_max_freq"),
                    governor=self.fs.read_text(f"{freq_dir}/scaling_governor") or None,
                )
            )
        load = self._loadavg()
        return CpuReadings(
            util_pct=_util_pct(prev.get("cpu"), ticks["cpu"]),
            core_count=len(cores) or None,
            load_1m=load[0],
            load_5m=load[1],
            load_15m=load[2],
            cores=tuple(cores),
        )

    def _loadavg(self) -> tuple[float | None, float | None, float | None]:
        text = self.fs.read_text("/proc/loadavg")
        if text is None:
            return None, None, None
        parts = text.split()
        try:
            return float(parts[0]), float(parts[1]), float(parts[2])
        except (IndexError, ValueError):
            logger.warning("malformed /proc/loadavg: %r", text)
            return None, None, None
