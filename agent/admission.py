"""Admission control: who may run a generation, and when (DESIGN.md §4, issue 5).

Protocol rules embodied here:

- a request id is an **idempotency key**: a retried request is never run twice. While the
  first copy is queued or running, a retry is attached to it and gets the same final result
  on its own reply topic; once it finished, the stored result is sent again (same ``seq``, so
  receivers deduplicate it). Entries live ``ttl_s`` and at most ``max_entries`` are kept.
  Completed results are also kept in a :class:`ResultStore` (SQLite, WAL, in the state
  directory), so a retry that arrives after the agent restarted is answered from disk and not
  run again.
- a **per-client sliding-window rate limit**: at most ``limit`` requests per ``window_s``
  from one client (the request's ``client_id``, else its reply topic); the excess is refused
  with ``overloaded`` and ``details.reason = "rate_limited"`` plus ``retry_after_ms``.
- the queue bound and concurrency live in the daemon (a bounded ``queue.Queue`` and one
  executor per worker); a full queue answers ``overloaded`` at once rather than queueing
  without bound.

Everything here is bounded, thread-safe and clock-injectable for tests; only the
:class:`ResultStore` touches the disk.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


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

    def reconfigure(self, limit: int, window_s: float) -> None:
        """Apply new limits (config reload).

        The request log is kept, so no client gets a fresh allowance from a reload.
        """
        with self._lock:
            self.limit = limit
            self.window_s = window_s

    def allow(self, key: str) -> tuple[bool, float]:
        """Record an event for ``key`` if allowed; return ``(allowed, retry_after_s)``."""
        if self.limit <= 0:
            return True, 0.0
        now = self._clock()
        with self._lock:
            if self.limit <= 0:  # disabled by a reload meanwhile
                return True, 0.0
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


class ResultStore:
    """Completed request id → final result payload, on disk, so idempotency survives a restart.

    A SQLite database of its own (``idempotency.sqlite3`` in the state directory, WAL) rather
    than a table beside the outbox: the outbox's connection and lock belong to
    :class:`agent.outbox.OutboxQueue`, and its rows are deleted as soon as they are
    acknowledged, while these rows must outlive delivery by ``ttl_s``. A separate file also
    keeps the drainer's deletes and these writes from waiting on one another.

    Bounded like the in-memory cache: rows older than ``ttl_s`` (wall clock, since the
    monotonic clock restarts with the process) are deleted on every write and never returned,
    and beyond ``max_entries`` the oldest rows go first.

    Args:
        path: The database file (created with its directory).
        ttl_s: How long a result is kept, s.
        max_entries: Most results kept.
        synchronous: SQLite ``synchronous`` mode, as the outbox's: ``normal`` survives a
            process crash (kill -9), ``full`` also power loss.
        clock: Wall clock, s since the epoch.
    """

    def __init__(self, path: Path, ttl_s: float = 600.0, max_entries: int = 10_000, *,
                 synchronous: str = "normal", clock: Callable[[], float] = time.time) -> None:
        if synchronous not in ("normal", "full"):
            raise ValueError("synchronous must be normal or full")
        self.path = path
        self._ttl_s = ttl_s
        self._max = max_entries
        self._synchronous = synchronous
        self._clock = clock
        self._lock = threading.Lock()
        # Why the store is off (None while it works): the daemon then remembers ids in memory
        # only. Not being able to remember ids across a restart is never a reason to stop.
        self.disabled_reason: str | None = None
        self._db: sqlite3.Connection | None = None
        self._count = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = self._open()
        except sqlite3.DatabaseError as exc:
            if not _is_corrupt(exc):
                # Cannot be opened (read-only or foreign-owned file, a directory in its place):
                # nothing says it is damaged, so it is left as it is for the operator.
                self._disable(f"{path} cannot be opened ({exc})")
                return
            aside = path.with_name(f"{path.name}.corrupt-{int(self._clock())}")
            try:
                path.rename(aside)
            except OSError as move_exc:
                self._disable(f"{path} is damaged ({exc}) and cannot be moved aside "
                              f"({move_exc})")
                return
            logger.error("idempotency store %s is unreadable (%s); moved to %s", path, exc, aside)
            for suffix in ("-wal", "-shm"):
                with contextlib.suppress(OSError):
                    path.with_name(path.name + suffix).unlink()
            try:
                self._db = self._open()
            except sqlite3.Error as again:
                self._disable(f"{path} cannot be created ({again})")
                return
        try:
            self._count = int(self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0])
        except sqlite3.Error as exc:  # damaged pages: lookups will miss, see get()
            logger.error("idempotency store %s: cannot count results: %s", path, exc)

    def _disable(self, reason: str) -> None:
        self.disabled_reason = reason
        logger.error("idempotency store %s; completed request ids are kept in memory only "
                     "(a retry after a restart runs again)", reason)
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                             timeout=10.0)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self._synchronous.upper()}")
        db.execute("CREATE TABLE IF NOT EXISTS results (id TEXT PRIMARY KEY, "
                   "payload BLOB NOT NULL, created_unix_ms INTEGER NOT NULL, "
                   "expires_unix_ms INTEGER NOT NULL)")
        db.execute("CREATE INDEX IF NOT EXISTS results_expires ON results(expires_unix_ms)")
        db.execute("CREATE INDEX IF NOT EXISTS results_created ON results(created_unix_ms)")
        columns = {row[1] for row in db.execute("PRAGMA table_info(results)")}
        if "fingerprint" not in columns:  # files written before fingerprints were kept
            db.execute("ALTER TABLE results ADD COLUMN fingerprint TEXT")
        return db

    def __len__(self) -> int:
        with self._lock:
            return self._count

    def reconfigure(self, ttl_s: float, max_entries: int) -> None:
        """New bounds (config reload); they apply from the next write."""
        with self._lock:
            self._ttl_s = ttl_s
            self._max = max_entries

    def get(self, request_id: str) -> bytes | None:
        """The stored final result of ``request_id``, or None (unknown or expired)."""
        entry = self.get_entry(request_id)
        return entry[0] if entry is not None else None

    def get_entry(self, request_id: str) -> tuple[bytes, str | None] | None:
        """``(result, request fingerprint)`` of ``request_id``, or None (unknown or expired).

        A database error (damaged pages) is logged and counts as unknown: the caller runs the
        request again (at least once), rather than raising into admission, which runs on the
        MQTT network thread and would leave the request unanswered.
        """
        now_ms = int(self._clock() * 1000)
        with self._lock:
            if self._db is None:
                return None
            try:
                row = self._db.execute(
                    "SELECT payload, fingerprint FROM results WHERE id = ? "
                    "AND expires_unix_ms > ?", (request_id, now_ms)).fetchone()
            except sqlite3.Error as exc:
                logger.error("idempotency store %s: lookup failed: %s", self.path, exc)
                return None
        return (bytes(row[0]), row[1]) if row is not None else None

    def put(self, request_id: str, payload: bytes, fingerprint: str | None = None) -> None:
        """Remember ``payload`` as the final result of ``request_id`` (committed on return).

        Raises:
            sqlite3.Error: The write failed (a full disk, damaged pages); nothing changed.
        """
        now_ms = int(self._clock() * 1000)
        with self._lock:
            db = self._db
            if db is None:
                return
            db.execute("BEGIN IMMEDIATE")
            try:
                gone = db.execute("DELETE FROM results WHERE expires_unix_ms <= ?",
                                  (now_ms,)).rowcount
                replaced = db.execute("DELETE FROM results WHERE id = ?",
                                      (request_id,)).rowcount
                db.execute("INSERT INTO results (id, payload, created_unix_ms, expires_unix_ms, "
                           "fingerprint) VALUES (?, ?, ?, ?, ?)",
                           (request_id, payload, now_ms, now_ms + int(self._ttl_s * 1000),
                            fingerprint))
                count = self._count - gone - replaced + 1
                if count > self._max:
                    count -= db.execute(
                        "DELETE FROM results WHERE id IN (SELECT id FROM results "
                        "ORDER BY created_unix_ms, rowid LIMIT ?)", (count - self._max,)
                    ).rowcount
                db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
            self._count = max(0, count)

    def close(self) -> None:
        """Close the database (further calls fail)."""
        with self._lock:
            if self._db is not None:
                self._db.close()


def _is_corrupt(exc: sqlite3.DatabaseError) -> bool:
    """Whether ``exc`` says the file's contents are damaged (not: it cannot be opened).

    ``sqlite3.OperationalError`` ("unable to open database file", "attempt to write a
    readonly database", a schema of another program) is not damage; the plain
    ``DatabaseError`` ("file is not a database", "database disk image is malformed") is.
    An ``OperationalError`` about our own schema (a table without our columns) counts as
    foreign contents too, which are moved aside like damage.
    """
    if not isinstance(exc, sqlite3.OperationalError):
        return True
    return "no such column" in str(exc)


def request_fingerprint(request: Any) -> str:
    """What identifies a request behind its id (sha256 hex), to tell a retry from a reuse.

    Covers everything that shapes the generated text (prompt or messages, sampling settings,
    stop strings, token limit, model); leaves out what a retry may change without asking for
    another answer (``stream``, ``deadline_ms``, ``client_id``).
    """
    key = {name: getattr(request, name, None) for name in (
        "messages", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
        "ignore_eos", "model")}
    if key["messages"] is not None:
        key["messages"] = [dict(m) for m in key["messages"]]
    if key["stop"] is not None:
        key["stop"] = list(key["stop"])
    text = json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class _Entry:
    expires: float
    result: bytes | None = None
    waiters: list[Any] = field(default_factory=list)
    fingerprint: str | None = None


class IdempotencyCache:
    """Request id → pending/done, with extra reply targets for retries of a pending request.

    Args:
        ttl_s: How long an id is remembered after it was first seen, s.
        max_entries: Most ids kept (oldest forgotten first).
        clock: Monotonic clock, s.
        store: Where completed results are also written, so they outlive the process; an id
            unknown in memory is looked up there before it counts as new.
    """

    NEW = "new"
    PENDING = "pending"
    DONE = "done"
    CONFLICT = "conflict"

    def __init__(self, ttl_s: float = 600.0, max_entries: int = 10_000,
                 clock: Callable[[], float] = time.monotonic,
                 store: ResultStore | None = None) -> None:
        self._ttl_s = ttl_s
        self._max = max_entries
        self._clock = clock
        self._store = store
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def reconfigure(self, ttl_s: float, max_entries: int) -> None:
        """New bounds (config reload): they apply to ids seen from now on, and the store's."""
        with self._lock:
            self._ttl_s = ttl_s
            self._max = max_entries
        if self._store is not None:
            self._store.reconfigure(ttl_s, max_entries)

    def claim(self, request_id: str, target: Any, fingerprint: str | None = None
              ) -> tuple[str, bytes | None]:
        """Register ``request_id``; say whether it is new, pending (``target`` attached) or done.

        Args:
            request_id: The request's id.
            target: Where a retry's result goes (attached while the first copy runs).
            fingerprint: :func:`request_fingerprint` of the request; when both it and the one
                remembered for the id are known and differ, the id was reused for another
                request.

        Returns:
            ``(NEW, None)``: run it. ``(PENDING, None)``: a copy is queued or running;
            ``target`` will get its result. ``(DONE, payload)``: answer with ``payload``.
            ``(CONFLICT, None)``: the id belongs to a different request; refuse it (nothing
            is attached or remembered).
        """
        with self._lock:
            known = request_id in self._entries
        # Read the store outside the lock (executors must not wait on SQLite to complete).
        stored = (self._store.get_entry(request_id)
                  if self._store is not None and not known else None)
        now = self._clock()
        with self._lock:
            while self._entries:
                oldest = next(iter(self._entries.values()))
                if oldest.expires > now and len(self._entries) < self._max:
                    break
                self._entries.popitem(last=False)
            entry = self._entries.get(request_id)
            if entry is not None and entry.expires <= now and entry.result is not None:
                # Expired behind an older entry that is not (a reload shortened the TTL).
                del self._entries[request_id]
                entry = None
            if entry is None:
                if stored is None:
                    self._entries[request_id] = _Entry(expires=now + self._ttl_s,
                                                       fingerprint=fingerprint)
                    return self.NEW, None
                payload, stored_fp = stored
                if _differs(stored_fp, fingerprint):
                    return self.CONFLICT, None
                self._entries[request_id] = _Entry(expires=now + self._ttl_s, result=payload,
                                                   fingerprint=stored_fp or fingerprint)
                return self.DONE, payload
            if _differs(entry.fingerprint, fingerprint):
                return self.CONFLICT, None
            if entry.result is not None:
                return self.DONE, entry.result
            entry.waiters.append(target)
            return self.PENDING, None

    def complete(self, request_id: str, payload: bytes) -> list[Any]:
        """Store the final result; return the targets of retries that are waiting for it.

        Call it once the result is committed to the outbox; the store is written here, just
        after (two SQLite files cannot share one transaction). A crash between the two commits
        (a window of about a hundred microseconds) leaves a result that is still delivered
        from the outbox after the restart, but an id that is not remembered: a retry that
        arrives after the restart runs once more (at least once, never lost). The other order
        could remember a result whose only copy was lost with the process, and a client that
        did not retry would never hear of it.
        """
        with self._lock:
            entry = self._entries.get(request_id)
            if entry is None:
                return []
            entry.result = payload
            waiters, entry.waiters = entry.waiters, []
            fingerprint = entry.fingerprint
        if self._store is not None:
            try:
                self._store.put(request_id, payload, fingerprint)
            except sqlite3.Error as exc:  # a full disk must not lose the result itself
                logger.error("request id %s not remembered on disk: %s", request_id, exc)
        return waiters

    def forget(self, request_id: str) -> list[Any]:
        """Drop an id that was refused before running (so a retry may run); return waiters."""
        with self._lock:
            entry = self._entries.pop(request_id, None)
            return entry.waiters if entry is not None else []


def _differs(known: str | None, given: str | None) -> bool:
    return known is not None and given is not None and known != given
