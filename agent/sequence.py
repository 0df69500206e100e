"""Per-device message sequence numbers that keep increasing across restarts.

Receivers deduplicate by ``(device, seq)``, so a restarted agent must never reuse a number.
Writing the counter on every message would wear a Pi's SD card, so numbers are reserved in
blocks: the file holds the end of the reserved block (written atomically with fsync), and a
restart starts after it. At most one block of numbers is skipped per restart.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path


class SequenceCounter:
    """Thread-safe, persistent, strictly increasing counter.

    Args:
        path: File that stores the reserved high-water mark; None keeps it in memory only.
        block: Numbers reserved per write.
    """

    def __init__(self, path: Path | None, block: int = 1000) -> None:
        self._path = path
        self._block = block
        self._lock = threading.Lock()
        start = 0
        if path is not None:
            try:
                start = int(path.read_text().strip() or 0)
            except (OSError, ValueError):
                start = 0
        self._next = start + 1
        self._reserved = start
        self._reserve()

    def _reserve(self) -> None:
        self._reserved = self._next + self._block - 1
        if self._path is None:
            return
        tmp = self._path.with_suffix(".tmp")
        with tmp.open("w") as fh:
            fh.write(str(self._reserved))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self._path)

    def next(self) -> int:
        """Return the next number."""
        with self._lock:
            if self._next > self._reserved:
                self._reserve()
            value = self._next
            self._next += 1
            return value
