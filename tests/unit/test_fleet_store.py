"""Store and collector logic on SQLite and on a throwaway PostgreSQL (no broker needed)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from agent.cli import main
from agent.errors import ConfigError
from agent.fleet.collector import RECORD_SCHEMA, FleetCollector, fleet_view, telemetry_summary
from agent.fleet.store import SCHEMA_VERSION, FleetStore
from agent.mqtt import BrokerConfig
from tests.pg_support import Postgres


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    pg = Postgres().start()
    yield pg
    pg.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fleet.db'}"
        return
    pg: Postgres = request.getfixturevalue("postgres")
    import psycopg

    name = f"t{time.time_ns()}"
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield f"postgresql://postgres@127.0.0.1:{pg.port}/{name}"


def now_ms() -> int:
    return int(time.time() * 1000)


def status(device: str, seq: int, state: str = "online") -> dict[str, Any]:
    return {"schema": "edgelm.status/1", "device": device, "fleet": "f", "seq": seq,
            "ts_unix_ms": now_ms(), "state": state, "reason": None if state == "online"
            else "lwt", "agent_version": "0.1.0", "models": [], "backends": {}, "probes": {}}


def telemetry(device: str, seq: int, ts: int, power_mw: float = 4200.0) -> dict[str, Any]:
    return {"schema": "edgelm.telemetry/1", "device": device, "fleet": "f", "seq": seq,
            "ts_unix_ms": ts, "queue_depth": 2, "inflight": 1,
            "probes": {"cpu": {"util_pct": 55.0, "load_1m": 1.5},
                       "thermal": {"zones": [{"name": "cpu", "temp_c": 61.0},
                                             {"name": "gpu", "temp_c": 58.5}]}},
            "power": [{"source": "rapl", "covers": "cpu_package", "power_mw": power_mw},
                      {"source": "est", "covers": "estimate", "power_mw": 9999.0}]}


def result(device: str, seq: int, rid: str) -> dict[str, Any]:
    return {"schema": "edgelm.infer.result/1", "device": device, "fleet": "f", "seq": seq,
            "ts_unix_ms": now_ms(), "id": rid, "status": "ok", "text": "hi",
            "finish_reason": "stop", "error": None,
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
            "timings": {"ttft_ms": 120.0, "decode_tok_s": 33.0, "e2e_ms": 300.0},
            "served_by": {"device": device, "backend": "llamacpp", "model": "m"}}


def collector(store: FleetStore, **kw: Any) -> FleetCollector:
    return FleetCollector(store, BrokerConfig("127.0.0.1", 1), "f", **kw)


def test_migrations_are_recorded_and_idempotent(db_url: str) -> None:
    s = FleetStore(db_url)
    assert s.version() == SCHEMA_VERSION
    assert s.migrate() == SCHEMA_VERSION
    s.close()
    s2 = FleetStore(db_url)  # reopening applies nothing twice
    assert s2.query("SELECT COUNT(*) FROM schema_version") == [(SCHEMA_VERSION,)]
    s2.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    s = FleetStore(url)
    s.execute("INSERT INTO schema_version VALUES (?, ?)", (SCHEMA_VERSION + 5, 0))
    s.close()
    with pytest.raises(ConfigError, match="upgrade"):
        FleetStore(url)


def test_collector_is_idempotent_on_device_seq(db_url: str) -> None:
    store = FleetStore(db_url)
    c = collector(store, telemetry_every_s=0.0)
    assert c.handle("edgelm/v1/f/d1/status", status("d1", 1))
    assert not c.handle("edgelm/v1/f/d1/status", status("d1", 1))  # redelivery
    ts = now_ms()
    assert c.handle("edgelm/v1/f/d1/telemetry", telemetry("d1", 2, ts))
    assert not c.handle("edgelm/v1/f/d1/telemetry", telemetry("d1", 2, ts))
    assert c.handle("edgelm/v1/f/router/r/reply", result("d1", 3, "a"))
    assert not c.handle("edgelm/v1/f/router/r/reply", result("d1", 3, "a"))
    rec = {"schema": RECORD_SCHEMA, "device": "r", "router": "r", "fleet": "f", "seq": 7,
           "ts_unix_ms": now_ms(), "request_id": "a", "served_by": "edge", "edge_device": None,
           "status": "ok", "prompt_tokens": 10, "completion_tokens": 5, "cost_usd": 1e-6}
    assert c.handle("edgelm/v1/f/router/r/record", rec)
    assert not c.handle("edgelm/v1/f/router/r/record", rec)
    bench = {"schema": "edgelm.bench/1", "backend": "llamacpp", "model": {"name": "m"},
             "summary": {"decode_tok_s": {"mean": 40.0}, "prefill_tok_s": {"mean": 400.0}}}
    assert c.handle("edgelm/v1/f/d1/bench/result", bench)
    assert not c.handle("edgelm/v1/f/d1/bench/result", bench)
    assert c.counts["duplicates"] == 5
    for table, n in (("status_events", 1), ("telemetry", 1), ("results", 1), ("requests", 1),
                     ("bench", 1)):
        assert store.query(f"SELECT COUNT(*) FROM {table}") == [(n,)], table
    store.close()


def test_status_order_retained_by_seq_live_by_arrival(db_url: str) -> None:
    store = FleetStore(db_url)
    c = collector(store)
    c.handle("edgelm/v1/f/d1/status", status("d1", 10, "offline"))
    c.handle("edgelm/v1/f/d1/status", status("d1", 4, "online"), retained=True)  # stale replay
    assert store.query("SELECT state FROM devices WHERE device = 'd1'") == [("offline",)]
    # a live LWT carries the seq reserved at connect time, older than the online status
    c.handle("edgelm/v1/f/d2/status", status("d2", 12, "online"))
    c.handle("edgelm/v1/f/d2/status", status("d2", 11, "offline"))
    assert store.query("SELECT state FROM devices WHERE device = 'd2'") == [("offline",)]
    store.close()


def test_a_last_will_is_dated_when_it_fires_not_when_it_was_registered(db_url: str) -> None:
    """A new user's report showed a kill -9'd device online 99.8 % of the time: the will's
    payload (and ts) is fixed at connect, so the crash was dated to the connect."""
    store = FleetStore(db_url)
    c = collector(store)
    connected = now_ms() - 600_000  # the agent connected ten minutes ago
    will = {**status("d1", 1, "offline"), "reason": "lwt", "ts_unix_ms": connected}
    c.handle("edgelm/v1/f/d1/status", {**status("d1", 2), "ts_unix_ms": connected})
    before = now_ms()
    c.handle("edgelm/v1/f/d1/status", will)  # live: the broker publishes it on the loss
    (ts,) = store.query("SELECT ts_ms FROM status_events WHERE device = 'd1' AND seq = 1")[0]
    assert before <= int(ts) <= now_ms()
    # a retained will replayed after the collector was away: no earlier than the device's
    # last stored telemetry (it was alive then), not its connect time
    seen = now_ms() - 120_000
    c.handle("edgelm/v1/f/d2/status", {**status("d2", 5), "ts_unix_ms": connected})
    c.handle("edgelm/v1/f/d2/telemetry", telemetry("d2", 6, seen))
    c.handle("edgelm/v1/f/d2/status", {**status("d2", 4, "offline"), "reason": "lwt",
                                       "ts_unix_ms": connected}, retained=True)
    (ts,) = store.query("SELECT ts_ms FROM status_events WHERE device = 'd2' AND seq = 4")[0]
    assert int(ts) == seen
    store.close()


def test_telemetry_downsampling_and_fleet_view(db_url: str) -> None:
    store = FleetStore(db_url)
    c = collector(store, telemetry_every_s=10.0)
    c.handle("edgelm/v1/f/d1/status", status("d1", 1))
    t0 = now_ms()
    for i in range(25):  # one per second for 25 s → rows at 0, 10, 20 s
        c.handle("edgelm/v1/f/d1/telemetry", telemetry("d1", 2 + i, t0 + 1000 * i,
                                                       power_mw=1000.0 + i))
    assert store.query("SELECT COUNT(*) FROM telemetry") == [(3,)]
    c.handle("edgelm/v1/f/router/r/reply", result("d1", 100, "x"))
    view = fleet_view(store, "f")
    assert len(view) == 1
    d = view[0]
    assert d["state"] == "online" and d["queue_depth"] == 2
    assert d["power_mw"] == pytest.approx(1024.0)  # latest reading, not the downsampled one
    assert d["temperature_c"] == pytest.approx(61.0)
    assert d["recent_ttft_ms"] == pytest.approx(120.0)
    assert d["recent_decode_tok_s"] == pytest.approx(33.0)
    store.close()


def test_retention_deletes_old_rows(db_url: str) -> None:
    store = FleetStore(db_url)
    c = collector(store, telemetry_every_s=0.0)
    old = now_ms() - 40 * 86400 * 1000
    c.handle("edgelm/v1/f/d1/telemetry", telemetry("d1", 1, old))
    c.handle("edgelm/v1/f/d1/telemetry", telemetry("d1", 2, now_ms()))
    assert store.retain(30 * 86400) == 1
    assert store.query("SELECT seq FROM telemetry") == [(2,)]
    store.close()


def test_telemetry_summary_prefers_board_power() -> None:
    t = telemetry("d", 1, 0)
    assert telemetry_summary(t)["power_mw"] == 4200.0
    t["power"].append({"source": "ina", "covers": "board_input", "power_mw": 7000.0})
    assert telemetry_summary(t)["power_mw"] == 7000.0
    t["power"] = []
    assert telemetry_summary(t)["power_mw"] is None


def test_cli_fleet_table_and_json(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'f.db'}"
    store = FleetStore(url)
    c = collector(store)
    c.handle("edgelm/v1/f/d1/status", status("d1", 1))
    c.handle("edgelm/v1/f/d2/status", status("d2", 1, "offline"))
    c.handle("edgelm/v1/f/d1/telemetry", telemetry("d1", 2, now_ms()))
    store.close()
    res = CliRunner().invoke(main, ["fleet", "--db", url])
    assert res.exit_code == 0, res.output
    assert "d1" in res.output and "online" in res.output and "offline" in res.output
    res = CliRunner().invoke(main, ["fleet", "--db", url, "--json"])
    assert res.exit_code == 0
    assert "queue_depth" in res.output


def test_bad_db_url() -> None:
    res = CliRunner().invoke(main, ["fleet", "--db", "sqlite://relative"])
    assert res.exit_code == 78
