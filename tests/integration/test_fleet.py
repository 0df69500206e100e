"""The fleet end to end: a real mosquitto, three real agents (1/1/2 threads), collectors on
SQLite and on the test's own PostgreSQL, the router, and llama-cpp-python's OpenAI-compatible
server on the same GGUF standing in for the cloud.

Scenario: a burst over MQTT and HTTP is spread over the devices by the load-aware policy until
their sliding-window budgets are spent; the overflow and an over-long prompt go to the "cloud";
then one agent is killed (SIGKILL: its LWT fires) while streaming, and its request is re-routed.
Every request must end in exactly one accounting record, in the router and in both databases.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.fleet.cloud import CloudConfig
from agent.fleet.ratelimit import WindowLimits
from agent.fleet.router import EdgeRouter, RouterConfig
from agent.fleet.store import FleetStore
from agent.mqtt import parse_broker_url
from tests.pg_support import Postgres
from tests.support import Mosquitto, TestClient, agent_cmd, free_port, validate, wait_port

pytestmark = [pytest.mark.broker, pytest.mark.model, pytest.mark.timeout(600)]

WINDOW_S = 600.0  # no budget frees up during a phase, however slow the machine is
PER_DEVICE = 2  # requests per device per window
BURST = 7  # MQTT requests in the burst (plus one over-long prompt and two HTTP requests)


def wait_for(pred: Any, timeout_s: float, what: str, interval: float = 0.1) -> Any:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


class Proc:
    def __init__(self, cmd: list[str], log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]


@pytest.fixture
def cloud(tmp_path: Path, model_path: Path) -> Iterator[str]:
    pytest.importorskip("uvicorn")
    pytest.importorskip("sse_starlette")
    port = free_port()
    p = Proc([sys.executable, "-m", "llama_cpp.server", "--model", str(model_path),
              "--host", "127.0.0.1", "--port", str(port), "--n_threads", "1",
              "--n_ctx", "2048",
              # by default a new request interrupts the running one: a cloud serves them all
              "--interrupt_requests", "False"], tmp_path / "cloud.log")
    try:
        wait_port(port, 60)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        p.stop()


@pytest.fixture
def postgres() -> Iterator[Postgres]:
    pg = Postgres().start()
    yield pg
    pg.stop()


def mqtt_request(client: TestClient, topic: str, body: dict[str, Any]) -> str:
    reply = f"test/replies/{uuid.uuid4().hex}"
    client.subscribe(reply)
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = reply
    props.CorrelationData = body["id"].encode()
    client.publish(topic, json.dumps(body).encode(), properties=props)
    return reply


class Inbox:
    """Messages by topic (TestClient.get drops messages of other topics)."""

    def __init__(self, client: TestClient) -> None:
        self.client = client
        self.by_topic: dict[str, list[Any]] = {}

    def get(self, topic: str, timeout_s: float) -> Any:
        end = time.monotonic() + timeout_s
        while not self.by_topic.get(topic):
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"nothing on {topic}")
            try:
                msg = self.client.messages.get(timeout=min(remaining, 0.5))
            except Exception:
                continue
            self.by_topic.setdefault(msg.topic, []).append(msg)
        return self.by_topic[topic].pop(0)


def http_chat(port: int, body: dict[str, Any]) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return resp.status, resp.read()


def check_fleet_report(store: FleetStore, fleet: str, records: list[dict[str, Any]],
                       victim: str, devices: list[str], out: Path) -> None:
    """``agentctl report --db``'s data and files agree with what the router accounted."""
    pytest.importorskip("matplotlib")
    from agent.report import Missing
    from agent.report_fleet import FLEET_FIGURES, render_fleet_report

    written, summary = render_fleet_report(store, out, ("png", "html"), fleet=fleet)
    assert [row.device for row in summary.rows] == devices
    assert summary.requests == len(records)
    assert summary.edge == sum(1 for x in records if x["served_by"] == "edge")
    assert summary.cloud == sum(1 for x in records if x["served_by"] == "cloud")
    reasons: dict[str, int] = {}
    for x in records:
        if x["served_by"] == "cloud":
            reasons[x["fallback_reason"]] = reasons.get(x["fallback_reason"], 0) + 1
    assert summary.cloud_by_reason == reasons
    assert isinstance(summary.cloud_cost_usd, float) and summary.cloud_cost_usd >= 0
    for row in summary.rows:
        assert row.served == sum(1 for x in records if x["served_by"] == "edge"
                                 and x["edge_device"] == row.device)
        assert isinstance(row.ttft_p50_ms, float) and isinstance(row.decode_p50_tok_s, float)
        assert isinstance(row.edge_energy_j, Missing) and row.edge_energy_j.why  # no sensor
        for value in (row.power_mean_w, row.temp_max_c, row.mj_per_token):
            assert isinstance(value, float) or (isinstance(value, Missing) and value.why)
    gone = summary.row(victim)
    assert gone.state.startswith("offline")
    assert isinstance(gone.online_share, float) and gone.online_share < 1.0
    assert len(written) == len(FLEET_FIGURES) + 1


def test_fleet_burst_overflow_failover_and_accounting(
    broker: Mosquitto, tmp_path: Path, cloud: str, postgres: Postgres
) -> None:
    import concurrent.futures

    fleet = f"fl-{uuid.uuid4().hex[:6]}"
    base = f"edgelm/v1/{fleet}"
    sqlite_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    procs: list[Proc] = []
    agents: dict[str, Proc] = {}
    router: EdgeRouter | None = None
    try:
        # collectors first (different groups: each stores everything), then the agents
        for name, url in (("sqlite", sqlite_url), ("pg", postgres.url)):
            procs.append(Proc(agent_cmd("collect", "--broker", broker.url, "--fleet", fleet,
                                        "--db", url, "--group", f"g-{name}",
                                        "--telemetry-every", "2"),
                              tmp_path / f"collect-{name}.log"))
        for dev, threads in (("dev-a", "1"), ("dev-b", "1"), ("dev-c", "2")):
            agents[dev] = Proc(agent_cmd("run", "--broker", broker.url, "--fleet", fleet,
                                         "--device", dev, "--state-dir", str(tmp_path / dev),
                                         "--threads", threads, "--ctx", "512"),
                               tmp_path / f"{dev}.log")
        def new_router(router_id: str) -> EdgeRouter:
            # generous timeouts: the 2-core test machine may be shared and slow
            rt = EdgeRouter(RouterConfig(
                fleet=fleet, router_id=router_id, policy="load_aware",
                limits=WindowLimits(WINDOW_S, max_requests=PER_DEVICE), max_wait_s=600.0,
                attempt_timeout_s=300.0, cloud=CloudConfig(cloud), http_port=0, seed=1,
            ), parse_broker_url(broker.url))
            rt.start()
            assert rt.wait_connected(30)
            assert rt.http_port
            return rt

        router = r = new_router("r1")

        def online() -> bool:
            for dev, a in agents.items():
                assert a.proc.poll() is None, f"{dev} exited: {a.tail()}"
            return r.online_devices() == sorted(agents)

        wait_for(online, 90, "three agents online")
        client = TestClient(broker.port)
        inbox = Inbox(client)
        ingress = f"{base}/route/request"

        # ---- phase 1: a burst, spread by policy; overflow and an over-long prompt to the cloud
        replies: dict[str, str] = {}
        for i in range(BURST):
            rid = f"burst-{i}"
            replies[rid] = mqtt_request(client, ingress, {
                "id": rid, "messages": [{"role": "user", "content": f"Say the number {i}."}],
                "max_tokens": 4})
        long_id = "too-long"
        replies[long_id] = mqtt_request(client, ingress, {
            "id": long_id, "prompt": "word " * 560, "max_tokens": 2})
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            h_stream = pool.submit(http_chat, r.http_port, {
                "model": "edgelm", "stream": True, "max_tokens": 4,
                "messages": [{"role": "user", "content": "Name a colour."}]})
            h_plain = pool.submit(http_chat, r.http_port, {
                "max_tokens": 4, "messages": [{"role": "user", "content": "Name a fruit."}]})
            finals: dict[str, dict[str, Any]] = {}
            for rid, topic in replies.items():
                chunks = []
                while True:
                    msg = inbox.get(topic, 120)
                    body = json.loads(msg.payload)
                    assert msg.properties.CorrelationData == rid.encode()
                    if body["schema"] == "edgelm.infer.chunk/1":
                        validate(body, "infer_chunk.json")
                        chunks.append(body["delta"])
                        continue
                    validate(body, "infer_result.json")
                    finals[rid] = body
                    assert body["status"] == "ok", body
                    assert "".join(chunks) == body["text"]
                    break
            status, raw = h_stream.result(timeout=120)
            assert status == 200
            events = [ln[6:] for ln in raw.decode().splitlines() if ln.startswith("data: ")]
            assert events[-1] == "[DONE]"
            last = json.loads(events[-2])
            assert last["edgelm"]["served_by"] in ("edge", "cloud")
            streamed = "".join(json.loads(e)["choices"][0]["delta"].get("content", "")
                               for e in events[:-1])
            assert streamed.strip(), raw
            status, raw = h_plain.result(timeout=120)
            plain = json.loads(raw)
            assert status == 200 and plain["choices"][0]["message"]["content"].strip(), plain
            assert plain["object"] == "chat.completion"

        recs = {rec["request_id"]: rec for rec in r.records}
        burst = [recs[f"burst-{i}"] for i in range(BURST)]
        edge = [x for x in r.records if x["served_by"] == "edge"]
        assert len(edge) == 3 * PER_DEVICE, [(x["request_id"], x["served_by"]) for x in r.records]
        assert {x["edge_device"] for x in edge} == set(agents)  # spread over every device
        for dev in agents:  # and never beyond a device's window budget
            assert sum(1 for x in edge if x["edge_device"] == dev) == PER_DEVICE
        overflow = [x for x in r.records if x["served_by"] == "cloud"
                    and x["fallback_reason"] == "no_capacity"]
        assert len(overflow) == BURST + 2 - 3 * PER_DEVICE
        assert recs[long_id]["served_by"] == "cloud"
        assert recs[long_id]["fallback_reason"] == "context_overflow"
        assert finals[long_id]["served_by"]["device"] == "cloud"
        for x in burst:
            assert x["completion_tokens"] and x["completion_tokens"] <= 4
            if x["served_by"] == "edge":
                # this VM has no power sensor: energy and edge cost are null with the reason
                # (the router once filled in 5 W x service time)
                assert x["energy_j"] is None and x["cost_usd"] is None
                assert x["energy_source"].startswith("not measured: device ")
            else:
                assert x["cost_usd"] is not None and x["cost_usd"] >= 0

        # ---- phase 2: a second router (fresh budgets; r1 leaves the ingress group), a device
        # is killed while it streams, and its request is re-routed
        phase1 = list(r.records)
        r.stop()
        router = r = new_router("r2")
        wait_for(online, 60, "r2 to see the agents")
        long_ids = [f"long-{i}" for i in range(3)]
        long_replies = {rid: mqtt_request(client, ingress, {
            "id": rid, "prompt": "Count slowly: one, two, three,", "max_tokens": 48,
            "ignore_eos": True}) for rid in long_ids}

        def streaming_victim() -> tuple[str, str] | None:
            with r._lock:
                for p in r.pending.values():
                    if p.device is not None and not p.cloud and len(p.sent_text) > 0:
                        return p.device.name, p.client_id
            return None

        def frozen_mid_stream() -> tuple[str, str] | None:
            """Freeze a streaming device, then confirm its request is still unfinished.

            The request may complete between seeing its first text and the kill (a slow test
            thread on a loaded host); SIGSTOP first, let in-flight messages land, and only then
            decide, so the killed device is known to die mid-request.
            """
            found = streaming_victim()
            if found is None:
                return None
            name, req = found
            agents[name].proc.send_signal(signal.SIGSTOP)
            time.sleep(0.5)
            with r._lock:
                still = any(p.client_id == req and p.device is not None
                            and p.device.name == name for p in r.pending.values())
            if still:
                return found
            agents[name].proc.send_signal(signal.SIGCONT)
            return None

        victim, victim_req = wait_for(frozen_mid_stream, 60, "a device frozen mid-stream", 0.02)
        agents[victim].proc.kill()
        agents[victim].proc.wait()
        wait_for(lambda: victim not in r.online_devices(), 15, "the LWT to remove the device")
        for topic in long_replies.values():
            while True:
                body = json.loads(inbox.get(topic, 180).payload)
                if body["schema"] == "edgelm.infer.result/1":
                    validate(body, "infer_result.json")
                    assert body["status"] == "ok", body
                    break
        recs = {rec["request_id"]: rec for rec in r.records}
        moved = recs[victim_req]
        assert moved["tried"][0] == victim
        assert moved["attempt_errors"][0]["code"] == "device_failed"
        assert moved["served_by"] == "edge" and moved["edge_device"] != victim  # budget left
        assert moved["attempts"] >= 1

        # ---- accounting: exactly once everywhere
        records = phase1 + r.records
        all_ids = {*replies, *long_ids}
        assert len(records) == len(all_ids) + 2  # + the two HTTP requests
        assert len({x["request_id"] for x in records}) == len(records)
        assert all_ids <= {x["request_id"] for x in records}
        for rec in records:
            validate(rec, "route_record.json")
            assert rec["status"] == "ok"
        expected = sorted(x["request_id"] for x in records)
        for url in (sqlite_url, postgres.url):
            store = FleetStore(url)
            try:
                def stored(s: FleetStore = store) -> bool:
                    rows = s.query("SELECT request_id FROM requests")
                    return len(rows) >= len(expected)

                wait_for(stored, 30, f"records in {store.kind}")
                rows = store.query("SELECT request_id, served_by, device FROM requests")
                assert sorted(x[0] for x in rows) == expected, store.kind
                devices = dict(store.query("SELECT device, state FROM devices"))
                assert devices[victim] == "offline"
                assert all(devices[d] == "online" for d in agents if d != victim)
                assert store.query("SELECT COUNT(*) FROM telemetry")[0][0] > 0
                assert store.query("SELECT COUNT(*) FROM results")[0][0] >= len(edge)
                check_fleet_report(store, fleet, records, victim, sorted(agents),
                                   tmp_path / f"report-{store.kind}")
            finally:
                store.close()
        client.close()
    finally:
        if router is not None:
            router.stop()
        for a in agents.values():
            a.stop()
        for p in procs:
            p.stop()
