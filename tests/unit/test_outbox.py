"""OutboxQueue: order, bounds, drop policies, TTL, durability across reopen, threads."""

from __future__ import annotations

import collections
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.outbox import OutboxConfig, OutboxDrainer, OutboxEntry, OutboxQueue, TokenBucket


class FakeClock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_fifo_order_and_ack(tmp_path: Path) -> None:
    q = OutboxQueue(tmp_path / "o.db")
    ids = [q.put(f"t/{i}", f"p{i}".encode()) for i in range(10)]
    assert all(isinstance(i, int) for i in ids)
    assert ids == sorted(ids)
    rows = q.peek(0, 4)
    assert [r.payload for r in rows] == [b"p0", b"p1", b"p2", b"p3"]
    assert [r.payload for r in q.peek(rows[-1].row_id, 100)][:2] == [b"p4", b"p5"]
    q.ack([r.row_id for r in rows])
    st = q.stats()
    assert st.depth == 6 and st.published == 4 and st.enqueued == 10
    assert q.peek(0, 1)[0].payload == b"p4"
    q.ack([rows[0].row_id])  # already gone: ignored
    assert q.stats().published == 4


def test_survives_reopen_with_correlation_and_order(tmp_path: Path) -> None:
    path = tmp_path / "state" / "o.db"
    q = OutboxQueue(path)
    for i in range(100):
        q.put("reply/x", f"r{i}".encode(), correlation=b"\x00\x01" if i % 2 else None)
    q.ack([q.peek(0, 1)[0].row_id])
    # no close(): the process "dies" with the connection open
    q2 = OutboxQueue(path)
    rows = q2.peek(0, 1000)
    assert [r.payload for r in rows] == [f"r{i}".encode() for i in range(1, 100)]
    assert rows[0].correlation == b"\x00\x01" and rows[1].correlation is None
    assert q2.stats().depth == 99
    new_id = q2.put("reply/x", b"later")
    assert new_id is not None and new_id > rows[-1].row_id


def test_drop_oldest_prefers_telemetry_and_counts(tmp_path: Path) -> None:
    cfg = OutboxConfig(max_bytes=2048)
    q = OutboxQueue(tmp_path / "o.db", cfg)
    q.put("r", b"R" * 300, kind="result")
    for _ in range(4):
        q.put("t", b"T" * 300, kind="telemetry")
    assert q.stats().bytes <= 2048
    q.put("r", b"N" * 600, kind="result")
    st = q.stats()
    assert st.bytes <= 2048
    assert st.dropped.get("full:telemetry", 0) >= 1
    assert "full:result" not in st.dropped
    kinds = [r.kind for r in q.peek(0, 100)]
    assert kinds[0] == "result" and kinds[-1] == "result"


def test_reject_new_policy(tmp_path: Path) -> None:
    q = OutboxQueue(tmp_path / "o.db", OutboxConfig(max_bytes=1024, drop_policy="reject_new"))
    assert q.put("r", b"x" * 700) is not None
    assert q.put("r", b"y" * 700) is None
    assert q.stats().dropped == {"rejected:result": 1}
    assert [r.payload[:1] for r in q.peek()] == [b"x"]


def test_too_large_is_dropped_and_counted(tmp_path: Path) -> None:
    q = OutboxQueue(tmp_path / "o.db", OutboxConfig(max_bytes=1024))
    assert q.put("r", b"z" * 5000, kind="bench") is None
    assert q.stats().dropped == {"too_large:bench": 1}


def test_ttl_expiry(tmp_path: Path) -> None:
    clock = FakeClock()
    q = OutboxQueue(tmp_path / "o.db", OutboxConfig(ttl_s=60), clock=clock)
    q.put("r", b"old")
    clock.t += 61
    q.put("r", b"new")
    assert [r.payload for r in q.peek()] == [b"new"]
    assert q.stats().dropped == {"expired:result": 1}
    clock.t += 61
    assert q.purge_expired() == 1
    assert q.stats().depth == 0 and q.stats().bytes == 0


def test_corrupt_file_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    path.write_bytes(b"this is not a sqlite database" * 100)
    q = OutboxQueue(path)
    assert q.put("r", b"ok") is not None
    assert list(tmp_path.glob("o.db.corrupt-*"))


def test_concurrent_producers_keep_every_message(tmp_path: Path) -> None:
    q = OutboxQueue(tmp_path / "o.db")

    def produce(n: int) -> None:
        for i in range(500):
            q.put("t", f"{n}-{i}".encode())

    threads = [threading.Thread(target=produce, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = q.peek(0, 5000)
    assert len(rows) == 2000
    for n in range(4):  # each producer's messages stay in its order
        mine = [r.payload for r in rows if r.payload.startswith(f"{n}-".encode())]
        assert mine == [f"{n}-{i}".encode() for i in range(500)]


def test_invalid_config_is_refused() -> None:
    with pytest.raises(ValueError, match="drop_policy"):
        OutboxConfig(drop_policy="drop_everything")
    with pytest.raises(ValueError, match="synchronous"):
        OutboxConfig(synchronous="off")


def test_token_bucket() -> None:
    clock = FakeClock(0.0)
    b = TokenBucket(10.0, burst=5, clock=clock)
    assert b.available() == 5
    b.take(5)
    assert b.available() == 0
    assert b.seconds_until(1) == pytest.approx(0.1)
    clock.t += 0.35
    assert b.available() == 3
    clock.t += 100
    assert b.available() == 5


class FakeHandle:
    def __init__(self) -> None:
        self.done = False

    def is_published(self) -> bool:
        return self.done


class FakeLink:
    """Acknowledges every publish at once while 'connected'."""

    def __init__(self) -> None:
        self.connected = threading.Event()
        self.sent: list[bytes] = []

    def is_connected(self) -> bool:
        return self.connected.is_set()

    def publish_entry(self, entry: OutboxEntry) -> FakeHandle:
        h = FakeHandle()
        self.sent.append(entry.payload)
        h.done = True
        return h


def test_drainer_publishes_in_order_only_when_connected(tmp_path: Path) -> None:
    q = OutboxQueue(tmp_path / "o.db", OutboxConfig(replay_rate_per_s=100_000))
    for i in range(300):
        q.put("t", str(i).encode())
    link = FakeLink()
    d = OutboxDrainer(q, link)
    d.start()
    try:
        assert not q.wait_for_rows(1 << 62, 0.3)  # nothing happens while disconnected
        assert link.sent == []
        link.connected.set()
        d.wake()
        for _ in range(500):
            if q.stats().depth == 0:
                break
            threading.Event().wait(0.01)
        assert q.stats().depth == 0
        assert link.sent == [str(i).encode() for i in range(300)]
    finally:
        d.stop()


def test_wal_mode_is_used(tmp_path: Path) -> None:
    q = OutboxQueue(tmp_path / "o.db")
    q.put("t", b"x")
    mode = sqlite3.connect(tmp_path / "o.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_put_after_close_is_counted_not_raised(tmp_path: Path) -> None:
    q = OutboxQueue(tmp_path / "o.db")
    q.put("t", b"x")
    q.close()
    assert q.put("t", b"late", kind="cmd") is None
    assert q.peek() == [] and q.purge_expired() == 0
    q.ack([1])
    assert q.stats().dropped == {"closed:cmd": 1}
    assert OutboxQueue(tmp_path / "o.db").stats().depth == 1


class CountingQueue(OutboxQueue):
    """Records how many rows each non-empty read of the drainer fetched."""

    def __init__(self, path: Path, config: OutboxConfig) -> None:
        super().__init__(path, config)
        self.rows_per_read: list[int] = []

    def peek(self, after_id: int = 0, limit: int = 64) -> list[OutboxEntry]:
        rows = super().peek(after_id, limit)
        if rows:
            self.rows_per_read.append(len(rows))
        return rows


class TrickleAckLink(FakeLink):
    """Acknowledges one publish at a time from its own thread, calling ``on_ack`` after each
    one, as paho's network thread does for every PUBACK."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: collections.deque[FakeHandle] = collections.deque()
        self.on_ack: Callable[[], None] = lambda: None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._ack, daemon=True)
        self.thread.start()

    def publish_entry(self, entry: OutboxEntry) -> FakeHandle:
        h = FakeHandle()
        self.sent.append(entry.payload)
        self.pending.append(h)
        return h

    def _ack(self) -> None:
        while not self.stop.is_set():
            if self.pending:
                self.pending.popleft().done = True
                self.on_ack()
            # a pause after each PUBACK lets the drainer run between two of them
            self.stop.wait(0.0002)


def test_drainer_refills_a_full_window_in_batches(tmp_path: Path) -> None:
    """With a full window the drainer waits for half of it to be acknowledged and then reads
    that many rows at once: one SQLite read per batch, not one per PUBACK."""
    window = 32
    q = CountingQueue(tmp_path / "o.db", OutboxConfig(replay_rate_per_s=1e9,
                                                      inflight_window=window))
    n = 1000
    for i in range(n):
        q.put("t", str(i).encode())
    link = TrickleAckLink()
    d = OutboxDrainer(q, link)
    link.on_ack = d.wake
    link.connected.set()
    d.start()
    try:
        end = time.monotonic() + 60
        while q.stats().depth and time.monotonic() < end:
            time.sleep(0.01)
        assert q.stats().depth == 0 and q.stats().published == n
        assert link.sent == [str(i).encode() for i in range(n)]
        assert sum(q.rows_per_read) == n
        # every read but the last (the tail of the queue) fetched at least half a window
        assert min(q.rows_per_read[:-1]) >= window // 2, q.rows_per_read
        assert len(q.rows_per_read) <= n // (window // 2) + 1
    finally:
        d.stop()
        link.stop.set()
