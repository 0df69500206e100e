"""Hostile state and hostile clients against the idempotency store and cache.

Found by trying to break persistent idempotency (``idempotency.sqlite3``): a state file the
agent cannot open must not stop the agent or be thrown away, a file whose pages are damaged
must not make request admission raise, and one id reused for a *different* request must not be
answered with the first request's text.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sqlite3
from pathlib import Path

import pytest

from agent.admission import IdempotencyCache, ResultStore, request_fingerprint
from agent.protocol import parse_request


def _req(body: str) -> object:
    return parse_request(body.encode(), 1 << 20)


def test_a_state_path_that_cannot_be_opened_degrades_to_memory_and_is_left_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Something that is not a database file at all (here a directory holding someone's data,
    # the same sqlite error as a read-only or foreign-owned file: "unable to open"): before,
    # it was renamed aside as if corrupt, and a rename that failed killed the daemon.
    path = tmp_path / "idempotency.sqlite3"
    path.mkdir()
    (path / "keep").write_text("not ours")
    with caplog.at_level(logging.ERROR, logger="agent.admission"):
        store = ResultStore(path)
    assert (path / "keep").read_text() == "not ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idempotency.sqlite3"]
    assert store.disabled_reason is not None and "unable to open" in store.disabled_reason
    assert "kept in memory only" in caplog.text
    store.put("r1", b"x")  # no-ops, never raise
    assert store.get("r1") is None and len(store) == 0
    cache = IdempotencyCache(store=store)
    assert cache.claim("r1", "a") == (IdempotencyCache.NEW, None)
    cache.complete("r1", b"done")
    assert cache.claim("r1", "b") == (IdempotencyCache.DONE, b"done")  # memory still works
    store.close()


def test_damaged_pages_make_lookups_miss_instead_of_raising(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "idempotency.sqlite3"
    store = ResultStore(path)
    for i in range(200):
        store.put(f"id{i}", b"x" * 500)
    store.close()
    for suffix in ("-wal", "-shm"):
        with pytest.raises(FileNotFoundError):  # closed cleanly: all in the main file
            os.unlink(f"{path}{suffix}")
    data = bytearray(path.read_bytes())
    data[4096:12288] = b"\x5a" * 8192  # the header survives, the table's pages do not
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.ERROR, logger="agent.admission"):
        damaged = ResultStore(path)
        # Before: sqlite3.DatabaseError out of get(), i.e. out of admission on the MQTT
        # thread, and the request was never answered.
        assert damaged.get("id5") is None
        cache = IdempotencyCache(store=damaged)
        assert cache.claim("id7", "a") == (IdempotencyCache.NEW, None)
        assert cache.complete("id7", b"y") == []  # the failed write is logged, not raised
        assert cache.claim("id7", "b") == (IdempotencyCache.DONE, b"y")
    assert "malformed" in caplog.text
    damaged.close()


def test_an_id_reused_for_a_different_request_is_a_conflict_not_the_old_answer(
    tmp_path: Path
) -> None:
    """Decision: an id is an idempotency key for *one* request. A retry must repeat it;
    the same id with another prompt or other generation settings is a client bug (ids
    collided), and answering it with the first request's text would be silently wrong.
    Transport settings a retry may legitimately change (``stream``, ``deadline_ms``,
    ``client_id``) are not part of the request's identity."""
    first = _req('{"id":"r1","prompt":"Hi","max_tokens":2}')
    retry = _req('{"id":"r1","prompt":"Hi","max_tokens":2,"stream":false,"deadline_ms":900,'
                 '"client_id":"other"}')
    other = _req('{"id":"r1","prompt":"Something else","max_tokens":2}')
    more = _req('{"id":"r1","prompt":"Hi","max_tokens":3}')
    fp = request_fingerprint(first)  # type: ignore[arg-type]
    assert request_fingerprint(retry) == fp  # type: ignore[arg-type]
    assert request_fingerprint(other) != fp  # type: ignore[arg-type]
    assert request_fingerprint(more) != fp  # type: ignore[arg-type]

    path = tmp_path / "idempotency.sqlite3"
    cache = IdempotencyCache(store=ResultStore(path))
    assert cache.claim("r1", "a", fp) == (IdempotencyCache.NEW, None)
    # while it runs
    assert cache.claim("r1", "b", request_fingerprint(other)) == (  # type: ignore[arg-type]
        IdempotencyCache.CONFLICT, None)
    assert cache.claim("r1", "c", fp) == (IdempotencyCache.PENDING, None)
    assert cache.complete("r1", b"final") == ["c"]  # the conflicting one did not attach
    # once done
    assert cache.claim("r1", "d", request_fingerprint(more)) == (  # type: ignore[arg-type]
        IdempotencyCache.CONFLICT, None)
    assert cache.claim("r1", "e", fp) == (IdempotencyCache.DONE, b"final")
    # after a restart, from disk
    again = IdempotencyCache(store=ResultStore(path))
    assert again.claim("r1", "f", request_fingerprint(other)) == (  # type: ignore[arg-type]
        IdempotencyCache.CONFLICT, None)
    assert again.claim("r1", "g", fp) == (IdempotencyCache.DONE, b"final")
    # a caller that has no fingerprint (older code paths) keeps the old behaviour
    assert again.claim("r1", "h") == (IdempotencyCache.DONE, b"final")


def test_a_store_written_before_fingerprints_is_upgraded_and_keeps_its_results(
    tmp_path: Path
) -> None:
    path = tmp_path / "idempotency.sqlite3"
    db = sqlite3.connect(path)  # the layout of the first release of idempotency.sqlite3
    db.execute("CREATE TABLE results (id TEXT PRIMARY KEY, payload BLOB NOT NULL, "
               "created_unix_ms INTEGER NOT NULL, expires_unix_ms INTEGER NOT NULL)")
    db.execute("INSERT INTO results VALUES ('old', x'6f6c64', 1, 99999999999999)")
    db.commit()
    db.close()
    store = ResultStore(path)
    assert store.disabled_reason is None
    assert store.get("old") == b"old"
    cache = IdempotencyCache(store=store)
    fp = request_fingerprint(dataclasses.replace(
        _req('{"id":"old","prompt":"x","max_tokens":1}')))  # type: ignore[type-var]
    # no fingerprint was stored: nothing to compare, the stored answer stands
    assert cache.claim("old", "a", fp) == (IdempotencyCache.DONE, b"old")
    store.put("new", b"n", fingerprint="abc")
    assert store.get_entry("new") == (b"n", "abc")
    assert sorted(p.name for p in tmp_path.iterdir() if "corrupt" in p.name) == []
