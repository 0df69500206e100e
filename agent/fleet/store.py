"""Fleet storage: SQLite by default, PostgreSQL (psycopg 3) for fleets.

Every table that holds device messages has a primary key on ``(device, seq)``: the agent's
outbox delivers at least once (DESIGN.md §4), so a redelivered message is ignored by
``INSERT … ON CONFLICT DO NOTHING`` — in both SQLite (≥ 3.24) and PostgreSQL. Router accounting
records are keyed by ``(router, seq)`` the same way, so each request is stored exactly once.

Schema changes are numbered migrations recorded in ``schema_version``; opening a database
applies the missing ones in one transaction. Retention deletes telemetry, results and
accounting records older than a cut-off (status and bench records are kept).

SQL is written once with ``?`` placeholders and portable types (``BIGINT``, ``DOUBLE
PRECISION``, ``TEXT``); the PostgreSQL driver rewrites the placeholders to ``%s``.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from agent.errors import ConfigError

logger = logging.getLogger(__name__)

MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (1, (
        """CREATE TABLE devices (
            fleet TEXT NOT NULL, device TEXT NOT NULL, state TEXT, reason TEXT,
            agent_version TEXT, status_seq BIGINT, status_ts_ms BIGINT, status_json TEXT,
            telemetry_seq BIGINT, telemetry_ts_ms BIGINT, power_mw DOUBLE PRECISION,
            temperature_c DOUBLE PRECISION, cpu_util_pct DOUBLE PRECISION,
            load_1m DOUBLE PRECISION, queue_depth BIGINT, inflight BIGINT,
            PRIMARY KEY (fleet, device))""",
        """CREATE TABLE status_events (
            device TEXT NOT NULL, seq BIGINT NOT NULL, fleet TEXT, ts_ms BIGINT, state TEXT,
            reason TEXT, payload TEXT, PRIMARY KEY (device, seq))""",
        """CREATE TABLE telemetry (
            device TEXT NOT NULL, seq BIGINT NOT NULL, fleet TEXT, ts_ms BIGINT,
            power_mw DOUBLE PRECISION, temperature_c DOUBLE PRECISION,
            cpu_util_pct DOUBLE PRECISION, load_1m DOUBLE PRECISION, queue_depth BIGINT,
            inflight BIGINT, payload TEXT, PRIMARY KEY (device, seq))""",
        "CREATE INDEX telemetry_ts ON telemetry (ts_ms)",
        """CREATE TABLE results (
            device TEXT NOT NULL, seq BIGINT NOT NULL, fleet TEXT, ts_ms BIGINT,
            request_id TEXT, status TEXT, error_code TEXT, prompt_tokens BIGINT,
            completion_tokens BIGINT, ttft_ms DOUBLE PRECISION, decode_tok_s DOUBLE PRECISION,
            e2e_ms DOUBLE PRECISION, payload TEXT, PRIMARY KEY (device, seq))""",
        "CREATE INDEX results_ts ON results (ts_ms)",
        """CREATE TABLE bench (
            device TEXT NOT NULL, seq BIGINT NOT NULL, fleet TEXT, ts_ms BIGINT, backend TEXT,
            model TEXT, decode_tok_s DOUBLE PRECISION, prefill_tok_s DOUBLE PRECISION,
            ttft_ms DOUBLE PRECISION, payload TEXT, PRIMARY KEY (device, seq))""",
        """CREATE TABLE requests (
            router TEXT NOT NULL, seq BIGINT NOT NULL, fleet TEXT, ts_ms BIGINT,
            request_id TEXT, source TEXT, policy TEXT, served_by TEXT, device TEXT,
            status TEXT, error_code TEXT, fallback_reason TEXT, attempts BIGINT,
            prompt_tokens BIGINT, completion_tokens BIGINT, ttft_ms DOUBLE PRECISION,
            e2e_ms DOUBLE PRECISION, energy_j DOUBLE PRECISION, cost_usd DOUBLE PRECISION,
            payload TEXT, PRIMARY KEY (router, seq))""",
        "CREATE INDEX requests_ts ON requests (ts_ms)",
    )),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]

Row = tuple[Any, ...]


class FleetStore:
    """A connection to the fleet database (thread-safe: one lock around one connection).

    Args:
        url: ``sqlite:///path``, a plain path, or ``postgresql://…``.
    """

    def __init__(self, url: str, *, create: bool = True) -> None:
        self.url = url
        self._lock = threading.Lock()
        self.kind: str
        self._conn: Any
        scheme = url.split("://", 1)[0].lower() if "://" in url else None
        if scheme is not None and scheme not in ("sqlite", "postgresql", "postgres"):
            # Before, "mysql://host/db" was taken for a relative SQLite path: a directory
            # "mysql:" appeared and the command reported an empty fleet.
            raise ConfigError(f"--db {_redact(url)}: unsupported database URL; use "
                              "sqlite:///path or postgresql://…")
        if url.startswith(("postgresql://", "postgres://")):
            try:
                import psycopg
            except ImportError as exc:
                raise ConfigError(
                    f"--db {url!r} needs psycopg 3: install the 'fleet' extra "
                    "(pip install 'edgelm-agent[fleet]')") from exc
            try:
                self._conn = psycopg.connect(url, autocommit=False)
            except psycopg.Error as exc:
                raise ConfigError(f"cannot connect to {_redact(url)}: {exc}") from exc
            self.kind = "postgresql"
        else:
            path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else url
            if url.startswith("sqlite://") and not url.startswith("sqlite:///"):
                raise ConfigError(f"--db {url!r}: use sqlite:///relative or sqlite:////abs")
            if not create and not Path(path).exists():
                # Readers (report, fleet, route --db) must not create an empty database
                # where a path has a typo, then report "no devices".
                raise ConfigError(f"--db {url}: no database at {Path(path).resolve()} "
                                  "(agentctl collect --db creates it)")
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                self._conn = sqlite3.connect(path, check_same_thread=False, timeout=30)
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=NORMAL")
            except (sqlite3.Error, OSError) as exc:
                raise ConfigError(f"--db {url}: {path} is not a usable SQLite database: "
                                  f"{exc}") from exc
            self.kind = "sqlite"
        try:
            self.migrate()
        except (sqlite3.Error, OSError) as exc:
            self._conn.close()
            raise ConfigError(f"--db {_redact(url)}: cannot prepare the database: {exc}"
                              ) from exc

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.kind == "postgresql" else sql

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement and commit; return the affected row count."""
        with self._lock:
            cur = self._conn.cursor()
            try:
                cur.execute(self._sql(sql), tuple(params))
                n = int(cur.rowcount or 0)
                self._conn.commit()
                return n
            except Exception:
                self._conn.rollback()
                raise
            finally:
                cur.close()

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """Run a query and return all rows."""
        with self._lock:
            cur = self._conn.cursor()
            try:
                cur.execute(self._sql(sql), tuple(params))
                rows = [tuple(r) for r in cur.fetchall()]
                self._conn.commit()
                return rows
            finally:
                cur.close()

    def version(self) -> int:
        """Applied schema version (0 for an empty database)."""
        with self._lock:
            cur = self._conn.cursor()
            try:
                cur.execute("CREATE TABLE IF NOT EXISTS schema_version "
                            "(version BIGINT PRIMARY KEY, applied_ms BIGINT)")
                cur.execute("SELECT MAX(version) FROM schema_version")
                row = cur.fetchone()
                self._conn.commit()
            finally:
                cur.close()
        return int(row[0]) if row and row[0] is not None else 0

    def migrate(self) -> int:
        """Apply missing migrations; return the schema version now in place.

        Raises:
            ConfigError: The database is newer than this code.
        """
        current = self.version()
        if current > SCHEMA_VERSION:
            raise ConfigError(f"{_redact(self.url)} has schema version {current}; this agentctl "
                              f"knows up to {SCHEMA_VERSION}: upgrade edgelm-agent")
        for version, statements in MIGRATIONS:
            if version <= current:
                continue
            with self._lock:
                cur = self._conn.cursor()
                try:
                    for stmt in statements:
                        cur.execute(stmt)
                    cur.execute(self._sql("INSERT INTO schema_version VALUES (?, ?)"),
                                (version, int(time.time() * 1000)))
                    self._conn.commit()
                except Exception:
                    self._conn.rollback()
                    raise
                finally:
                    cur.close()
            logger.info("database migrated to schema version %d", version)
        return max(current, SCHEMA_VERSION)

    def insert(self, table: str, row: Mapping[str, Any]) -> bool:
        """Insert ``row`` unless its key exists; True if it was new."""
        cols = list(row)
        sql = (f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
               " ON CONFLICT DO NOTHING")
        return self.execute(sql, [row[c] for c in cols]) > 0

    def upsert_device(self, fleet: str, device: str, fields: Mapping[str, Any]) -> None:
        """Create the device row if needed and set ``fields`` on it."""
        self.execute("INSERT INTO devices (fleet, device) VALUES (?, ?) ON CONFLICT DO NOTHING",
                     (fleet, device))
        if fields:
            sets = ", ".join(f"{k} = ?" for k in fields)
            self.execute(f"UPDATE devices SET {sets} WHERE fleet = ? AND device = ?",
                         [*fields.values(), fleet, device])

    def retain(self, max_age_s: float, now_ms: int | None = None) -> int:
        """Delete telemetry, results and request records older than ``max_age_s``."""
        cutoff = (now_ms if now_ms is not None else int(time.time() * 1000)) - int(
            max_age_s * 1000)
        return sum(self.execute(f"DELETE FROM {t} WHERE ts_ms < ?", (cutoff,))
                   for t in ("telemetry", "results", "requests"))

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._conn.close()


def _redact(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return url


def dumps(obj: Any) -> str:
    """Compact JSON for payload columns."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)
