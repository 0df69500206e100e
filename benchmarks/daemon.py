"""What the daemon adds on top of the backend, and what it costs at idle.

Starts its own mosquitto on a free loopback port and ``agentctl run`` as a subprocess, then:

1. **Added latency**: for N requests, request publish → first chunk received by the client,
   vs the backend's own TTFT reported in the final result (``timings.ttft_ms``, measured
   inside the agent from acceptance). p50 and p99 of both and of the difference (goal for the
   difference: ≤ 5 ms p50). Includes MQTT both ways, parsing, admission, the worker pipe hop.
   The broker runs with ``set_tcp_nodelay true`` and the client disables Nagle too (the agent
   always does): with mosquitto's default (Nagle on) each request waits ~40 ms for a delayed
   ACK before it reaches the agent; ``--broker-nagle`` measures that default.
2. **Outbox replay rate**: 20,000 messages queued on disk while no broker is reachable, then
   drained in order through a real MQTT connection (messages/s from connect to the last
   PUBACK; goal ≥ 5,000). The replay pacing is set high so the queue, not the pacing, is
   measured.
3. **Idle daemon**: RSS (agent + worker) and CPU % of the agent process over a window at
   1 Hz telemetry sampling, read from /proc.

    .venv/bin/python benchmarks/daemon.py [--requests 30] [--replay 20000] [--idle-s 20]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support import Mosquitto, TestClient  # noqa: E402


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


THREADS = "1"


def start_agent(tmp: Path, port: int, device: str, toml: str) -> subprocess.Popen[bytes]:
    cfg = tmp / f"{device}.toml"
    cfg.write_text(toml)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELM_")}
    return subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--config", str(cfg),
         "--broker", f"mqtt://127.0.0.1:{port}", "--fleet", "bench", "--device", device,
         "--state-dir", str(tmp / f"state-{device}"), "--threads", THREADS, "--ctx", "512"],
        stdout=(tmp / f"{device}.log").open("wb"), stderr=subprocess.STDOUT, env=env)


def wait_online(client: TestClient, prefix: str, timeout_s: float = 120) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            msg = client.get(1.0, topic=f"{prefix}/status")
        except (TimeoutError, queue.Empty):
            continue
        if json.loads(msg.payload)["state"] == "online":
            return
    raise SystemExit("agent did not come online")


def added_latency(tmp: Path, broker: Mosquitto, n: int) -> dict[str, Any]:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    proc = start_agent(tmp, broker.port, "lat", "")
    prefix = "edgelm/v1/bench/lat"
    client = TestClient(broker.port)
    client.client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.subscribe(f"{prefix}/status")
    client.subscribe("bench/replies/#")
    try:
        wait_online(client, prefix)
        first_ms: list[float] = []
        ttft_ms: list[float] = []
        for i in range(n + 2):
            props = Properties(PacketTypes.PUBLISH)
            topic = f"bench/replies/{uuid.uuid4().hex}"
            props.ResponseTopic = topic
            body = {"id": f"lat-{i}", "prompt": "Say hello.", "max_tokens": 4}
            t0 = time.perf_counter()
            client.client.publish(f"{prefix}/infer/request", json.dumps(body), qos=1,
                                  properties=props)
            first = None
            while True:
                msg = client.get(60, topic=topic)
                obj = json.loads(msg.payload)
                if obj["schema"] == "edgelm.infer.chunk/1" and first is None:
                    first = (time.perf_counter() - t0) * 1000
                if obj["schema"] == "edgelm.infer.result/1":
                    break
            if i < 2 or first is None or obj["timings"] is None:
                continue  # warm-up
            first_ms.append(first)
            ttft_ms.append(obj["timings"]["ttft_ms"])
    finally:
        client.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    added = [a - b for a, b in zip(first_ms, ttft_ms, strict=True)]
    return {"first_chunk_ms": first_ms, "backend_ttft_ms": ttft_ms, "added_ms": added}


def replay_rate(tmp: Path, broker: Mosquitto, n: int) -> dict[str, Any]:
    from agent.mqtt import BrokerConfig, MqttLink
    from agent.outbox import OutboxConfig, OutboxDrainer, OutboxQueue

    outbox = OutboxQueue(tmp / "replay.sqlite3",
                         OutboxConfig(replay_rate_per_s=1e9, inflight_window=256))
    payload = json.dumps({"schema": "edgelm.infer.result/1", "text": "x" * 300}).encode()
    t0 = time.perf_counter()
    for _ in range(n):
        outbox.put("bench/replay", payload)
    enqueue_s = time.perf_counter() - t0
    link = MqttLink(BrokerConfig("127.0.0.1", broker.port), f"replay-{uuid.uuid4().hex[:6]}",
                    ("bench/replay/will", b"x"), [], on_message=lambda m: None)
    drainer = OutboxDrainer(outbox, link)
    link._on_publish_cb = drainer.wake
    drainer.start()
    t0 = time.perf_counter()
    link.start()
    while outbox.stats().depth:
        time.sleep(0.005)
    drain_s = time.perf_counter() - t0
    drainer.stop()
    link.stop()
    return {"messages": n, "enqueue_per_s": n / enqueue_s, "replay_per_s": n / drain_s}


def proc_stat(pid: int) -> tuple[float, int]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    rss_pages = int(fields[21])
    return ticks / os.sysconf("SC_CLK_TCK"), rss_pages * os.sysconf("SC_PAGE_SIZE")


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def idle_cost(tmp: Path, broker: Mosquitto, seconds: float) -> dict[str, Any]:
    proc = start_agent(tmp, broker.port, "idle", "[telemetry]\ninterval_s = 1.0\n")
    prefix = "edgelm/v1/bench/idle"
    client = TestClient(broker.port)
    client.subscribe(f"{prefix}/status")
    try:
        wait_online(client, prefix)
        time.sleep(3)  # settle after start-up
        cpu0, _ = proc_stat(proc.pid)
        t0 = time.monotonic()
        time.sleep(seconds)
        cpu1, rss_agent = proc_stat(proc.pid)
        wall = time.monotonic() - t0
        rss_workers = sum(proc_stat(c)[1] for c in children(proc.pid))
    finally:
        client.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    return {"agent_cpu_pct": (cpu1 - cpu0) / wall * 100, "agent_rss_bytes": rss_agent,
            "worker_rss_bytes": rss_workers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--replay", type=int, default=20000)
    ap.add_argument("--idle-s", type=float, default=20.0)
    ap.add_argument("--broker-nagle", action="store_true",
                    help="leave mosquitto's set_tcp_nodelay at its default (false)")
    ap.add_argument("--threads", default="1",
                    help="engine threads; 1 leaves a core to the daemon on a 2-core board")
    args = ap.parse_args()
    global THREADS
    THREADS = args.threads
    with tempfile.TemporaryDirectory(prefix="edgelm-bench-") as d:
        tmp = Path(d)
        broker = Mosquitto(tmp / "broker")
        if not args.broker_nagle:
            broker.conf.write_text(broker.conf.read_text() + "set_tcp_nodelay true\n")
        broker.start()
        try:
            lat = added_latency(tmp, broker, args.requests)
            rep = replay_rate(tmp, broker, args.replay)
            idle = idle_cost(tmp, broker, args.idle_s)
        finally:
            broker.stop()
    print(f"{'metric':<44} {'p50':>10} {'p99':>10}")
    for label, key in (("publish → first chunk (client), ms", "first_chunk_ms"),
                       ("backend TTFT (agent-measured), ms", "backend_ttft_ms"),
                       ("added by daemon + MQTT, ms (goal p50 ≤ 5)", "added_ms")):
        vals = lat[key]
        print(f"{label:<44} {statistics.median(vals):>10.2f} {pct(vals, 99):>10.2f}")
    nagle = "default (Nagle on)" if args.broker_nagle else "set_tcp_nodelay true"
    print(f"{'requests measured':<44} {len(lat['added_ms']):>10}   (engine threads {THREADS}, "
          f"broker {nagle})")
    print()
    enq, rate = rep["enqueue_per_s"], rep["replay_per_s"]
    print(f"{'outbox enqueue (SQLite WAL commit per msg)':<44} {enq:>10,.0f} msg/s")
    print(f"{'outbox replay after connect (goal ≥ 5,000)':<44} {rate:>10,.0f} msg/s"
          f"   ({rep['messages']:,} messages)")
    print()
    print(f"{'idle agent CPU at 1 Hz telemetry':<44} {idle['agent_cpu_pct']:>10.2f} %")
    print(f"{'idle agent RSS':<44} {idle['agent_rss_bytes'] / 1e6:>10.1f} MB")
    print(f"{'idle worker RSS (model loaded)':<44} {idle['worker_rss_bytes'] / 1e6:>10.1f} MB")


if __name__ == "__main__":
    main()
