"""System memory and swap from /proc/meminfo.

File read (below the injectable root)::

    /proc/meminfo    "MemTotal:       24683664 kB" lines; the "kB" unit is KiB (1024 bytes),
                     see Documentation/filesystems/proc.rst ("meminfo").

``MemAvailable`` (kernel ≥ 3.14) is the kernel's own estimate of memory available for new
workloads without swapping; it is reported as-is and never re-derived from MemFree + Cached,
which overestimates (part of the page cache is not reclaimable). On an older kernel it is None.
On Jetson the iGPU allocates from this same system memory, so it is the figure that bounds a
model there too.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from probes.base import Availability, Probe, ProbeError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemoryReadings:
    """Memory and swap, bytes.

    Attributes:
        total_bytes: ``MemTotal``.
        free_bytes: ``MemFree`` (unused pages; not what is available).
        available_bytes: ``MemAvailable``; None on kernels older than 3.14.
        used_bytes: ``MemTotal - MemAvailable``; None when MemAvailable is absent.
        used_pct: ``used_bytes / total_bytes`` * 100.
        buffers_bytes: ``Buffers``.
        cached_bytes: ``Cached``.
        swap_total_bytes: ``SwapTotal`` (0 means "no swap configured", a real value).
        swap_free_bytes: ``SwapFree``.
        swap_used_bytes: ``SwapTotal - SwapFree``.
    """

    total_bytes: int | None
    free_bytes: int | None
    available_bytes: int | None
    used_bytes: int | None
    used_pct: float | None
    buffers_bytes: int | None
    cached_bytes: int | None
    swap_total_bytes: int | None
    swap_free_bytes: int | None
    swap_used_bytes: int | None


def parse_meminfo(text: str) -> dict[str, int]:
    """Parse /proc/meminfo into byte counts (``kB`` lines *1024; unit-less lines as-is)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        if not sep:
            continue
        parts = rest.split()
        if not parts:
            continue
        try:
            value = int(parts[0])
        except ValueError:
            logger.debug("skipping malformed meminfo line %r", line)
            continue
        if len(parts) > 1 and parts[1] == "kB":
            value *= 1024
        out[key.strip()] = value
    return out


class MemoryProbe(Probe):
    """RAM and swap usage from /proc/meminfo.

    Args:
        root: Filesystem root (``/`` in production, a fixture tree in tests).
    """

    name = "memory"

    def __init__(self, root: str | os.PathLike[str] = "/") -> None:
        super().__init__(root)

    def check(self) -> Availability:
        """Available when /proc/meminfo can be read and holds ``MemTotal``."""
        text, err = self.fs.read_text_or_errno("/proc/meminfo")
        if text is None:
            return Availability(
                False, f"cannot read {self.fs.path('/proc/meminfo')}: {os.strerror(err or 0)}"
            )
        info = parse_meminfo(text)
        if "MemTotal" not in info:
            return Availability(False, "/proc/meminfo has no MemTotal line")
        if "MemAvailable" not in info:
            return Availability(
                True, "kernel < 3.14: no MemAvailable, used memory unknown", degraded=True
            )
        return Availability(True)

    def sample(self) -> MemoryReadings:
        """Read /proc/meminfo.

        Raises:
            ProbeError: When /proc/meminfo is missing or has no ``MemTotal``.
        """
        text = self.fs.read_text("/proc/meminfo")
        if text is None:
            raise ProbeError(f"cannot read {self.fs.path('/proc/meminfo')}")
        info = parse_meminfo(text)
        total = info.get("MemTotal")
        if total is None:
            raise ProbeError("/proc/meminfo has no MemTotal line")
        available = info.get("MemAvailable")
        used = total - available if available is not None else None
        used_pct = 100.0 * used / total if used is not None and total > 0 else None
        swap_total = info.get("SwapTotal")
        swap_free = info.get("SwapFree")
        swap_used = (
            swap_total - swap_free if swap_total is not None and swap_free is not None else None
        )
        return MemoryReadings(
            total_bytes=total,
            free_bytes=info.get("MemFree"),
            available_bytes=available,
            used_bytes=used,
            used_pct=used_pct,
            buffers_bytes=info.get("Buffers"),
            cached_bytes=info.get("Cached"),
            swap_total_bytes=swap_total,
            swap_free_bytes=swap_free,
            swap_used_bytes=swap_used,
        )
