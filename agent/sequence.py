"""Per-device message sequence numbers that keep increasing across restarts.

Receivers deduplicate by ``(device, seq)``, so a restarted agent must never reuse a number.
Writing the counter on every message would wear a Pi's SD card, so numbers are reserved in
blocks: the file holds the end of the reserved block (written atomically with fsync), and a
restart starts after it. At most one block of numbers is skipped per restart.

A counter with no usable file (a new or wiped state directory, a file that does not hold a
number) starts at the clock in µs since the epoch, not at 1: above anything an earlier life of
the device could have reached at one message per µs, so the receivers' ``(device, seq)`` keys
are not reused (a start at 1 made the collector drop new results as duplicates of old ones).
An existing file continues whatever the clock says.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)


class SequenceCounter:
    """Thread-safe, persistent, strictly increasing counter.

    Args:
        path: File that stores the reserved high-water mark; None keeps it in memory only
            (and starts from the clock every time).
        block: Numbers reserved per write.

    Raises:
        OSError: The file cannot be written (the state directory is missing or read-only).
    """

    def __init__(self, path: Path | None, block: int = 1000) -> None:
        self._path = path
        self._block = block
        self._lock = threading.Lock()
        start = _stored_mark(path) if path is not None else None
        if start is None:
            start = time.time_ns() // 1000 - 1
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


def _stored_mark(path: Path) -> int | None:
    """The high-water mark in ``path``, or None (logged when the file exists but is unusable)."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        logger.error("sequence file %s cannot be read (%s); starting from the clock", path, exc)
        return None
    if not text.isdigit():
        logger.error("sequence file %s holds %r, not a number; starting from the clock",
                     path, text[:40])
        return None
    return int(text)
