"""``agentctl report --db``: fleet figures from a database the real collector filled over MQTT.

A real mosquitto; the real collector (SQLite, and the test's own PostgreSQL); the real router
with scripted devices (``tests.fleet_support``) and a stub cloud; device telemetry, a direct
device result with measured energy, and an LWT are published as wire payloads (each validated
against its JSON Schema). The assertions are on the report's data — devices, requests served
per device and by the cloud, fallback reasons, energy per token and whether it is estimated,
costs, missing values and their reasons — and on the files written.
"""

from __future__ import annotations

import html
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from agent.cli import main
from agent.fleet.collector import FleetCollector
from agent.fleet.ratelimit import WindowLimits
from agent.fleet.store import FleetStore
from agent.mqtt import parse_broker_url
from agent.report import Missing
from agent.report_fleet import FLEET_FIGURES, render_fleet_report, summary_table
from tests.fleet_support import FakeDevice, StubCloud, ask, make_router, wait_for
from tests.pg_support import Postgres
from tests.support import Mosquitto, TestClient, validate

pytestmark = [pytest.mark.broker]
pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STUB_COST_USD = (11 * 0.15 + 3 * 0.60) / 1e6  # the stub cloud's usage at the default prices


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

    name = f"r{time.time_ns()}"
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield f"postgresql://postgres@127.0.0.1:{pg.port}/{name}"


@pytest.fixture
def cloud() -> Iterator[StubCloud]:
    c = StubCloud()
    yield c
    c.close()


def telemetry(fleet: str, device: str, seq: int, power: list[dict[str, Any]],
              temp_c: float | None) -> dict[str, Any]:
    probes: dict[str, Any] = {"cpu": {"util_pct": 40.0 + seq, "load_1m": 0.5}}
    if temp_c is not None:
        probes["thermal"] = {"zones": [{"name": "cpu", "temp_c": temp_c}]}
    body = {"schema": "edgelm.telemetry/1", "device": device, "fleet": fleet, "seq": seq,
            "ts_unix_ms": int(time.time() * 1000), "probes": probes, "power": power,
            "queue_depth": 0, "inflight": 0}
    validate(body, "telemetry.json")
    return body


def metered_result(fleet: str, device: str, seq: int) -> dict[str, Any]:
    """A device's answer to a direct (MQTT 3.1.1) client, with energy from a sensor."""
    body = {"schema": "edgelm.infer.result/1", "device": device, "fleet": fleet, "seq": seq,
            "ts_unix_ms": int(time.time() * 1000), "id": "direct-1", "status": "ok",
            "text": "hello", "finish_reason": "stop", "error": None, "chunks": 1,
            "usage": {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20},
            "timings": {"queue_ms": 0.5, "ttft_ms": 30.0, "prefill_tok_s": 400.0,
                        "decode_tok_s": 55.0, "itl_ms": 18.0, "tpot_ms": 20.0,
                        "e2e_ms": 160.0},
            "energy": {"gross_mj": 960.0, "net_mj": 400.0, "mj_per_token": 120.0,
                       "source": "rapl", "method": "components", "estimated": False,
                       "coverage": 1.0, "reason": None},
            "served_by": {"device": device, "fleet": fleet, "backend": "llamacpp",
                          "model": "smollm2-135m"}}
    validate(body, "infer_result.json")
    return body


def test_fleet_report_from_the_collectors_database(broker: Mosquitto, cloud: StubCloud,
                                                    db_url: str, tmp_path: Path) -> None:
    fleet = f"rep-{uuid.uuid4().hex[:6]}"
    base = f"edgelm/v1/{fleet}"
    store = FleetStore(db_url)
    col = FleetCollector(store, parse_broker_url(broker.url), fleet, telemetry_every_s=0)
    col.start()
    assert col.wait_connected(10)
    pub = TestClient(broker.port)
    devs = [FakeDevice(broker.port, fleet, n) for n in ("a", "b", "c")]
    r = make_router(broker, fleet, cloud, policy="random",
                    limits=WindowLimits(600.0, max_requests=2))
    try:
        wait_for(lambda: r.online_devices() == ["a", "b", "c"], "devices online")
        # c loses its connection: the broker publishes its last will
        devs[2].status("offline")
        wait_for(lambda: r.online_devices() == ["a", "b"], "c offline")
        # telemetry: a has a RAPL rail and a thermal zone, b only the power model, c nothing
        for seq in range(1, 5):
            pub.publish(f"{base}/a/telemetry", json.dumps(telemetry(fleet, "a", seq, [
                {"source": "rapl", "covers": "cpu_package", "power_mw": 4000.0 + 250 * seq}],
                50.0 + seq)))
            pub.publish(f"{base}/b/telemetry", json.dumps(telemetry(fleet, "b", seq, [
                {"source": "model", "covers": "estimate", "power_mw": 3000.0}], None)))
            pub.publish(f"{base}/c/telemetry", json.dumps(telemetry(fleet, "c", seq, [], None)))
            time.sleep(0.05)
        client = TestClient(broker.port)
        # 2 per device (window budget), then the overflow and an over-long prompt: the cloud
        outs = [ask(client, fleet, {"id": f"q{i}", "prompt": "hi", "max_tokens": 4})
                for i in range(6)]
        outs.append(ask(client, fleet, {"id": "q-big", "prompt": "x" * 4000,
                                        "max_tokens": 4}))
        assert all(o["status"] == "ok" for o in outs)
        client.close()
        # a device answering a direct client, with energy measured by its own sensor
        pub.publish(f"{base}/a/infer/response/direct-1",
                    json.dumps(metered_result(fleet, "a", 1000)))
        wait_for(lambda: store.query("SELECT COUNT(*) FROM requests")[0][0] == 7,
                 "7 records stored", 15)
        wait_for(lambda: store.query("SELECT COUNT(*) FROM results WHERE device = 'a'")[0][0]
                 == 3, "a's results stored", 15)
        wait_for(lambda: store.query("SELECT COUNT(*) FROM telemetry")[0][0] == 12,
                 "telemetry stored", 15)
        recs = list(r.records)
    finally:
        r.stop()
        col.stop()
        for d in devs:
            d.close()
        pub.close()

    out = tmp_path / "report"
    written, summary = render_fleet_report(store, out, ("png", "html"), fleet=fleet,
                                           price_kwh=0.30)
    store.close()
    # ---- the data
    assert [row.device for row in summary.rows] == ["a", "b", "c"]
    assert (summary.requests, summary.edge, summary.cloud, summary.not_served) == (7, 4, 3, 0)
    assert summary.cloud_by_reason == {"no_capacity": 2, "context_overflow": 1}
    assert summary.cloud_cost_usd == pytest.approx(3 * STUB_COST_USD)
    a, b, c = summary.rows
    assert (a.served, b.served, c.served) == (2, 2, 0)
    assert (a.results, b.results, c.results) == (3, 2, 0)
    assert a.state == "online" and c.state == "offline (lwt)"
    assert isinstance(c.online_share, float) and c.online_share < 1.0
    assert a.ttft_p50_ms == pytest.approx(20.0)  # the fake devices' 20 ms and the direct 30 ms
    assert a.decode_p50_tok_s == pytest.approx(50.0)
    assert a.power_mean_w == pytest.approx((4250 + 4500 + 4750 + 5000) / 4 / 1000)
    assert a.temp_max_c == pytest.approx(54.0)
    # b's power comes from the power model only: marked, a's from a RAPL rail: measured
    assert b.power_estimated and not a.power_estimated
    assert b.power_mean_w == pytest.approx(3.0)
    # energy per token: a from its own sensor (960 mJ / 8 tokens), b from the router's
    # estimate (telemetry power x service time), c not measured, with the reason
    assert a.mj_per_token == pytest.approx(120.0) and not a.mj_per_token_estimated
    assert a.mj_per_token_source == "device: rapl"
    assert b.mj_per_token_estimated and "telemetry power" in b.mj_per_token_source
    b_energy = [x["energy_j"] for x in recs if x["edge_device"] == "b"]
    assert b.mj_per_token == pytest.approx(sum(b_energy) * 1000 / 4)  # 2 tokens x 2 requests
    assert isinstance(c.mj_per_token, Missing)
    assert isinstance(c.power_mean_w, Missing) and "no power" in c.power_mean_w.why
    assert isinstance(b.temp_max_c, Missing)
    assert isinstance(c.ttft_p50_ms, Missing)
    # edge cost at the report's price, from the router's energy
    a_energy = sum(x["energy_j"] for x in recs if x["edge_device"] == "a")
    assert a.edge_cost_usd == pytest.approx(a_energy / 3.6e6 * 0.30)
    assert summary.edge_cost_usd == pytest.approx((a_energy + sum(b_energy)) / 3.6e6 * 0.30)
    headers, body = summary_table(summary)
    assert [line[0] for line in body] == ["a", "b", "c", "cloud (fallback)", "not served",
                                          "fleet total"]
    assert body[3][headers.index("served")] == "3"
    assert body[-1][1] == "7 requests"
    # ---- the files
    assert sorted(p.name for p in written) == sorted(
        [f"{s}.png" for s in FLEET_FIGURES] + ["report.html"])
    for stem in FLEET_FIGURES:
        assert (out / f"{stem}.png").read_bytes().startswith(PNG_MAGIC)
    page = html.unescape((out / "report.html").read_text(encoding="utf-8"))
    assert page.count("data:image/png;base64,") == len(FLEET_FIGURES) - 1  # table is HTML
    assert "not measured — telemetry carried no power reading" in page
    assert "(estimated)" in page
    assert '<td>3 <span class="est">(estimated)</span></td>' in page  # b's power cell
    assert "context_overflow 1, no_capacity 2" in page


def test_report_cli_with_db(broker: Mosquitto, tmp_path: Path) -> None:
    """The CLI path on SQLite: a DB with only status and records, and the error cases."""
    url = f"sqlite:///{tmp_path / 'f.db'}"
    store = FleetStore(url)
    col = FleetCollector(store, parse_broker_url(broker.url), "cf")
    now = int(time.time() * 1000)
    col.handle("edgelm/v1/cf/d1/status", {
        "schema": "edgelm.status/1", "device": "d1", "fleet": "cf", "seq": 1,
        "ts_unix_ms": now - 60_000, "state": "online", "reason": None, "agent_version": "0",
        "models": [], "backends": {}, "probes": {}})
    for seq, served in ((1, "edge"), (2, "cloud"), (3, "none")):
        col.handle("edgelm/v1/cf/router/r/record", {
            "schema": "edgelm.route.record/1", "device": "r", "router": "r", "fleet": "cf",
            "seq": seq, "ts_unix_ms": now - 3_600_000 * seq + 60_000, "request_id": f"x{seq}",
            "source": "http", "policy": "random", "served_by": served,
            "edge_device": "d1" if served == "edge" else None,
            "status": "ok" if served != "none" else "error", "attempts": 1, "tried": ["d1"],
            "e2e_ms": 10.0, "prompt_tokens": 3, "completion_tokens": 2,
            "energy_j": 0.5 if served == "edge" else None,
            "energy_source": "assumed 5 W x service time" if served == "edge" else None,
            "cost_usd": 1e-6 if served == "cloud" else None,
            "fallback_reason": "no_capacity" if served == "cloud" else None})
    store.close()
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["report", "--db", url, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "1 device(s), 3 routed request(s) (1 edge, 1 cloud, 1 not served)" in res.output
    page = html.unescape((out / "report.html").read_text(encoding="utf-8"))
    assert "not measured — no inference results stored for this device" in page
    # records 1, 2 and 3 hours old: the last 2.5 h holds two of them
    res = CliRunner().invoke(main, ["report", "--db", url, "--since-hours", "2.5", "--out",
                                    str(tmp_path / "recent")])
    assert res.exit_code == 0, res.output
    assert "1 device(s), 2 routed request(s) (1 edge, 1 cloud, 0 not served)" in res.output
    assert "not measured — no telemetry stored" in page
    # with bench records too, the fleet is a section of the bench page
    fixtures = Path(__file__).resolve().parent.parent / "fixtures" / "bench"
    both = tmp_path / "both"
    res = CliRunner().invoke(main, ["report", str(fixtures), "--db", url, "--out", str(both)])
    assert res.exit_code == 0, res.output
    page = html.unescape((both / "report.html").read_text(encoding="utf-8"))
    assert "Table I" in page and "Fleet — all fleets" in page
    assert (both / "fleet_timeline.png").exists() and (both / "latency.png").exists()
    # nothing for this fleet, no inputs at all, --fleet without --db
    res = CliRunner().invoke(main, ["report", "--db", url, "--fleet", "nope", "--out",
                                    str(out)])
    assert res.exit_code == 78 and "no devices or routed requests" in res.output
    assert CliRunner().invoke(main, ["report", "--out", str(out)]).exit_code == 2
    assert CliRunner().invoke(main, ["report", str(fixtures), "--fleet", "x", "--out",
                                     str(out)]).exit_code == 2
