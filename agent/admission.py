"""Admission control: who may run a generation, and when (DESIGN.md §4, issue 5).

Protocol rules embodied here:

- a request id is an **idempotency key**: a retried request is never run twice. While the
  first copy is queued or running, a retry is attached to it and gets the same final result
  on its own reply topic; once it finished, the stored result is sent again (same ``seq``, so
  receivers deduplicate it). Entries live ``ttl_s`` and at most ``max_entries`` are kept.
- a **per-client sliding-window rate limit**: at most ``limit`` requests per ``window_s``
  from one client (the request's ``client_id``, else its reply topic); the excess is refused
  with ``overloaded`` and ``details.reason = "rate_limited"`` plus ``retry_after_ms``.
- the queue bound and concurrency live in the daemon (a bounded ``queue.Queue`` and one
  executor per worker); a full queue answers ``overloaded`` at once rather than queueing
  without bound.

Everything here is in memory, bounded, thread-safe and clock-injectable for tests.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AdmissionConfig:
    """Admission limits.

    Attributes:
        queue_size: Requests waiting beyond those running; more get ``overloaded``.
        concurrency: Generations at once (one worker process each; 1 per model by default).
        max_payload_bytes: Larger request payloads get ``too_large``.
        rate_limit: Requests per client per window; 0 disables the limit.
        rate_window_s: The sliding window, s.
        default_deadline_ms: Deadline for requests that carry none; 0 for none.
        idempotency_ttl_s: How long a request id is remembered, s.
        idempotency_max_entries: Most request ids remembered.
    """

    queue_size: int = 16
    concurrency: int = 1
    max_payload_bytes: int = 256 * 1024
    rate_limit: int = 0
    rate_window_s: float = 60.0
    default_deadline_ms: int = 0
    idempotency_ttl_s: float = 600.0
    idempotency_max_entries: int = 10_000


class SlidingWindowRateLimiter:
    """At most ``limit`` events per ``window_s`` per key (an exact sliding log).

    Args:
        limit: Events allowed per window; 0 allows everything.
        window_s: Window length, s.
        max_keys: Keys tracked; the least recently seen is forgotten beyond it.
        clock: Monotonic clock, s.
    """

    def __init__(self, limit: int, window_s: float, max_keys: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window_s = window_s
        self._max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._log: collections.OrderedDict[str, collections.deque[float]] = (
            collections.OrderedDict())

    def allow(self, key: str) -> tuple[bool, float]:
        """Record an event for ``key`` if allowed; return ``(allowed, retry_after_s)``."""
        if self.limit <= 0:
            return True, 0.0
        now = self._clock()
        with self._lock:
            log = self._log.get(key)
            if log is None:
                log = collections.deque()
                self._log[key] = log
                while len(self._log) > self._max_keys:
                    self._log.popitem(last=False)
            else:
                self._log.move_to_end(key)
            while log and log[0] <= now - self.window_s:
                log.popleft()
            if len(log) >= self.limit:
                return False, max(0.0, log[0] + self.window_s - now)
            log.append(now)
            return True, 0.0


@dataclass
class _Entry:
    expires: float
    result: bytes | None = None
    waiters: list[Any] = field(default_factory=list)


class IdempotencyCache:
    """Request id → pending/done, with extra reply targets for retries of a pending request.

    Args:
        ttl_s: How long an id is remembered after it was first seen, s.
        max_entries: Most ids kept (oldest forgotten first).
        clock: Monotonic clock, s.
    """

    NEW = "new"
    PENDING = "pending"
    DONE = "done"

    def __init__(self, ttl_s: float = 600.0, max_entries: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s = ttl_s
        self._max = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def claim(self, request_id: str, target: Any) -> tuple[str, bytes | None]:
        """Register ``request_id``; say whether it is new, pending (``target`` attached) or done.

        Returns:
            ``(NEW, None)``: run it. ``(PENDING, None)``: a copy is queued or running;
            ``target`` will get its result. ``(DONE, payload)``: answer with ``payload``.
        """
        now = self._clock()
        with self._lock:
            while self._entries:
                oldest = next(iter(self._entries.values()))
                if oldest.expires > now and len(self._entries) < self._max:
                    break
                self._entries.popitem(last=False)
            entry = self._entries.get(request_id)
            if entry is None:
                self._entries[request_id] = _Entry(expires=now + self._ttl_s)
                return self.NEW, None
            if entry.result is not None:
                return self.DONE, entry.result
            entry.waiters.append(target)
            return self.PENDING, None

    def complete(self, request_id: str, payload: bytes) -> list[Any]:
        """Store the final result; return the targets of retries that are waiting for it."""
        with self._lock:
            entry = self._entries.get(request_id)
            if entry is None:
                return []
            entry.result = payload
            waiters, entry.waiters = entry.waiters, []
            return waiters

    def forget(self, request_id: str) -> list[Any]:
        """Drop an id that was refused before running (so a retry may run); return waiters."""
        with self._lock:
            entry = self._entries.pop(request_id, None)
            return entry.waiters if entry is not None else []
