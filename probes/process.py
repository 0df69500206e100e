"""Memory and CPU of the agent's own processes (the agent, the inference worker) from procfs.

Files read per process (below the injectable root), see proc(5)::

    /proc/<pid>/status   "VmRSS:   123456 kB" (resident set, KiB), "VmHWM:" (peak resident set,
                         KiB), "Threads:  12".
    /proc/<pid>/stat     one line; after the last ")" (the command name may itself hold spaces and
                         parentheses) come fields 3.. : field 14 ``utime`` and 15 ``stime`` in
                         clock ticks (``sysconf(_SC_CLK_TCK)``, 100 on every mainstream Linux
                         architecture), field 22 ``starttime`` (ticks after boot).

CPU percent is (Δutime + Δstime) / CLK_TCK / Δwall * 100 over the last interval, the ``top``
convention: a process busy on four cores shows 400. The first sample for a role, and the first
sample after its pid changed or was reused by another process (``starttime`` differs), is None.
A pid that has gone gives None readings with a reason; the probe never raises for it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from probes.base import Availability, Probe

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessReading:
    """One role's process.

    Attributes:
        pid: Process id, or None when the role has no process.
        alive: True when the process' procfs entries could be read.
        reason: Why readings are None (process gone, no pid set); empty otherwise.
        rss_bytes: ``VmRSS`` (resident set), bytes.
        peak_rss_bytes: ``VmHWM`` (peak resident set since start), bytes.
        cpu_pct: CPU time over wall time in the last interval, percent of one core.
        threads: Thread count.
    """

    pid: int | None
    alive: bool
    reason: str
    rss_bytes: int | None
    peak_rss_bytes: int | None
    cpu_pct: float | None
    threads: int | None


@dataclass(frozen=True)
class ProcessReadings:
    """All watched processes, by role (``"agent"``, ``"worker"``, …).

    Attributes:
        processes: Role → :class:`ProcessReading`.
    """

    processes: dict[str, ProcessReading]


@dataclass(frozen=True)
class _CpuMark:
    pid: int
    starttime: int
    ticks: int
    t_mono_s: float


def _status_fields(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def _kib_to_bytes(value: str | None) -> int | None:
    if not value:
        return None
    parts = value.split()
    try:
        n = int(parts[0])
    except ValueError:
        return None
    return n * 1024 if len(parts) > 1 and parts[1] == "kB" else n


def _int_or_none(value: str | None) -> int | None:
    if not value:
        return None
    try:
        return int(value.split()[0])
    except ValueError:
        return None


def parse_pid_stat(text: str) -> tuple[int, int] | None:
    """Return (utime + stime ticks, starttime ticks) from /proc/<pid>/stat, or None if malformed."""
    _, sep, rest = text.rpartition(")")
    if not sep:
        return None
    fields = rest.split()
    # fields[0] is field 3 (state): field k is fields[k - 3].
    try:
        utime, stime, starttime = int(fields[11]), int(fields[12]), int(fields[19])
    except (IndexError, ValueError):
        return None
    return utime + stime, starttime


class ProcessProbe(Probe):
    """RSS, peak RSS, CPU % and thread count per role.

    Args:
        root: Filesystem root (``/`` in production, a fixture tree in tests).
        pids: Role → pid; defaults to ``{"agent": os.getpid()}``.
        clock: Monotonic clock in seconds (injectable for tests).
        clk_tck: Clock ticks per second; defaults to ``os.sysconf("SC_CLK_TCK")``.
    """

    name = "process"

    def __init__(
        self,
        root: str | os.PathLike[str] = "/",
        pids: Mapping[str, int | None] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        clk_tck: int | None = None,
    ) -> None:
        super().__init__(root)
        self._lock = threading.Lock()
        self._pids: dict[str, int | None] = (
            dict(pids) if pids is not None else {"agent": os.getpid()}
        )
        self._clock = clock
        self._clk_tck = clk_tck if clk_tck is not None else int(os.sysconf("SC_CLK_TCK"))
        self._marks: dict[str, _CpuMark] = {}

    def set_pid(self, role: str, pid: int | None) -> None:
        """Watch ``pid`` under ``role`` (e.g. the restarted worker); None: the role has no process.

        Thread-safe: the supervisor calls it while the sampler thread samples.
        """
        with self._lock:
            self._pids[role] = pid
            self._marks.pop(role, None)

    def pids(self) -> dict[str, int | None]:
        """A copy of the current role → pid mapping."""
        with self._lock:
            return dict(self._pids)

    def check(self) -> Availability:
        """Available when at least one watched process can be read."""
        pids = self.pids()
        live = [p for p in pids.values() if p is not None and self.fs.exists(f"/proc/{p}/status")]
        if live:
            return Availability(True)
        if not pids:
            return Availability(False, "no process to watch")
        return Availability(
            False, f"no /proc/<pid>/status under {self.fs.root} for pids {sorted(pids.items())}"
        )

    def sample(self) -> ProcessReadings:
        """Read status and stat of every watched process; never raises for a vanished pid."""
        # procfs reads are sub-millisecond; holding the lock keeps set_pid() and the CPU marks
        # consistent without a second bookkeeping pass.
        with self._lock:
            now = self._clock()
            out = {role: self._sample_one(role, pid, now) for role, pid in self._pids.items()}
        return ProcessReadings(processes=out)

    def _sample_one(self, role: str, pid: int | None, now: float) -> ProcessReading:
        if pid is None:
            self._marks.pop(role, None)
            return ProcessReading(None, False, "no process for this role", None, None, None, None)
        status_text = self.fs.read_text(f"/proc/{pid}/status")
        stat_text = self.fs.read_text(f"/proc/{pid}/stat")
        if status_text is None or stat_text is None:
            self._marks.pop(role, None)
            return ProcessReading(
                pid, False, f"process {pid} is gone or unreadable", None, None, None, None
            )
        status = _status_fields(status_text)
        cpu_pct: float | None = None
        parsed = parse_pid_stat(stat_text)
        if parsed is None:
            logger.warning("malformed /proc/%d/stat for role %s", pid, role)
            self._marks.pop(role, None)
        else:
            ticks, starttime = parsed
            prev = self._marks.get(role)
            mark = _CpuMark(pid, starttime, ticks, now)
            if (
                prev is not None
                and prev.pid == pid
                and prev.starttime == starttime
                and now > prev.t_mono_s
                and ticks >= prev.ticks
            ):
                cpu_s = (ticks - prev.ticks) / self._clk_tck
                cpu_pct = 100.0 * cpu_s / (now - prev.t_mono_s)
            self._marks[role] = mark
        return ProcessReading(
            pid=pid,
            alive=True,
            reason="",
            rss_bytes=_kib_to_bytes(status.get("VmRSS")),
            peak_rss_bytes=_kib_to_bytes(status.get("VmHWM")),
            cpu_pct=cpu_pct,
            threads=_int_or_none(status.get("Threads")),
        )
