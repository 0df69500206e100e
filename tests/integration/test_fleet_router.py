"""The router against a real mosquitto, scripted fake devices and a stub OpenAI endpoint.

No model is loaded: devices are MQTT clients that answer by the wire contract (chunks, then a
result on the MQTT v5 response topic with the request's correlation data), so the routing rules
(failover on offline/LWT, retry on a retryable error, fallbacks and their reasons, duplicate
ids, exactly-once accounting) are checked quickly and deterministically.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.fleet.collector import FleetCollector
from agent.fleet.ratelimit import WindowLimits
from agent.fleet.store import FleetStore
from agent.mqtt import parse_broker_url
from tests.fleet_support import FakeDevice, StubCloud, ask, make_router, wait_for
from tests.support import Mosquitto, TestClient, validate

pytestmark = [pytest.mark.broker]


@pytest.fixture
def cloud() -> Iterator[StubCloud]:
    c = StubCloud()
    yield c
    c.close()


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
                                      "--http-port", str(port), "--policy", "weighted",
                                      "--state-dir", str(tmp_path / "state")),
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
        assert (tmp_path / "state" / "outbox.sqlite3").exists()
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


def _post(port: int, body: dict[str, Any]) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_no_guessed_energy_device_token_counts_and_honest_http_errors(
    broker: Mosquitto,
) -> None:
    """A new user's trial: the router reported 5 W x service time as edge energy for devices
    with no power sensor, relayed every chunk with tokens 1, accepted max_tokens 0 over HTTP,
    and answered a failed streaming request with HTTP 200 and no error."""
    fleet = f"rt-{uuid.uuid4().hex[:6]}"
    dev = FakeDevice(broker.port, fleet, "a")  # sends no telemetry: no power reading
    client = TestClient(broker.port)
    routers = []
    try:
        plain = make_router(broker, fleet, None, router_id="plain")
        assumed = make_router(broker, fleet, None, router_id="assumed", assumed_power_w=7.5)
        routers += [plain, assumed]
        for r in routers:
            wait_for(lambda r=r: r.online_devices() == ["a"], "device online")
        # the request goes through one router's ingress at a time (both share the topic:
        # the v5 shared subscription gives it to one), so ask each router directly
        for r in routers:
            before = len(r.records)
            r.submit({"id": f"e-{r.config.router_id}", "prompt": "hi", "max_tokens": 4},
                     sink := _Collect(), source="mqtt")
            wait_for(lambda r=r, n=before: len(r.records) > n, "record")
            rec = r.records[-1]
            assert rec["served_by"] == "edge" and rec["status"] == "ok"
            assert sink.tokens == [2]  # the device's own count, passed through
            if r is plain:
                assert rec["energy_j"] is None and rec["cost_usd"] is None
                assert rec["energy_source"].startswith("not measured: device a reports no "
                                                       "power"), rec["energy_source"]
            else:
                assert rec["energy_j"] == pytest.approx(7.5 * 0.040)  # e2e 41 - queue 1 ms
                assert "assumed 7.5 W" in rec["energy_source"]
                assert rec["cost_usd"] == pytest.approx(7.5 * 0.040 / 3.6e6 * 0.25)
            validate(rec, "route_record.json")
        # over MQTT, streamed: the relayed chunk carries the device's token count
        reply = f"test/replies/{uuid.uuid4().hex}"
        client.subscribe(reply)
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply
        client.publish(f"edgelm/v1/{fleet}/route/request", json.dumps(
            {"id": "s1", "prompt": "hi", "max_tokens": 4, "stream": True}).encode(),
            properties=props)
        chunk = json.loads(client.get(15, topic=reply).payload)
        validate(chunk, "infer_chunk.json")
        assert chunk["tokens"] == 2 and chunk["delta"] == "from a"
        # HTTP: max_tokens 0 is refused as the device would; a request nobody can serve is
        # an HTTP error, streaming or not
        status, raw = _post(plain.http_port or 0, {
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0})
        assert status == 400 and b"max_tokens" in raw, raw
        dev.status("offline")  # its last will
        for r in routers:
            wait_for(lambda r=r: r.online_devices() == [], "device offline")
        for stream in (False, True):
            status, raw = _post(plain.http_port or 0, {
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                "stream": stream})
            body = json.loads(raw)
            # no online device has the model and there is no cloud: refused, not a 200
            assert status == 400, (stream, status, raw)
            assert body["error"]["code"] == "unknown_model", body
            assert body["edgelm"]["status"] == "error"
            assert body["edgelm"]["fallback_reason"] == "no_model"
    finally:
        for r in routers:
            r.stop()
        client.close()
        dev.close()


class _Collect:
    """A sink that keeps what the router forwards."""

    def __init__(self) -> None:
        self.tokens: list[int | None] = []

    def text(self, delta: str, tokens: int | None = None) -> None:
        self.tokens.append(tokens)

    def final(self, result: dict[str, Any], record: dict[str, Any]) -> None:
        pass
