"""The router against a real mosquitto, scripted fake devices and a stub OpenAI endpoint.

No model is loaded: devices are MQTT clients that answer by the wire contract (chunks, then a
result on the MQTT v5 response topic with the request's correlation data), so the routing rules
(failover on offline/LWT, retry on a retryable error, fallbacks and their reasons, duplicate
ids, exactly-once accounting) are checked quickly and deterministically.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.fleet.cloud import CloudConfig
from agent.fleet.collector import FleetCollector
from agent.fleet.ratelimit import WindowLimits
from agent.fleet.router import EdgeRouter, RouterConfig
from agent.fleet.store import FleetStore
from agent.mqtt import parse_broker_url
from tests.support import Mosquitto, TestClient, validate

pytestmark = [pytest.mark.broker]


class StubCloud:
    """``/v1/models`` and a streamed ``/v1/chat/completions`` that answers "cloud says hi"."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def do_GET(self) -> None:
                data = json.dumps({"data": [{"id": "stub-model"}]}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for word in ("cloud", " says", " hi"):
                    chunk = {"choices": [{"index": 0, "delta": {"content": word},
                                          "finish_reason": None}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                end = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 11, "completion_tokens": 3}}
                self.wfile.write(f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n".encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class FakeDevice:
    """Answers requests on its topic; ``mode``: ``ok``, ``overloaded`` or ``silent``."""

    def __init__(self, port: int, fleet: str, name: str, mode: str = "ok",
                 ctx: int = 512) -> None:
        self.name, self.mode, self.fleet = name, mode, fleet
        self.prefix = f"edgelm/v1/{fleet}/{name}"
        self.seq = 0
        self.got: list[dict[str, Any]] = []
        self.client = TestClient(port)
        self.client.client.on_message = self._on_message
        self.client.subscribe(f"{self.prefix}/infer/request")
        self.status("online", ctx)

    def _env(self, schema: str, **kw: Any) -> bytes:
        self.seq += 1
        return json.dumps({"schema": schema, "device": self.name, "fleet": self.fleet,
                           "ts_unix_ms": int(time.time() * 1000), "seq": self.seq,
                           **kw}).encode()

    def status(self, state: str, ctx: int = 512) -> None:
        self.client.client.publish(f"{self.prefix}/status", self._env(
            "edgelm.status/1", state=state, reason=None if state == "online" else "lwt",
            agent_version="0.1.0", backends={}, probes={},
            models=[{"name": "smollm2-135m", "format": "gguf", "backend": "llamacpp",
                     "loaded": True, "context_tokens": ctx, "threads": 1}]),
            qos=1, retain=True).wait_for_publish(5)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        req = json.loads(msg.payload)
        self.got.append(req)
        topic = msg.properties.ResponseTopic
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = msg.properties.CorrelationData
        if self.mode == "silent":
            return
        if self.mode == "overloaded":
            client.publish(topic, self._env(
                "edgelm.infer.result/1", id=req["id"], status="error", text=None,
                finish_reason="error", usage=None, timings=None, energy=None,
                served_by={"device": self.name, "backend": "llamacpp", "model": "m"},
                error={"code": "overloaded", "message": "queue full", "details": {}}),
                qos=1, properties=props)
            return
        client.publish(topic, self._env("edgelm.infer.chunk/1", id=req["id"], index=0,
                                        delta=f"from {self.name}", tokens=2),
                       qos=1, properties=props)
        client.publish(topic, self._env(
            "edgelm.infer.result/1", id=req["id"], status="ok", text=f"from {self.name}",
            finish_reason="stop", chunks=1, error=None, energy=None,
            usage={"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
            timings={"queue_ms": 1.0, "ttft_ms": 20.0, "prefill_tok_s": 400.0,
                     "decode_tok_s": 50.0, "itl_ms": 20.0, "tpot_ms": 20.0, "e2e_ms": 41.0},
            served_by={"device": self.name, "backend": "llamacpp", "model": "smollm2-135m"}),
            qos=1, properties=props)

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def cloud() -> Iterator[StubCloud]:
    c = StubCloud()
    yield c
    c.close()


def make_router(broker: Mosquitto, fleet: str, cloud: StubCloud | None, **kw: Any) -> EdgeRouter:
    cfg = RouterConfig(fleet=fleet, router_id="rt", policy=kw.pop("policy", "load_aware"),
                       cloud=CloudConfig(cloud.url) if cloud else None, http_port=0, seed=3,
                       **kw)
    r = EdgeRouter(cfg, parse_broker_url(broker.url))
    r.start()
    assert r.wait_connected(10)
    return r


def ask(client: TestClient, fleet: str, body: dict[str, Any]) -> dict[str, Any]:
    reply = f"test/replies/{uuid.uuid4().hex}"
    client.subscribe(reply)
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = reply
    props.CorrelationData = b"c"
    client.publish(f"edgelm/v1/{fleet}/route/request", json.dumps(body).encode(),
                   properties=props)
    while True:
        msg = client.get(15, topic=reply)
        out = json.loads(msg.payload)
        if out["schema"] == "edgelm.infer.result/1":
            validate(out, "infer_result.json")
            assert msg.properties.CorrelationData == b"c"
            return out


def wait_for(pred: Any, what: str, timeout_s: float = 10.0) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(what)


def test_routes_fails_over_and_falls_back(broker: Mosquitto, cloud: StubCloud,
                                          tmp_path: Any) -> None:
    fleet = f"rt-{uuid.uuid4().hex[:6]}"
    store = FleetStore(f"sqlite:///{tmp_path / 'f.db'}")
    col = FleetCollector(store, parse_broker_url(broker.url), fleet)
    col.start()
    assert col.wait_connected(10)
    a = FakeDevice(broker.port, fleet, "a")
    b = FakeDevice(broker.port, fleet, "b", mode="silent")
    r = make_router(broker, fleet, cloud, attempt_timeout_s=1.0,
                    limits=WindowLimits(60.0, max_requests=3))
    client = TestClient(broker.port)
    try:
        wait_for(lambda: r.online_devices() == ["a", "b"], "devices online")
        # b never answers: whatever lands there is retried on a after the attempt timeout
        outs = [ask(client, fleet, {"id": f"q{i}", "prompt": "hi", "max_tokens": 4})
                for i in range(3)]
        assert all(o["status"] == "ok" and o["text"] == "from a" for o in outs)
        # a's budget (3) is spent, b is silent: the next goes to the cloud
        over = ask(client, fleet, {"id": "q-over", "prompt": "hi", "max_tokens": 4})
        assert over["served_by"]["device"] == "cloud" and over["text"] == "cloud says hi"
        # the prompt exceeds every device's context (512): straight to the cloud
        big = ask(client, fleet, {"id": "q-big", "prompt": "x" * 4000, "max_tokens": 4})
        assert big["served_by"]["device"] == "cloud"
        # an unknown model: the cloud
        unk = ask(client, fleet, {"id": "q-unk", "prompt": "hi", "model": "llama-70b"})
        assert unk["served_by"]["device"] == "cloud"
        # a duplicate client id is not routed (nor accounted) twice
        client.publish(f"edgelm/v1/{fleet}/route/request",
                       json.dumps({"id": "q0", "prompt": "hi"}).encode())
        wait_for(lambda: r.counts["duplicates"] == 1, "duplicate seen")
        recs = {x["request_id"]: x for x in r.records}
        assert len(recs) == len(r.records) == 6
        assert recs["q-over"]["fallback_reason"] == "no_capacity"
        assert recs["q-big"]["fallback_reason"] == "context_overflow"
        assert recs["q-unk"]["fallback_reason"] == "no_model"
        assert recs["q-over"]["cost_usd"] == pytest.approx((11 * 0.15 + 3 * 0.60) / 1e6)
        retried = [x for x in r.records if x["tried"][:1] == ["b"]]
        for x in retried:
            assert x["attempt_errors"][0]["code"] == "timeout"
            assert x["edge_device"] == "a" or x["served_by"] == "cloud"
        assert retried  # b (silent) was tried at least once
        for x in r.records:
            validate(x, "route_record.json")
        wait_for(lambda: store.query("SELECT COUNT(*) FROM requests")[0][0] == 6,
                 "records stored")
    finally:
        r.stop()
        col.stop()
        store.close()
        for d in (a, b):
            d.close()
        client.close()


def test_offline_device_is_dropped_and_its_request_rerouted(broker: Mosquitto) -> None:
    fleet = f"rt-{uuid.uuid4().hex[:6]}"
    a = FakeDevice(broker.port, fleet, "a", mode="silent")
    r = make_router(broker, fleet, None, attempt_timeout_s=300.0)
    client = TestClient(broker.port)
    try:
        wait_for(lambda: r.online_devices() == ["a"], "a online")
        reply = f"test/replies/{uuid.uuid4().hex}"
        client.subscribe(reply)
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply
        client.publish(f"edgelm/v1/{fleet}/route/request",
                       json.dumps({"id": "w1", "prompt": "hi"}).encode(), properties=props)
        wait_for(lambda: len(a.got) == 1, "request reached a")
        b = FakeDevice(broker.port, fleet, "b")
        wait_for(lambda: "b" in r.online_devices(), "b online")
        a.status("offline")  # what the broker publishes when a's LWT fires
        out = json.loads(client.get(10, topic=reply).payload)
        while out["schema"] != "edgelm.infer.result/1":
            out = json.loads(client.get(10, topic=reply).payload)
        assert out["status"] == "ok" and out["text"] == "from b"
        assert r.online_devices() == ["b"]
        rec = r.records[-1]
        assert rec["tried"] == ["a", "b"] and rec["attempt_errors"][0]["code"] == \
            "device_failed"
        # no cloud configured and no capacity: a clean error, still accounted once
        b.status("offline")
        wait_for(lambda: r.online_devices() == [], "b offline")
        err = ask(client, fleet, {"id": "w2", "prompt": "hi"})
        assert err["status"] == "error" and err["error"]["code"] == "unknown_model"
        assert [x["request_id"] for x in r.records] == ["w1", "w2"]
        b.close()
    finally:
        r.stop()
        a.close()
        client.close()


def test_retryable_error_moves_on_and_http_endpoint(broker: Mosquitto,
                                                    cloud: StubCloud) -> None:
    fleet = f"rt-{uuid.uuid4().hex[:6]}"
    busy = FakeDevice(broker.port, fleet, "busy", mode="overloaded")
    ok = FakeDevice(broker.port, fleet, "ok")
    r = make_router(broker, fleet, cloud, policy="random")
    try:
        wait_for(lambda: r.online_devices() == ["busy", "ok"], "online")
        port = r.http_port
        for i in range(4):
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                data=json.dumps({"messages": [{"role": "user", "content": f"hi {i}"}],
                                 "max_tokens": 4}).encode(),
                headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=10) as resp:
                body = json.loads(resp.read())
            assert body["choices"][0]["message"]["content"] == "from ok"
            assert body["edgelm"]["edge_device"] == "ok"
            assert body["usage"]["completion_tokens"] == 2
        assert all(x["served_by"] == "edge" for x in r.records)
        assert any(x["tried"] == ["busy", "ok"] for x in r.records) or not busy.got
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as resp:
            assert "smollm2-135m" in resp.read().decode()
        bad = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                     data=b'{"messages": "nope"}',
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(bad, timeout=5)
        assert exc.value.code == 400
    finally:
        r.stop()
        busy.close()
        ok.close()


def test_route_command_serves_and_stops_on_sigterm(broker: Mosquitto, tmp_path: Any) -> None:
    import signal
    import subprocess

    from tests.support import agent_cmd, free_port, wait_port

    port = free_port()
    log = tmp_path / "route.log"
    proc = subprocess.Popen(agent_cmd("route", "--broker", broker.url, "--fleet", "cli-f",
                                      "--http-port", str(port), "--policy", "weighted"),
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        wait_port(port, 20)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            assert json.loads(resp.read()) == {"ok": True, "devices": []}
        # no devices and no cloud: refused cleanly with the reason
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                     data=json.dumps({"messages": [
                                         {"role": "user", "content": "hi"}]}).encode())
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(req, timeout=10)
        assert exc.value.code == 400
        assert json.loads(exc.value.read())["edgelm"]["fallback_reason"] == "no_model"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert "routing fleet cli-f (weighted)" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_expired_deadline_is_not_retried(broker: Mosquitto, cloud: StubCloud) -> None:
    fleet = f"rt-{uuid.uuid4().hex[:6]}"
    a = FakeDevice(broker.port, fleet, "a", mode="silent")
    r = make_router(broker, fleet, cloud, attempt_timeout_s=0.5)
    client = TestClient(broker.port)
    try:
        wait_for(lambda: r.online_devices() == ["a"], "a online")
        out = ask(client, fleet, {"id": "d1", "prompt": "hi", "deadline_ms": 300})
        assert out["status"] == "error" and out["error"]["code"] == "deadline_exceeded"
        assert a.got[0]["deadline_ms"] <= 300  # the remaining budget travels with it
        assert [x["served_by"] for x in r.records] == ["none"]
        assert cloud.requests == []
    finally:
        r.stop()
        a.close()
        client.close()
