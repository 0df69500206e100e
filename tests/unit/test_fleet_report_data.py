"""Fleet report arithmetic on hand-built data, and loading it from SQLite and PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.fleet.collector import FleetCollector, measured_speeds
from agent.fleet.store import FleetStore
from agent.mqtt import BrokerConfig
from agent.report import Missing
from agent.report_fleet import FleetData, _bucketed, _online_share, load_fleet, summarise
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

    name = f"u{time.time_ns()}"
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield f"postgresql://postgres@127.0.0.1:{pg.port}/{name}"


def test_online_share_follows_status_changes_over_the_window() -> None:
    events = [(0, "online", None), (600, "offline", "lwt"), (800, "online", None)]
    assert _online_share(events, 0, 1000) == pytest.approx(0.8)
    # a device that came online mid-window was not online before
    assert _online_share([(500, "online", None)], 0, 1000) == pytest.approx(0.5)
    # events before the window count from its start
    assert _online_share([(-50, "online", None), (250, "offline", "shutdown")], 0,
                         1000) == pytest.approx(0.25)
    missing = _online_share([], 0, 1000)
    assert isinstance(missing, Missing) and "no status" in missing.why


def test_telemetry_buckets_average_power_and_keep_peak_temperature() -> None:
    rows = [(t, 1000.0 * (t % 2), 40.0 + t) for t in range(100)]
    out = _bucketed(rows, 10)
    assert len(out) == 10
    assert all(p == pytest.approx(500.0) for _, p, _ in out)  # 0/1000 alternating
    assert [c for _, _, c in out] == [49.0 + 10 * i for i in range(10)]
    # short series pass through, None stays None (never 0)
    assert _bucketed([(1, None, None)], 10) == [(1, None, None)]


def test_costs_and_estimates_from_router_records() -> None:
    data = FleetData(fleet="f", devices=["d"], states={"d": "online"}, t0_ms=0, t1_ms=10)
    data.requests = [
        {"served_by": "edge", "status": "ok", "device": "d", "energy_j": 36.0,
         "completion_tokens": 10,
         "prompt_tokens": 5, "cost_usd": None, "fallback_reason": None,
         "energy_source": "device rapl"},
        {"served_by": "edge", "status": "ok", "device": "d", "energy_j": 36.0,
         "completion_tokens": 20,
         "prompt_tokens": 5, "cost_usd": None, "fallback_reason": None,
         "energy_source": "telemetry power x service time"},
        {"served_by": "cloud", "status": "ok", "device": None, "energy_j": None,
         "completion_tokens": 3,
         "prompt_tokens": 11, "cost_usd": 0.002, "fallback_reason": "no_capacity",
         "energy_source": None},
        {"served_by": "none", "status": "error", "device": None, "energy_j": None,
         "completion_tokens": None,
         "prompt_tokens": None, "cost_usd": None, "fallback_reason": None,
         "energy_source": None},
    ]
    s = summarise(data, price_kwh=0.5)
    row = s.row("d")
    assert row.served == 2 and row.edge_energy_j == pytest.approx(72.0)
    assert row.edge_cost_usd == pytest.approx(72.0 / 3.6e6 * 0.5)
    assert row.edge_energy_estimated  # one of the two is telemetry power x service time
    assert row.mj_per_token == pytest.approx(72_000.0 / 30)
    assert (s.edge, s.cloud, s.not_served) == (2, 1, 1)
    assert s.cloud_by_reason == {"no_capacity": 1}
    assert s.cloud_cost_usd == pytest.approx(0.002)
    # a cloud fallback that failed (the endpoint was down) was not served: a new user's
    # report showed "cloud served 5, not served 0" with two of the five unanswered
    failed = {"served_by": "cloud", "status": "error", "device": None, "energy_j": None,
              "completion_tokens": None, "prompt_tokens": None, "cost_usd": None,
              "fallback_reason": "no_capacity", "energy_source": None}
    s2 = summarise(FleetData(fleet="f", devices=["d"], states={"d": "online"}, t0_ms=0,
                             t1_ms=10, requests=[*data.requests, failed]), price_kwh=0.5)
    assert (s2.edge, s2.cloud, s2.not_served) == (2, 1, 2)
    assert s2.cloud_by_reason == {"no_capacity": 1}
    assert (s.cloud_prompt_tokens, s.cloud_completion_tokens) == (11, 3)
    # only the device's own, non-estimated energy counts as measured
    data.requests = data.requests[:1]
    assert not summarise(data).row("d").edge_energy_estimated
    data.requests[0]["energy_source"] = "device estimate:cpu_util (estimated)"
    assert summarise(data).row("d").edge_energy_estimated


def test_load_fleet_and_measured_speeds(db_url: str) -> None:
    store = FleetStore(db_url)
    col = FleetCollector(store, BrokerConfig("127.0.0.1", 1), "f")
    for seq, (status, tgs) in enumerate((("ok", 30.0), ("ok", 10.0), ("error", None),
                                         ("ok", 20.0)), 1):
        col.handle("edgelm/v1/f/d/infer/response/x", {
            "schema": "edgelm.infer.result/1", "device": "d", "fleet": "f", "seq": seq,
            "ts_unix_ms": 1000 * seq, "id": f"x{seq}", "status": status,
            "usage": {"completion_tokens": 4} if status == "ok" else None,
            "timings": {"ttft_ms": 100.0 * seq, "decode_tok_s": tgs},
            "energy": None, "error": None if status == "ok" else {"code": "overloaded"}})
    data = load_fleet(store, "f")
    assert data.devices == ["d"] and len(data.results["d"]) == 4
    assert data.energy_missing["d"] == "the results carry no energy object"
    row = summarise(data).row("d")
    assert row.results == 4 and row.decode_p50_tok_s == pytest.approx(20.0)
    assert row.ttft_p50_ms == pytest.approx(200.0)  # ok results only: 100, 200, 400
    assert isinstance(row.mj_per_token, Missing)
    assert measured_speeds(store, "f")["d"][0]["decode_tok_s"] == pytest.approx(20.0)
    assert measured_speeds(store, "other") == {}
    store.close()
