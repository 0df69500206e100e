"""The router's accounting records through its on-disk outbox, and speeds preloaded from the DB.

- A broker outage while the router accounts requests: the records wait on disk and arrive
  after the reconnect (a persistent-session subscriber on a mosquitto with persistence, so
  what the broker receives while the test's collector is reconnecting is not lost in between).
- ``kill -9`` of ``agentctl route`` with records queued: the restarted router delivers them to
  the real collector, and ``seq`` keeps increasing across the restart (the collector's
  ``(router, seq)`` key would otherwise drop new records as duplicates).
- ``--db``: ``weighted`` starts from the stored bench records (most recent per device, backend
  and model; the loaded model's record once the device's status names it) or recent results.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.errors import ConfigError
from agent.fleet.collector import FleetCollector
from agent.fleet.policy import Demand
from agent.fleet.router import EdgeRouter, RouterConfig
from agent.fleet.store import FleetStore
from agent.mqtt import parse_broker_url
from tests.fleet_support import FakeDevice, StubCloud, make_router, wait_for
from tests.support import Mosquitto, agent_cmd, free_port, validate, wait_port

pytestmark = [pytest.mark.broker]

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "bench"


@pytest.fixture
def cloud() -> Iterator[StubCloud]:
    c = StubCloud()
    yield c
    c.close()


def chat(port: int, text: str) -> dict[str, Any]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps({"messages": [{"role": "user", "content": text}],
                         "max_tokens": 4}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=20) as resp:
        out: dict[str, Any] = json.loads(resp.read())
    return out


class PersistentMosquitto(Mosquitto):
    """A mosquitto that keeps sessions and queued messages across a restart."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        store = workdir / "persist"
        store.mkdir(exist_ok=True)
        self.conf.write_text(self.conf.read_text().replace(
            "persistence false\n", f"persistence true\npersistence_location {store}/\n"))


class SessionSubscriber:
    """An MQTT v5 client with a persistent session: QoS 1 messages wait for it in the broker."""

    def __init__(self, port: int, topic: str) -> None:
        import queue

        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.messages: queue.Queue[Any] = queue.Queue()
        self.client = paho.Client(CallbackAPIVersion.VERSION2,
                                  client_id=f"verifier-{uuid.uuid4().hex[:8]}",
                                  protocol=MQTTProtocolVersion.MQTTv5)
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, 1)
        self.client.reconnect_delay_set(0.1, 0.5)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect("127.0.0.1", port, clean_start=False, properties=props)
        self.client.loop_start()
        wait_for(self.client.is_connected, "verifier connected", 5)
        time.sleep(0.2)  # SUBACK

    def take(self, n: int, timeout_s: float) -> list[Any]:
        out = []
        end = time.monotonic() + timeout_s
        while len(out) < n:
            out.append(self.messages.get(timeout=max(0.01, end - time.monotonic())))
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_records_survive_a_broker_outage(tmp_path: Path, cloud: StubCloud) -> None:
    broker = PersistentMosquitto(tmp_path / "mosq").start()
    fleet = f"ob-{uuid.uuid4().hex[:6]}"
    verifier = SessionSubscriber(broker.port, f"edgelm/v1/{fleet}/router/+/record")
    r = make_router(broker, fleet, cloud, state_dir=tmp_path / "router")
    store = FleetStore(f"sqlite:///{tmp_path / 'fleet.db'}")
    col = FleetCollector(store, parse_broker_url(broker.url), fleet)
    try:
        assert chat(r.http_port, "before")["edgelm"]["served_by"] == "cloud"  # no devices
        before = verifier.take(1, 10)
        wait_for(lambda: r.outbox.stats().depth == 0, "the first record acknowledged")
        broker.stop()
        wait_for(lambda: not r._link.is_connected(), "the router to see the outage")
        outs = [chat(r.http_port, f"during {i}") for i in range(3)]
        assert [o["edgelm"]["fallback_reason"] for o in outs] == ["no_model"] * 3
        # answered, and their accounting is on disk, not in paho's memory
        assert r.outbox.stats().depth == 3
        assert len(r.records) == 4
        broker.start()
        wait_for(lambda: r.outbox.stats().depth == 0, "the outbox to drain", 30)
        after = verifier.take(3, 20)
        bodies = [json.loads(m.payload) for m in before + after]
        for b in bodies:
            validate(b, "route_record.json")
        assert [b["request_id"] for b in bodies] == [x["request_id"] for x in r.records]
        # in order, once each (the collector's key is (router, seq))
        seqs = [b["seq"] for b in bodies]
        assert seqs == sorted(seqs) and len(set(seqs)) == 4
        for m in before + after + after:  # a redelivery changes nothing
            col.handle(m.topic, json.loads(m.payload))
        assert store.query("SELECT COUNT(*) FROM requests")[0][0] == 4
        assert col.counts["duplicates"] == 3
    finally:
        r.stop()
        verifier.close()
        store.close()
        broker.stop()


def _outbox_rows(state_dir: Path) -> int:
    db = sqlite3.connect(state_dir / "outbox.sqlite3", timeout=10)
    try:
        return int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
    finally:
        db.close()


def test_kill_9_with_records_queued_then_restart(broker: Mosquitto, tmp_path: Path,
                                                 cloud: StubCloud) -> None:
    fleet = f"ok-{uuid.uuid4().hex[:6]}"
    state = tmp_path / "router-state"
    port = free_port()

    def route(broker_url: str, log: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(agent_cmd(
            "route", "--broker", broker_url, "--fleet", fleet, "--router-id", "rk",
            "--state-dir", str(state), "--http-port", str(port), "--cloud-url", cloud.url),
            stdout=(tmp_path / log).open("wb"), stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})

    # first life: the broker is unreachable, so every record stays queued on disk
    dead = f"mqtt://127.0.0.1:{free_port()}"
    proc = route(dead, "route1.log")
    store = FleetStore(f"sqlite:///{tmp_path / 'fleet.db'}")
    col = FleetCollector(store, parse_broker_url(broker.url), fleet)
    try:
        wait_port(port, 30)
        first = [chat(port, f"first {i}")["edgelm"] for i in range(3)]
        assert all(e["served_by"] == "cloud" for e in first)
        assert _outbox_rows(state) == 3
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        col.start()
        assert col.wait_connected(10)
        # second life: the same state directory, the real broker
        proc = route(broker.url, "route2.log")
        wait_for(lambda: store.query("SELECT COUNT(*) FROM requests")[0][0] == 3,
                 "the queued records delivered after the restart", 30)
        wait_port(port, 30)
        for i in range(2):
            chat(port, f"second {i}")
        wait_for(lambda: store.query("SELECT COUNT(*) FROM requests")[0][0] == 5,
                 "the new records", 15)
        rows = store.query("SELECT router, seq, served_by, payload FROM requests ORDER BY seq")
        assert {x[0] for x in rows} == {"rk"}
        ids = [json.loads(x[3])["request_id"] for x in rows]
        assert len(set(ids)) == 5
        # the counter continued on disk: the second life's numbers come after the first's
        first_life = [x[1] for x in rows[:3]]
        second_life = [x[1] for x in rows[3:]]
        assert min(second_life) > max(first_life)
        # a new state directory seeds the counter from the clock (µs): a lost directory
        # cannot make a later life reuse numbers an earlier one stored
        assert first_life[0] > (time.time() - 3600) * 1e6
        assert "3 accounting record(s) from before" in (tmp_path / "route2.log").read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert _outbox_rows(state) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        col.stop()
        store.close()


def test_one_router_per_state_dir(tmp_path: Path) -> None:
    cfg = RouterConfig(fleet="f", state_dir=tmp_path / "s", http_port=None)
    broker = parse_broker_url("mqtt://127.0.0.1:1")
    first = EdgeRouter(cfg, broker)
    try:
        with pytest.raises(ConfigError, match="in use by another router"):
            EdgeRouter(cfg, broker)
    finally:
        first.stop(flush_s=0)
    EdgeRouter(cfg, broker).stop(flush_s=0)  # released on stop


def bench(decode: float, prefill: float, backend: str, model: str, ts_ms: int
          ) -> dict[str, Any]:
    rec: dict[str, Any] = json.loads(
        (FIXTURES / "synthetic-rpi5-llamacpp-smollm2.json").read_text())
    rec["backend"] = backend
    rec["model"]["name"] = model
    rec["summary"]["decode_tok_s"]["mean"] = decode
    rec["summary"]["prefill_tok_s"]["mean"] = prefill
    rec["ts_unix_ms"] = ts_ms
    return rec


def result(device: str, seq: int, decode: float) -> dict[str, Any]:
    return {"schema": "edgelm.infer.result/1", "device": device, "fleet": "pf", "seq": seq,
            "ts_unix_ms": int(time.time() * 1000) - 1000 + seq, "id": f"r{seq}",
            "status": "ok", "text": "x", "finish_reason": "stop", "error": None,
            "usage": {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14},
            "timings": {"ttft_ms": 50.0, "prefill_tok_s": 300.0, "decode_tok_s": decode,
                        "e2e_ms": 250.0},
            "served_by": {"device": device, "backend": "llamacpp", "model": "smollm2-135m"}}


def share_of(router: EdgeRouter, name: str, draws: int = 3000) -> float:
    demand = Demand(16, 16)
    hits = 0
    with router._lock:
        for _ in range(draws):
            dev = router.policy.select(time.monotonic(), demand, frozenset())
            hits += dev is not None and dev.name == name
    return hits / draws


def test_weighted_starts_from_stored_speeds(broker: Mosquitto, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    store = FleetStore(url)
    col = FleetCollector(store, parse_broker_url(broker.url), "pf")
    now = int(time.time() * 1000)
    base = "edgelm/v1/pf"
    # fast: its smollm2 bench says 90 tok/s; a newer bench of another model says 5
    col.handle(f"{base}/fast/bench/result", bench(90.0, 800.0, "llamacpp", "smollm2-135m",
                                                  now - 60_000))
    col.handle(f"{base}/fast/bench/result", bench(5.0, 50.0, "llamacpp", "qwen-7b", now))
    # slow: an old bench at 30, superseded by a newer one at 10
    col.handle(f"{base}/slow/bench/result", bench(30.0, 300.0, "llamacpp", "smollm2-135m",
                                                  now - 120_000))
    col.handle(f"{base}/slow/bench/result", bench(10.0, 100.0, "llamacpp", "smollm2-135m",
                                                  now - 1000))
    # mid: no bench record, only results (median of 20, 40, 45 → 40)
    for seq, tgs in ((1, 20.0), (2, 40.0), (3, 45.0)):
        col.handle(f"{base}/mid/infer/response/x{seq}", result("mid", seq, tgs))
    store.close()

    fleet = f"pf-{uuid.uuid4().hex[:6]}"
    # the collector stored fleet "pf"; the router preloads its own fleet only
    other = make_router(broker, fleet, None, policy="weighted", db=url)
    try:
        assert other.preloaded == {}
    finally:
        other.stop()
    r = make_router(broker, "pf", None, policy="weighted", db=url)
    plain = make_router(broker, "pf", None, policy="weighted", router_id="plain")
    devices: list[FakeDevice] = []
    try:
        # before any device speaks: the newest record per device, backend and model
        assert r.fleet.devices["fast"].decode_tok_s == 5.0
        assert r.fleet.devices["slow"].decode_tok_s == 10.0
        assert r.fleet.devices["slow"].prefill_tok_s == 100.0
        assert r.fleet.devices["mid"].decode_tok_s == 40.0
        assert r.preloaded["mid"]["source"] == "results"
        assert r.preloaded["mid"]["prefill_tok_s"] == 300.0
        assert r.fleet.devices["mid"].extra["measured"] == "db:results"
        assert r.online_devices() == []  # preloaded devices wait for their status
        devices = [FakeDevice(broker.port, "pf", n) for n in ("fast", "slow")]
        wait_for(lambda: r.online_devices() == ["fast", "slow"], "devices online")
        wait_for(lambda: plain.online_devices() == ["fast", "slow"], "devices online (plain)")
        # the status names smollm2-135m on llamacpp: that model's record applies
        assert r.fleet.devices["fast"].decode_tok_s == 90.0
        assert r.preloaded["fast"]["model"] == "smollm2-135m"
        # so the first requests are already weighted 90 : 10; without --db it is 50 : 50
        assert share_of(r, "fast") > 0.85
        assert 0.4 < share_of(plain, "fast") < 0.6
    finally:
        r.stop()
        plain.stop()
        for d in devices:
            d.close()
