"""The outbox: results survive broker outages and agent crashes (DESIGN.md §4).

Protocol rule embodied here: results and bench records (and telemetry, when configured) are
delivered **at least once, in order**. Every such message is first committed to a SQLite
database in WAL mode in the state directory, then published with QoS 1 by one drainer thread,
and deleted only once the broker has acknowledged it (PUBACK). A message may therefore be
published twice (a PUBACK lost in an outage, a ``kill -9`` between PUBACK and delete), never
zero times while it is within its TTL and the byte bound; receivers deduplicate by
``(device, seq)``, which is assigned before the message enters the outbox.

Durability: a committed row survives ``kill -9`` of the agent with ``synchronous=NORMAL``
(SQLite's WAL guarantee: only a power cut can lose the last transactions); ``synchronous=FULL``
also survives power loss at the cost of one fsync per message (SD-card wear on a Pi).

Bounds: the queue holds at most ``max_bytes`` (payload + topic + correlation data + a fixed
per-row overhead). When a new message does not fit, the configured drop policy decides:
``drop_oldest`` deletes the oldest telemetry first, then the oldest of any kind;
``reject_new`` refuses the new message. Every drop is counted by reason and kind. Rows older
than ``ttl_s`` are deleted (counted as ``expired``) rather than delivered stale.

Replay: after a reconnect the backlog is drained in id order at most ``replay_rate_per_s``
messages per second (a token bucket), with at most ``inflight_window`` unacknowledged
publishes, so a device coming back after a long outage does not flood the broker.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)

ROW_OVERHEAD_BYTES = 64
DROP_POLICIES = ("drop_oldest", "reject_new")
SYNCHRONOUS_MODES = ("normal", "full")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    correlation BLOB,
    size INTEGER NOT NULL,
    created_unix_ms INTEGER NOT NULL,
    expires_unix_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_kind ON outbox(kind, id);
CREATE INDEX IF NOT EXISTS outbox_expiry ON outbox(expires_unix_ms);
"""


@dataclass(frozen=True)
class OutboxConfig:
    """Bounds and pacing of the outbox.

    Attributes:
        max_bytes: Largest total size of queued messages, bytes.
        ttl_s: Messages older than this are dropped (``expired``), s.
        drop_policy: ``drop_oldest`` or ``reject_new`` when a message does not fit.
        replay_rate_per_s: Most messages published per second by the drainer.
        inflight_window: Most publishes awaiting PUBACK at once.
        synchronous: SQLite ``synchronous`` mode: ``normal`` (survives a process crash) or
            ``full`` (also survives power loss).
    """

    max_bytes: int = 64 * 1024 * 1024
    ttl_s: float = 7 * 24 * 3600.0
    drop_policy: str = "drop_oldest"
    replay_rate_per_s: float = 2000.0
    inflight_window: int = 64
    synchronous: str = "normal"

    def __post_init__(self) -> None:
        if self.max_bytes < 1024:
            raise ValueError("max_bytes must be at least 1024")
        if self.ttl_s <= 0:
            raise ValueError("ttl_s must be > 0")
        if self.drop_policy not in DROP_POLICIES:
            raise ValueError(f"drop_policy must be one of {', '.join(DROP_POLICIES)}")
        if self.replay_rate_per_s <= 0:
            raise ValueError("replay_rate_per_s must be > 0")
        if self.inflight_window < 1:
            raise ValueError("inflight_window must be >= 1")
        if self.synchronous not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}")


@dataclass(frozen=True)
class OutboxEntry:
    """One queued message.

    Attributes:
        row_id: Position in the queue (strictly increasing, never reused).
        kind: ``result``, ``bench``, ``telemetry``, ``cmd`` …
        topic: MQTT topic.
        payload: Encoded JSON.
        qos: MQTT QoS (1 for everything the outbox carries).
        retain: MQTT retain flag.
        correlation: MQTT v5 correlation data of the request answered, if any.
        created_unix_ms: When it was queued, ms since the epoch.
    """

    row_id: int
    kind: str
    topic: str
    payload: bytes
    qos: int
    retain: bool
    correlation: bytes | None
    created_unix_ms: int


@dataclass(frozen=True)
class OutboxStats:
    """Counters of the outbox (since this process opened it, except depth and bytes).

    Attributes:
        depth: Messages queued now.
        bytes: Their accounted size, bytes.
        max_bytes: The bound.
        enqueued: Messages accepted.
        published: Messages acknowledged by the broker and deleted.
        dropped: ``"<reason>:<kind>"`` -> count; reasons ``full``, ``rejected``,
            ``too_large``, ``expired``, ``closed`` (queued during shutdown).
    """

    depth: int
    bytes: int
    max_bytes: int
    enqueued: int
    published: int
    dropped: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (published in telemetry)."""
        return {"depth": self.depth, "bytes": self.bytes, "max_bytes": self.max_bytes,
                "enqueued": self.enqueued, "published": self.published,
                "dropped": dict(self.dropped)}


class OutboxQueue:
    """A bounded, durable FIFO of MQTT messages in SQLite (WAL). Thread-safe.

    Args:
        path: Database file (created with its directory).
        config: Bounds and policy.
        clock: Wall clock, s since the epoch (TTL is wall-clock: it must hold across restarts).
    """

    def __init__(
        self,
        path: Path,
        config: OutboxConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.config = config or OutboxConfig()
        self._clock = clock
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._enqueued = 0
        self._published = 0
        self._dropped: collections.Counter[str] = collections.Counter()
        self._closed = False
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = self._open()
        except sqlite3.DatabaseError as exc:
            # A corrupt file must not stop the agent; keep it for inspection and start over.
            aside = path.with_name(f"{path.name}.corrupt-{int(self._clock())}")
            logger.error("outbox %s is unreadable (%s); moved to %s", path, exc, aside)
            path.rename(aside)
            for suffix in ("-wal", "-shm"):
                with contextlib.suppress(OSError):
                    path.with_name(path.name + suffix).unlink()
            self._db = self._open()
        row = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0), COALESCE(MAX(id), 0) FROM outbox").fetchone()
        self._depth, self._bytes, self._max_id = int(row[0]), int(row[1]), int(row[2])
        self._next_purge_ms = 0
        if self._depth:
            logger.info("outbox holds %d message(s) (%d bytes) from before", self._depth,
                        self._bytes)

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                             timeout=10.0)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self.config.synchronous.upper()}")
        db.executescript(_SCHEMA)
        db.execute("SELECT COUNT(*) FROM outbox").fetchone()  # fails on a corrupt file
        return db

    # -- producer side ---------------------------------------------------------------------

    def put(
        self,
        topic: str,
        payload: bytes,
        *,
        kind: str = "result",
        qos: int = 1,
        retain: bool = False,
        correlation: bytes | None = None,
    ) -> int | None:
        """Queue a message durably; return its row id, or None when the policy refused it."""
        size = len(payload) + len(topic.encode("utf-8")) + len(correlation or b"")
        size += ROW_OVERHEAD_BYTES
        now_ms = int(self._clock() * 1000)
        with self._cond:
            if self._closed:
                self._dropped[f"closed:{kind}"] += 1
                logger.warning("outbox closed: a %s message was not queued", kind)
                return None
            if size > self.config.max_bytes:
                self._dropped[f"too_large:{kind}"] += 1
                logger.warning("outbox: a %s message of %d bytes exceeds the bound; dropped",
                               kind, size)
                return None
            if now_ms >= self._next_purge_ms or self._bytes + size > self.config.max_bytes:
                self._purge_expired_locked(now_ms)
                self._next_purge_ms = now_ms + 1000
            if self._bytes + size > self.config.max_bytes:
                if self.config.drop_policy == "reject_new":
                    self._dropped[f"rejected:{kind}"] += 1
                    return None
                self._make_room_locked(self._bytes + size - self.config.max_bytes)
            cur = self._db.execute(
                "INSERT INTO outbox (kind, topic, payload, qos, retain, correlation, size, "
                "created_unix_ms, expires_unix_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (kind, topic, payload, qos, int(retain), correlation, size, now_ms,
                 now_ms + int(self.config.ttl_s * 1000)),
            )
            self._depth += 1
            self._bytes += size
            self._enqueued += 1
            self._max_id = int(cur.lastrowid or 0)
            self._cond.notify_all()
            return self._max_id

    def _make_room_locked(self, need: int) -> None:
        freed = 0
        for only_telemetry in (True, False):
            while freed < need:
                sql = "SELECT id, size, kind FROM outbox "
                sql += "WHERE kind = 'telemetry' " if only_telemetry else ""
                rows = self._db.execute(sql + "ORDER BY id LIMIT 256").fetchall()
                if not rows:
                    break
                victims: list[int] = []
                for row_id, size, kind in rows:
                    victims.append(row_id)
                    freed += size
                    self._dropped[f"full:{kind}"] += 1
                    if freed >= need:
                        break
                self._delete_locked(victims)
        if freed:
            logger.warning("outbox full: dropped the oldest messages (%d bytes)", freed)

    def _delete_locked(self, row_ids: list[int]) -> int:
        if not row_ids:
            return 0
        deleted = 0
        for i in range(0, len(row_ids), 500):
            chunk = row_ids[i:i + 500]
            marks = ",".join("?" * len(chunk))
            row = self._db.execute(
                f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM outbox WHERE id IN ({marks})",
                chunk).fetchone()
            self._db.execute(f"DELETE FROM outbox WHERE id IN ({marks})", chunk)
            deleted += int(row[0])
            self._depth -= int(row[0])
            self._bytes -= int(row[1])
        return deleted

    def _purge_expired_locked(self, now_ms: int) -> int:
        rows = self._db.execute(
            "SELECT kind, COUNT(*), COALESCE(SUM(size), 0) FROM outbox "
            "WHERE expires_unix_ms <= ? GROUP BY kind", (now_ms,)).fetchall()
        if not rows:
            return 0
        self._db.execute("DELETE FROM outbox WHERE expires_unix_ms <= ?", (now_ms,))
        n = 0
        for kind, count, size in rows:
            self._dropped[f"expired:{kind}"] += int(count)
            self._depth -= int(count)
            self._bytes -= int(size)
            n += int(count)
        logger.warning("outbox: %d message(s) expired undelivered", n)
        return n

    # -- consumer side ---------------------------------------------------------------------

    def purge_expired(self) -> int:
        """Delete messages past their TTL; return how many."""
        with self._cond:
            if self._closed:
                return 0
            return self._purge_expired_locked(int(self._clock() * 1000))

    def peek(self, after_id: int = 0, limit: int = 64) -> list[OutboxEntry]:
        """The oldest queued messages with ``row_id > after_id``, in order."""
        with self._cond:
            if self._closed:
                return []
            rows = self._db.execute(
                "SELECT id, kind, topic, payload, qos, retain, correlation, created_unix_ms "
                "FROM outbox WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)).fetchall()
        return [OutboxEntry(int(r[0]), r[1], r[2], bytes(r[3]), int(r[4]), bool(r[5]),
                            bytes(r[6]) if r[6] is not None else None, int(r[7]))
                for r in rows]

    def ack(self, row_ids: Iterable[int]) -> None:
        """Delete delivered messages (ids already gone are ignored)."""
        ids = list(row_ids)
        with self._cond:
            if self._closed:
                return
            self._published += self._delete_locked(ids)

    def wait_for_rows(self, after_id: int, timeout_s: float) -> bool:
        """Block up to ``timeout_s`` until a message newer than ``after_id`` may exist."""
        with self._cond:
            if self._has_after_locked(after_id):
                return True
            self._cond.wait(timeout_s)
            return self._has_after_locked(after_id)

    def _has_after_locked(self, after_id: int) -> bool:
        return self._depth > 0 and self._max_id > after_id

    def wake(self) -> None:
        """Wake a thread blocked in :meth:`wait_for_rows`."""
        with self._cond:
            self._cond.notify_all()

    def stats(self) -> OutboxStats:
        """Depth, bytes and counters."""
        with self._cond:
            return OutboxStats(self._depth, self._bytes, self.config.max_bytes, self._enqueued,
                               self._published, dict(self._dropped))

    def close(self) -> None:
        """Close the database (a WAL checkpoint runs on close)."""
        with self._cond:
            self._closed = True
            self._db.close()


class PublishHandle(Protocol):
    """What a publish returns (paho's ``MQTTMessageInfo``)."""

    def is_published(self) -> bool:
        """True once the broker acknowledged the message."""
        ...


class OutboxLink(Protocol):
    """The MQTT side the drainer needs (:class:`agent.mqtt.MqttLink`)."""

    def is_connected(self) -> bool:
        """True while connected."""
        ...

    def publish_entry(self, entry: OutboxEntry) -> PublishHandle:
        """Publish one outbox entry with QoS 1; raises ``PublishError`` when refused."""
        ...


class TokenBucket:
    """Pacing for the drainer: ``rate_per_s`` tokens per second, at most ``burst`` saved."""

    def __init__(self, rate_per_s: float, burst: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate_per_s = rate_per_s
        self.burst = max(1.0, burst)
        self._clock = clock
        self._tokens = self.burst
        self._t = clock()

    def available(self) -> int:
        """Whole tokens available now."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._t) * self.rate_per_s)
        self._t = now
        return int(self._tokens)

    def take(self, n: int) -> None:
        """Spend ``n`` tokens (call after :meth:`available`)."""
        self._tokens -= n

    def seconds_until(self, n: int = 1) -> float:
        """Seconds until ``n`` tokens are available."""
        return max(0.0, (n - self._tokens) / self.rate_per_s)


class OutboxDrainer:
    """The one thread that publishes the outbox in order and deletes acknowledged rows.

    It never waits on a publish without a timeout: it polls its window of handles, so a
    broker frozen mid-session (SIGSTOP) leaves it looping, not hung. While disconnected it
    keeps the window (paho re-sends unacknowledged QoS 1 messages on reconnect) and publishes
    nothing new, so memory stays bounded by the window.
    """

    def __init__(self, queue: OutboxQueue, link: OutboxLink) -> None:
        self._queue = queue
        self._link = link
        cfg = queue.config
        self._bucket = TokenBucket(cfg.replay_rate_per_s, burst=cfg.inflight_window)
        self._window = cfg.inflight_window
        # Refill the window only once this much of it is free (or it is empty): one SQLite
        # read then fetches a batch instead of one row per PUBACK.
        self._refill_at = max(1, self._window // 2)
        # Acknowledged rows are deleted in batches of this size (or when nothing is in
        # flight): one DELETE commit per batch instead of one per message.
        self._ack_batch = max(64, self._window // 2)
        self._inflight: collections.deque[tuple[int, PublishHandle]] = collections.deque()
        self._acked: list[int] = []
        # PUBACKs counted by wake(); the kick is set only once ``_wake_at`` is reached, so a
        # full window is refilled after one wake-up per batch rather than one per PUBACK.
        self._wakes = 0
        self._wake_at = 0
        self._stop = threading.Event()
        # Set by PUBACKs and (re)connects. A plain Event, not the queue's lock: the network
        # thread must never wait for a SQLite statement the drainer is running.
        self._kick = threading.Event()
        self._thread: threading.Thread | None = None
        self.publish_failures = 0

    def start(self) -> None:
        """Start the drainer thread."""
        self._thread = threading.Thread(target=self._run, name="edgelm-outbox", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 1.0) -> None:
        """Stop the thread (queued rows stay on disk for the next start)."""
        self._stop.set()
        self._kick.set()
        self._queue.wake()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def wake(self) -> None:
        """Re-check the window (call from paho's on_publish and on_connect; never blocks).

        While the window is full the drainer asks to be woken only after enough PUBACKs
        to refill half of it; earlier calls only count. A wake-up this skips is never needed
        for progress: the wait it would end has a 50 ms timeout.
        """
        self._wakes += 1
        if self._wakes >= self._wake_at:
            self._kick.set()

    def _wait_acks(self, count: int, timeout_s: float) -> None:
        """Sleep until ``count`` more wake() calls (PUBACKs) or ``timeout_s``."""
        self._wake_at = self._wakes + count
        try:
            # Re-check after arming: PUBACKs that came before the arming are visible now.
            if self._inflight and not self._inflight[-1][1].is_published():
                self._kick.wait(timeout_s)
        finally:
            self._wake_at = 0

    def _pause(self, timeout_s: float) -> None:
        self._kick.wait(timeout_s)

    def inflight(self) -> int:
        """Publishes awaiting PUBACK."""
        return len(self._inflight)

    def _reap(self) -> None:
        while self._inflight and self._inflight[0][1].is_published():
            self._acked.append(self._inflight.popleft()[0])
        # Deleting in batches keeps SQLite off the per-message path; a crash before the
        # delete only means those rows are sent again (at least once, deduplicated by seq).
        if self._acked and (len(self._acked) >= self._ack_batch or not self._inflight):
            self._queue.ack(self._acked)
            self._acked = []

    def _run(self) -> None:
        last_id = 0
        next_purge = time.monotonic() + 60.0
        while not self._stop.is_set():
            self._kick.clear()  # cleared before the checks below, so no wake-up is lost
            try:
                self._reap()
                if time.monotonic() >= next_purge:
                    self._queue.purge_expired()
                    next_purge = time.monotonic() + 60.0
                if not self._link.is_connected():
                    self._pause(0.2)
                    continue
                if not self._inflight:
                    # Everything sent was acknowledged; re-read from the head so rows a
                    # reconnect made paho forget are not skipped.
                    last_id = 0
                room = self._window - len(self._inflight)
                if self._inflight and room < self._refill_at:
                    self._wait_acks(self._refill_at - room, 0.05)
                    continue
                tokens = self._bucket.available()
                if tokens <= 0:
                    self._pause(min(0.05, max(0.001, self._bucket.seconds_until())))
                    continue
                rows = self._queue.peek(last_id, min(room, tokens))
                if not rows:
                    self._queue.wait_for_rows(last_id, 0.5 if not self._inflight else 0.005)
                    continue
                for entry in rows:
                    try:
                        handle = self._link.publish_entry(entry)
                    except Exception as exc:  # refused by the client: retry from here later
                        self.publish_failures += 1
                        logger.warning("outbox publish failed: %s", exc)
                        self._stop.wait(0.5)
                        break
                    self._inflight.append((entry.row_id, handle))
                    self._bucket.take(1)
                    last_id = entry.row_id
            except Exception:  # the drainer must outlive any bug in one iteration
                logger.exception("outbox drainer iteration failed")
                self._stop.wait(0.5)
