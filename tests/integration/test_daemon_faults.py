"""Faults against a real mosquitto the tests start: outages, freezes, kill -9, storms, ACLs.

Durations are shortened through the agent's config (reconnect cap, keepalive) except the one
30 s broker outage, which is real. Receivers deduplicate by (device, seq), as the contract says.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import queue
import signal
import sqlite3
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.support import REPO, Mosquitto, TestClient, agent_cmd, free_port, validate

pytestmark = [pytest.mark.broker]

FLEET = "faults"


class Broker(Mosquitto):
    """mosquitto with persistence (sessions survive a restart) and optional extra config."""

    def __init__(self, workdir: Path, port: int | None = None, conf: str | None = None,
                 extra: str = "") -> None:
        super().__init__(workdir, port)
        text = self.conf.read_text().replace(
            "persistence false\n", f"persistence true\npersistence_location {workdir}/\n")
        if conf is not None:
            text = text.replace("allow_anonymous true\n", "") + conf
        self.conf.write_text(text + extra)

    def freeze(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)


class SessionClient:
    """An MQTT v5 client with a persistent session: a broker restart loses none of its QoS 1
    messages, whatever the order in which it and the agent reconnect."""

    def __init__(self, port: int, subscriptions: list[str], username: str | None = None,
                 password: str | None = None) -> None:
        self.messages: queue.Queue[Any] = queue.Queue()
        self.client = paho.Client(CallbackAPIVersion.VERSION2,
                                  client_id=f"sess-{uuid.uuid4().hex[:8]}",
                                  protocol=MQTTProtocolVersion.MQTTv5)
        self.client.reconnect_delay_set(0.2, 1)
        if username:
            self.client.username_pw_set(username, password)
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect("127.0.0.1", port, clean_start=False, properties=props)
        self.client.loop_start()
        end = time.monotonic() + 5
        while not self.client.is_connected() and time.monotonic() < end:
            time.sleep(0.01)
        for topic in subscriptions:
            self.client.subscribe(topic, 1)
        time.sleep(0.2)

    def publish(self, topic: str, body: dict[str, Any] | bytes, reply: str | None = None) -> None:
        props = None
        if reply:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = reply
            props.CorrelationData = b"c"
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.client.publish(topic, payload, qos=1, properties=props).wait_for_publish(5)

    def collect(self, done: Callable[[list[dict[str, Any]]], bool], timeout_s: float,
                topic_prefix: str = "") -> list[dict[str, Any]]:
        """Messages (deduplicated by device+seq) until ``done(messages)`` or the timeout."""
        seen: set[tuple[str, int]] = set()
        out: list[dict[str, Any]] = []
        end = time.monotonic() + timeout_s
        while time.monotonic() < end and not done(out):
            try:
                msg = self.messages.get(timeout=0.2)
            except queue.Empty:
                continue
            if not msg.topic.startswith(topic_prefix):
                continue
            body = json.loads(msg.payload)
            key = (body.get("device"), body.get("seq"))
            if key in seen:
                continue
            seen.add(key)
            body["_topic"] = msg.topic
            out.append(body)
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class AgentProc:
    """``agentctl run`` with a TOML config, as systemd would run it."""

    def __init__(self, tmp: Path, broker_url: str, device: str, toml: str = "",
                 state_dir: Path | None = None, log_name: str = "agent.log") -> None:
        self.device = device
        self.prefix = f"edgelm/v1/{FLEET}/{device}"
        self.state_dir = state_dir or tmp / f"state-{device}"
        self.log = tmp / log_name
        cfg = tmp / f"{device}-{uuid.uuid4().hex[:4]}.toml"
        cfg.write_text(toml)
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELM_")}
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            agent_cmd("-v", "run", "--config", str(cfg), "--broker", broker_url,
                      "--fleet", FLEET, "--device", device, "--state-dir", str(self.state_dir),
                      "--threads", "2", "--ctx", "512"),
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT, env=env,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def outbox_depth(self) -> int:
        db = sqlite3.connect(f"file:{self.state_dir / 'outbox.sqlite3'}?mode=ro", uri=True,
                             timeout=5)
        try:
            return int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        finally:
            db.close()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return int(self.proc.returncode)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def wait_online(client: TestClient | SessionClient, agent: AgentProc,
                timeout_s: float = 60) -> dict[str, Any]:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        assert agent.alive(), f"agent exited {agent.proc.returncode}: {agent.tail()}"
        try:
            msg = client.messages.get(timeout=0.3)
        except queue.Empty:
            continue
        if msg.topic == f"{agent.prefix}/status" and json.loads(msg.payload)["state"] == "online":
            return dict(json.loads(msg.payload))
    raise AssertionError(f"agent not online: {agent.tail()}")


@pytest.fixture
def agents() -> Iterator[list[AgentProc]]:
    started: list[AgentProc] = []
    yield started
    for a in started:
        a.kill()


def finals(msgs: list[dict[str, Any]], check: bool = False) -> dict[str, dict[str, Any]]:
    """Final results by id; ``check`` validates them (slow: not inside collect's predicate)."""
    out = {}
    for m in msgs:
        if m.get("schema") == "edgelm.infer.result/1":
            if check:
                validate({k: v for k, v in m.items() if k != "_topic"}, "infer_result.json")
            out[m["id"]] = m
    return out


FAST_RECONNECT = """
[mqtt]
reconnect_min_s = 0.2
reconnect_max_s = 2.0
keepalive_s = 5
connect_timeout_s = 3.0
"""


def test_broker_down_30s_during_stream_and_telemetry_loses_nothing(
    tmp_path: Path, agents: list[AgentProc]
) -> None:
    broker = Broker(tmp_path / "broker").start()
    try:
        dev = f"out-{uuid.uuid4().hex[:4]}"
        prefix = f"edgelm/v1/{FLEET}/{dev}"
        client = SessionClient(broker.port, [f"{prefix}/#", "test/out/#"])
        agent = AgentProc(tmp_path, broker.url, dev,
                          FAST_RECONNECT + "[outbox]\ntelemetry = true\n")
        agents.append(agent)
        wait_online(client, agent)
        client.publish(f"{prefix}/infer/request",
                       {"id": "outage-1", "prompt": "Count from one to one hundred:",
                        "max_tokens": 96, "ignore_eos": True}, reply="test/out/r1")
        first = client.collect(lambda ms: any(m["_topic"] == "test/out/r1" for m in ms), 60)
        assert first, agent.tail()
        broker.stop()  # mid-stream: the generation finishes during the outage
        t_down = time.time()
        time.sleep(30)
        assert agent.alive(), agent.tail()
        assert agent.outbox_depth() >= 25  # the result and ~30 s of telemetry wait on disk
        broker.start()
        t_up = time.time()

        def complete(ms: list[dict[str, Any]]) -> bool:
            tele = [m["ts_unix_ms"] for m in ms if m["schema"] == "edgelm.telemetry/1"]
            return "outage-1" in finals(ms) and any(t > t_up * 1000 for t in tele)

        msgs = client.collect(complete, 60)
        result = finals(msgs, check=True)["outage-1"]
        assert result["status"] == "ok" and result["usage"]["completion_tokens"] == 96
        assert result["energy"] is not None and "reason" in result["energy"]
        tele = sorted(m["ts_unix_ms"] for m in msgs if m["schema"] == "edgelm.telemetry/1")
        during = [t for t in tele if t_down * 1000 <= t <= t_up * 1000]
        assert len(during) >= 27, (len(during), agent.tail())
        gaps = [b - a for a, b in itertools.pairwise(tele)]
        assert max(gaps) < 3000, gaps  # no telemetry lost across the outage
        last = [m for m in msgs if m["schema"] == "edgelm.telemetry/1"][-1]
        validate({k: v for k, v in last.items() if k != "_topic"}, "telemetry.json")
        assert last["outbox"]["dropped"] == {}
        # subscriptions were restored: the next request is served
        client.publish(f"{prefix}/infer/request", {"id": "after-1", "prompt": "Hi",
                                                   "max_tokens": 4}, reply="test/out/r2")
        after = client.collect(lambda ms: "after-1" in finals(ms), 60)
        assert finals(after)["after-1"]["status"] == "ok"
        assert "Count from one" not in agent.log.read_text()  # prompts are not logged
        client.close()
        assert agent.stop() == 0
    finally:
        broker.stop()


def test_broker_frozen_no_thread_hangs_and_service_resumes(
    tmp_path: Path, agents: list[AgentProc]
) -> None:
    broker = Broker(tmp_path / "broker").start()
    prom_port = free_port()
    try:
        dev = f"frz-{uuid.uuid4().hex[:4]}"
        prefix = f"edgelm/v1/{FLEET}/{dev}"
        client = SessionClient(broker.port, [f"{prefix}/#", "test/frz/#"])
        agent = AgentProc(tmp_path, broker.url, dev, FAST_RECONNECT.replace(
            "keepalive_s = 5", "keepalive_s = 2")
            + f"[outbox]\ntelemetry = true\n[prometheus]\nenabled = true\n"
              f'listen = "127.0.0.1:{prom_port}"\n')
        agents.append(agent)
        wait_online(client, agent)

        def metric(name: str) -> float:
            with urllib.request.urlopen(f"http://127.0.0.1:{prom_port}/metrics", timeout=3) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith(name + " "):
                        return float(line.split()[1])
            raise AssertionError(f"{name} not exported")

        broker.freeze()
        try:
            time.sleep(4)
            depth0 = metric("edgelm_outbox_depth")
            fails0 = metric("edgelm_mqtt_connect_failures")
            time.sleep(8)
            # the sampler, telemetry, outbox and MQTT threads all kept going
            assert metric("edgelm_outbox_depth") >= depth0 + 5
            assert metric("edgelm_mqtt_connect_failures") >= fails0 + 1
            assert metric("edgelm_mqtt_connected") == 0
        finally:
            broker.thaw()
        # the agent reconnects (clean start) and re-announces; requests sent before that are
        # the sender's to retry, as with any offline device
        wait_online(client, agent)
        client.publish(f"{prefix}/infer/request", {"id": "thaw-1", "prompt": "Hi",
                                                   "max_tokens": 4}, reply="test/frz/r")
        msgs = client.collect(lambda ms: "thaw-1" in finals(ms), 60)
        assert finals(msgs)["thaw-1"]["status"] == "ok", agent.tail()
        end = time.monotonic() + 30
        while metric("edgelm_outbox_depth") > 0 and time.monotonic() < end:
            time.sleep(0.5)
        assert metric("edgelm_outbox_depth") == 0
        client.close()
        assert agent.stop() == 0
    finally:
        broker.thaw() if broker.proc else None
        broker.stop()


def test_kill9_with_100_results_queued_all_delivered_after_restart(
    broker: Mosquitto, tmp_path: Path, agents: list[AgentProc]
) -> None:
    dev = f"k9-{uuid.uuid4().hex[:4]}"
    prefix = f"edgelm/v1/{FLEET}/{dev}"
    client = SessionClient(broker.port, [f"{prefix}/#"])
    slow = AgentProc(tmp_path, broker.url, dev,
                     "[outbox]\nreplay_rate_per_s = 0.2\ninflight_window = 1\n", log_name="a1.log")
    agents.append(slow)
    wait_online(client, slow)
    for i in range(100):  # 100 error results (bad max_tokens), answered on infer/response/{id}
        client.client.publish(f"{prefix}/infer/request",
                              json.dumps({"id": f"k-{i}", "prompt": "x", "max_tokens": 0}), qos=1)
    # every request answered into the outbox (the drain runs at one message per 5 s)
    end = time.monotonic() + 30
    while slow.outbox_depth() < 97 and time.monotonic() < end:
        time.sleep(0.05)
    assert slow.outbox_depth() >= 97, slow.tail()
    slow.kill()  # kill -9 with the results still queued
    fast = AgentProc(tmp_path, broker.url, dev, "", state_dir=slow.state_dir, log_name="a2.log")
    agents.append(fast)
    msgs = client.collect(lambda ms: len(finals(ms)) >= 100, 60,
                          topic_prefix=f"{prefix}/infer/response/")
    got = finals(msgs, check=True)
    assert set(got) == {f"k-{i}" for i in range(100)}, fast.tail()
    assert all(r["error"]["code"] == "bad_request" for r in got.values())
    client.close()
    assert fast.stop() == 0


def test_no_broker_at_boot_connects_within_one_backoff(
    tmp_path: Path, agents: list[AgentProc]
) -> None:
    port = free_port()
    broker = Broker(tmp_path / "late", port=port)
    agent = AgentProc(tmp_path, f"mqtt://127.0.0.1:{port}", f"boot-{uuid.uuid4().hex[:4]}",
                      FAST_RECONNECT)
    agents.append(agent)
    try:
        time.sleep(10)
        assert agent.alive(), agent.tail()
        broker.start()
        t0 = time.monotonic()
        watcher = TestClient(port)
        watcher.subscribe(f"{agent.prefix}/status")
        wait_online(watcher, agent, timeout_s=15)
        assert time.monotonic() - t0 < 2.0 + 3.0  # one capped backoff + connect
        watcher.close()
        assert agent.stop() == 0
    finally:
        broker.stop()


def _publish_from_threads(publish: Callable[[str, bytes], None], topic: str) -> None:
    errors: list[BaseException] = []

    def run(n: int) -> None:
        try:
            for i in range(5000):
                publish(topic, f"{n}:{i}".encode())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a publishing thread deadlocked"
    assert not errors, errors


def _count(client: TestClient, topic: str, expect: int, timeout_s: float = 90) -> set[bytes]:
    got: set[bytes] = set()
    end = time.monotonic() + timeout_s
    while len(got) < expect and time.monotonic() < end:
        try:
            msg = client.messages.get(timeout=0.5)
        except queue.Empty:
            continue
        if msg.topic == topic:
            got.add(msg.payload)
    return got


def test_four_threads_publishing_5000_qos1_each(tmp_path: Path) -> None:
    from agent.errors import PublishError
    from agent.mqtt import BrokerConfig, MqttLink
    from agent.outbox import OutboxDrainer, OutboxQueue

    # mosquitto drops QoS 1 messages for a subscriber more than 1,000 behind by default: lift
    # that, so the count measures the publisher, not the test subscriber's speed.
    broker = Broker(tmp_path / "thr", extra="max_queued_messages 0\n").start()
    sub = TestClient(broker.port)
    sub.subscribe("test/threads/#")
    link = MqttLink(BrokerConfig("127.0.0.1", broker.port), f"thr-{uuid.uuid4().hex[:6]}",
                    ("test/threads/will", b"gone"), [], on_message=lambda m: None)
    link.start()
    assert link.wait_connected(10)

    def direct(topic: str, payload: bytes) -> None:
        while True:  # paho's queue is bounded: back off and retry, never block forever
            try:
                link.publish(topic, payload, qos=1)
                return
            except PublishError:
                time.sleep(0.001)

    t0 = time.monotonic()
    _publish_from_threads(direct, "test/threads/direct")
    assert len(_count(sub, "test/threads/direct", 20_000)) == 20_000
    print(f"direct 20k: {time.monotonic() - t0:.1f} s")

    # the same through the outbox: producers on 4 threads, one drainer
    outbox = OutboxQueue(tmp_path / "o.sqlite3")
    drainer = OutboxDrainer(outbox, link)
    link._on_publish_cb = drainer.wake
    drainer.start()
    t0 = time.monotonic()
    _publish_from_threads(lambda t, p: outbox.put(t, p) and None, "test/threads/outbox")
    assert len(_count(sub, "test/threads/outbox", 20_000)) == 20_000
    print(f"outbox 20k: {time.monotonic() - t0:.1f} s")
    end = time.monotonic() + 10
    while outbox.stats().depth and time.monotonic() < end:
        time.sleep(0.05)
    assert outbox.stats().depth == 0
    drainer.stop()
    link.stop()
    sub.close()
    broker.stop()


def test_bad_input_and_request_storm_get_structured_errors(
    broker: Mosquitto, tmp_path: Path, agents: list[AgentProc]
) -> None:
    dev = f"bad-{uuid.uuid4().hex[:4]}"
    prefix = f"edgelm/v1/{FLEET}/{dev}"
    client = SessionClient(broker.port, [f"{prefix}/status", "test/bad/#"])
    agent = AgentProc(tmp_path, broker.url, dev,
                      "[admission]\nqueue_size = 2\nrate_limit = 30\nrate_window_s = 600\n")
    agents.append(agent)
    wait_online(client, agent)
    rss0 = agent.rss_kb()
    big = b'{"id": "huge", "prompt": "' + b"a" * (10 * 1024 * 1024) + b'"}'
    cases: list[tuple[str, bytes | dict[str, Any], str]] = [
        ("huge", big, "too_large"),
        ("nomodel", {"id": "nomodel", "prompt": "hi", "model": "gpt-9"}, "unknown_model"),
        ("ctx", {"id": "ctx", "prompt": "word " * 3000, "max_tokens": 8}, "context_overflow"),
        ("neg", {"id": "neg", "prompt": "hi", "max_tokens": -1}, "bad_request"),
        ("huge-tokens", {"id": "huge-tokens", "prompt": "hi", "max_tokens": 10**9},
         "bad_request"),
        ("utf8", b'{"id": "utf8", "prompt": "\xff\xfe"}', "bad_request"),
    ]
    for rid, body, _ in cases:
        client.publish(f"{prefix}/infer/request", body, reply=f"test/bad/{rid}")
    want = {rid for rid, _, _ in cases} - {"utf8"}
    msgs = client.collect(lambda ms: want <= set(finals(ms)) and None in finals(ms), 60)
    got = finals(msgs, check=True)
    for rid, _, code in cases:
        if rid == "utf8":
            continue  # invalid UTF-8: the id cannot be read, but the reply topic can
        assert got[rid]["status"] == "error" and got[rid]["error"]["code"] == code, got.get(rid)
    # a storm far beyond the queue: every request is answered, ok or overloaded
    for i in range(40):
        client.client.publish(f"{prefix}/infer/request",
                              json.dumps({"id": f"s-{i}", "prompt": "Hi", "max_tokens": 8,
                                          "client_id": "stormer"}),
                              qos=1, properties=_reply_props("test/bad/storm"))
    storm = finals(client.collect(
        lambda ms: sum(1 for k in finals(ms) if str(k).startswith("s-")) >= 40, 120), check=True)
    storm = {k: v for k, v in storm.items() if str(k).startswith("s-")}
    assert len(storm) == 40
    codes = [r["error"]["code"] if r["error"] else "ok" for r in storm.values()]
    assert set(codes) <= {"ok", "overloaded"} and "ok" in codes and "overloaded" in codes
    reasons = [r["error"]["details"]["reason"] for r in storm.values() if r["error"]]
    assert reasons.count("rate_limited") == 10  # the per-client window admits 30 of 40
    assert "queue_full" in reasons
    limited = next(r for r in storm.values() if r["error"]
                   and r["error"]["details"]["reason"] == "rate_limited")
    assert limited["error"]["details"]["retry_after_ms"] > 0
    assert agent.alive()
    assert agent.rss_kb() - rss0 < 96 * 1024, (rss0, agent.rss_kb())
    client.close()
    assert agent.stop() == 0


def _reply_props(topic: str) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = topic
    return props


def test_operator_commands_drain_reload_bench(
    broker: Mosquitto, tmp_path: Path, agents: list[AgentProc]
) -> None:
    dev = f"cmd-{uuid.uuid4().hex[:4]}"
    prefix = f"edgelm/v1/{FLEET}/{dev}"
    client = SessionClient(broker.port, [f"{prefix}/#", "test/cmd/#"])
    agent = AgentProc(tmp_path, broker.url, dev)
    agents.append(agent)
    status = wait_online(client, agent)
    pid0 = status["worker"]["pid"]

    seen: list[dict[str, Any]] = []

    def cmd(name: str, body: dict[str, Any], timeout_s: float = 60) -> dict[str, Any]:
        client.publish(f"{prefix}/cmd/{name}", body)
        seen.clear()
        msgs = client.collect(lambda ms: any(m.get("schema") == "edgelm.cmd.result/1"
                                             for m in ms), timeout_s)
        res = next(m for m in msgs if m.get("schema") == "edgelm.cmd.result/1")
        seen.extend(msgs)
        assert res["_topic"] == f"{prefix}/cmd/{name}/result"
        validate({k: v for k, v in res.items() if k != "_topic"}, "cmd_result.json")
        return res

    res = cmd("drain", {"id": "d1"})
    assert res["status"] == "ok" and res["details"]["draining"] is True
    client.publish(f"{prefix}/infer/request", {"id": "while-draining", "prompt": "Hi"},
                   reply="test/cmd/r")
    refused = finals(client.collect(lambda ms: "while-draining" in finals(ms), 30))
    assert refused["while-draining"]["error"]["details"]["reason"] == "draining"
    assert cmd("drain", {"resume": True})["details"]["draining"] is False
    res = cmd("reload", {"id": "r1"})
    assert res["status"] == "ok" and res["details"]["loaded"] is True
    msgs = seen + client.collect(lambda ms: any(m.get("schema") == "edgelm.status/1"
                                                 for m in seen + ms), 10)
    st = [m for m in msgs if m.get("schema") == "edgelm.status/1"]
    assert st and st[-1]["worker"]["pid"] != pid0
    # a worker that dies is a health change: status is re-published once, not per sample
    os.kill(st[-1]["worker"]["pid"], signal.SIGKILL)
    msgs = client.collect(lambda ms: any(m.get("reason") == "health_changed" for m in ms), 15)
    changed = [m for m in msgs if m.get("schema") == "edgelm.status/1"]
    assert len(changed) == 1 and changed[0]["reason"] == "health_changed", changed
    validate({k: v for k, v in changed[0].items() if k != "_topic"}, "status.json")
    assert changed[0]["models"][0]["loaded"] is False
    time.sleep(2)
    assert not [m for m in client.collect(lambda ms: False, 0.5)
                if m.get("schema") == "edgelm.status/1"]
    res = cmd("bench", {"id": "b1", "runs": 1, "warmup": 0, "max_tokens": 4}, 120)
    assert res["status"] == "ok", res
    bench = seen + client.collect(
        lambda ms: any(m["_topic"].endswith("/bench/result") for m in seen + ms), 30)
    record = next(m for m in bench if m["_topic"].endswith("/bench/result"))
    validate({k: v for k, v in record.items() if k != "_topic"}, "bench.json")
    assert record["device"] == dev and record["request_id"] == "b1"
    assert cmd("shutdown", {})["error"]["code"] == "bad_request"
    client.close()
    assert agent.stop() == 0


def test_acl_template_confines_each_device_to_its_subtree(tmp_path: Path) -> None:
    pw = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(pw), "dev-a", "pw-a"], check=True)
    subprocess.run(["mosquitto_passwd", "-b", str(pw), "dev-b", "pw-b"], check=True)
    subprocess.run(["mosquitto_passwd", "-b", str(pw), "collector", "pw-c"], check=True)
    pw.chmod(0o700)
    acl = tmp_path / "acl"
    acl.write_text((REPO / "systemd" / "mosquitto-acl.example").read_text())
    acl.chmod(0o700)
    broker = Broker(tmp_path / "acl-broker", conf=f"allow_anonymous false\npassword_file {pw}\n"
                                                  f"acl_file {acl}\n").start()
    try:
        results: queue.Queue[tuple[str, Any]] = queue.Queue()
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id="dev-a",
                        protocol=MQTTProtocolVersion.MQTTv5)
        c.username_pw_set("dev-a", "pw-a")
        c.on_publish = lambda cl, u, mid, rc, p: results.put(("pub", rc))
        c.on_subscribe = lambda cl, u, mid, rcs, p: results.put(("sub", rcs[0]))
        c.connect("127.0.0.1", broker.port)
        c.loop_start()
        try:
            def pub(topic: str) -> Any:
                c.publish(topic, b"{}", qos=1)
                return results.get(timeout=5)[1]

            def sub(topic: str) -> Any:
                c.subscribe(topic, 1)
                return results.get(timeout=5)[1]

            assert not pub("edgelm/v1/site/dev-a/status").is_failure
            assert not pub("edgelm/v1/site/dev-a/infer/response/x").is_failure
            assert not pub("edgelm/v1/site/replies/client1/abc").is_failure
            denied = pub("edgelm/v1/site/dev-b/status")
            assert denied.is_failure and denied.value == 135  # v5 makes the denial visible
            assert pub("edgelm/v1/site/dev-a/infer/request").is_failure  # can't inject
            assert not sub("edgelm/v1/site/dev-a/infer/request").is_failure
            assert not sub("edgelm/v1/site/dev-a/cmd/+").is_failure
            assert not sub("$share/edgelm-site/edgelm/v1/site/infer/request").is_failure
            # mosquitto grants any subscription and enforces read access on delivery: dev-a
            # subscribed to everything sees its own request, never dev-b's
            got: queue.Queue[str] = queue.Queue()
            c.on_message = lambda cl, u, m: got.put(m.topic)
            sub("edgelm/v1/site/dev-b/infer/request")
            sub("edgelm/v1/#")
            sender = paho.Client(CallbackAPIVersion.VERSION2, client_id="collector",
                                 protocol=MQTTProtocolVersion.MQTTv5)
            sender.username_pw_set("collector", "pw-c")
            sender.connect("127.0.0.1", broker.port)
            sender.loop_start()
            for dev in ("dev-b", "dev-a"):
                info = sender.publish(f"edgelm/v1/site/{dev}/infer/request", b"{}", qos=1)
                info.wait_for_publish(5)
            assert got.get(timeout=5) == "edgelm/v1/site/dev-a/infer/request"
            time.sleep(0.3)
            seen = [got.get() for _ in range(got.qsize())]  # overlapping subscriptions
            assert all("/dev-a/" in t for t in seen), seen
            sender.disconnect()
            sender.loop_stop()
        finally:
            c.disconnect()
            c.loop_stop()
        refused: queue.Queue[Any] = queue.Queue()
        bad = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        bad.username_pw_set("dev-a", "wrong")
        bad.on_connect = lambda cl, u, f, rc, p: refused.put(rc)
        bad.connect("127.0.0.1", broker.port)
        bad.loop_start()
        assert refused.get(timeout=5).is_failure
        bad.loop_stop()
    finally:
        broker.stop()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def test_mutual_tls_with_ca_and_client_certificate(tmp_path: Path) -> None:
    """mqtts:// with a CA and a client certificate; a client without one is refused."""
    from agent.cli_ops import broker_config_of
    from agent.config import load_config
    from agent.mqtt import MqttLink

    d = tmp_path / "pki"
    d.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
             "-keyout", "ca.key", "-out", "ca.crt", cwd=d)
    for name, cn in (("server", "localhost"), ("device", "dev-tls")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
        ext = d / f"{name}.ext"
        ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-extfile", ext.name, "-out", f"{name}.crt",
                 cwd=d)
    port = free_port()
    broker = Broker(tmp_path / "tls", port=port, extra=(
        f"cafile {d / 'ca.crt'}\ncertfile {d / 'server.crt'}\nkeyfile {d / 'server.key'}\n"
        "require_certificate true\n"))
    broker.start()
    try:
        cfg_file = tmp_path / "tls.toml"
        cfg_file.write_text(f'[mqtt]\nbroker = "mqtts://localhost:{port}"\n'
                            f'ca_file = "{d / "ca.crt"}"\ncert_file = "{d / "device.crt"}"\n'
                            f'key_file = "{d / "device.key"}"\n')
        bc = broker_config_of(load_config(cfg_file, {}))
        assert bc.tls and bc.port == port
        link = MqttLink(bc, "dev-tls", ("test/tls/will", b"x"), [], on_message=lambda m: None)
        link.start()
        assert link.wait_connected(10), link.last_error
        info = link.publish("test/tls/hello", b"{}", qos=1)
        info.wait_for_publish(5)
        assert info.is_published()
        link.stop()
        no_cert = MqttLink(dataclasses.replace(bc, cert_file=None, key_file=None), "anon-tls",
                           ("test/tls/will", b"x"), [], on_message=lambda m: None)
        no_cert.start()
        assert not no_cert.wait_connected(3)
        assert no_cert.connect_failures >= 1
        no_cert.stop()
    finally:
        broker.stop()
