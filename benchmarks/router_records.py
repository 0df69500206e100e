"""What the router's on-disk outbox costs per accounting record, next to a plain QoS 1 publish.

The router used to publish each ``edgelm.route.record/1`` straight from its request path
(QoS 1, paho's in-memory queue: lost on a broker outage or a crash). It now commits the record
to the outbox (SQLite WAL, :mod:`agent.outbox`) under its lock, and the drainer thread
publishes it. This compares, in one process against a real mosquitto, alternating rounds so
machine load hits both alike:

- **request path**: wall and CPU time of ``OutboxQueue.put`` vs ``MqttLink.publish`` per
  record (what one request's accounting holds the router's lock for);
- **delivery**: first record queued → last record acknowledged by the broker (PUBACK and,
  for the outbox, deleted from disk), per record.

    .venv/bin/python benchmarks/router_records.py [--records 1000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.mqtt import MqttLink, parse_broker_url  # noqa: E402
from agent.outbox import OutboxDrainer, OutboxQueue  # noqa: E402
from tests.support import Mosquitto  # noqa: E402

TOPIC = "edgelm/v1/bench/router/r1/record"


def record(seq: int) -> bytes:
    """A route record of realistic size (an edge-served request)."""
    return json.dumps({
        "schema": "edgelm.route.record/1", "device": "r1", "fleet": "bench",
        "ts_unix_ms": int(time.time() * 1000), "seq": seq, "router": "r1",
        "request_id": f"chatcmpl-{seq:020d}", "route_key": f"r1-{seq:012x}", "source": "http",
        "policy": "load_aware", "served_by": "edge", "edge_device": "pi5-07", "status": "ok",
        "error_code": None, "fallback_reason": None, "attempts": 1, "tried": ["pi5-07"],
        "attempt_errors": [], "prompt_tokens": 43, "completion_tokens": 64,
        "prompt_tokens_estimated": 40, "ttft_ms": 296.3, "e2e_ms": 1380.2, "energy_j": 6.2,
        "energy_source": "telemetry power x service time", "cost_usd": 4.3e-7,
        "cloud_model": None, "token_counts": "engine",
        "device_timings": {"queue_ms": 0.4, "ttft_ms": 295.8, "prefill_tok_s": 146.2,
                           "decode_tok_s": 59.9, "itl_ms": 16.7, "tpot_ms": 21.5,
                           "e2e_ms": 1379.0}}, separators=(",", ":")).encode()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    n = args.records
    tmp = Path(tempfile.mkdtemp(prefix="edgelm-bench-rr-"))
    broker = Mosquitto(tmp / "mosq").start()
    drainer: list[OutboxDrainer] = []
    link = MqttLink(parse_broker_url(broker.url), client_id="bench-router",
                    will=("bench/will", b"x"), subscriptions=[], on_message=lambda m: None,
                    on_connect=lambda: drainer and drainer[0].wake(),
                    on_publish=lambda: drainer and drainer[0].wake())
    link.start()
    assert link.wait_connected(10)
    queue = OutboxQueue(tmp / "outbox.sqlite3")
    drainer.append(OutboxDrainer(queue, link))
    drainer[0].start()
    payloads = [record(i) for i in range(n)]
    res: dict[str, list[float]] = {k: [] for k in (
        "publish_wall_us", "publish_cpu_us", "put_wall_us", "put_cpu_us",
        "direct_delivery_us", "outbox_delivery_us")}
    try:
        for _ in range(args.rounds):
            # plain QoS 1 publish (the old path)
            t0, c0 = time.perf_counter(), time.process_time()
            infos = [link.publish(TOPIC, p, qos=1) for p in payloads]
            t1, c1 = time.perf_counter(), time.process_time()
            while not all(i.is_published() for i in infos):
                time.sleep(0.0005)
            t2 = time.perf_counter()
            res["publish_wall_us"].append((t1 - t0) / n * 1e6)
            res["publish_cpu_us"].append((c1 - c0) / n * 1e6)
            res["direct_delivery_us"].append((t2 - t0) / n * 1e6)
            # the outbox (the new path): put on the request path, the drainer publishes
            t0, c0 = time.perf_counter(), time.process_time()
            for p in payloads:
                queue.put(TOPIC, p, kind="record")
            t1, c1 = time.perf_counter(), time.process_time()
            while queue.stats().depth:
                time.sleep(0.0005)
            t2 = time.perf_counter()
            res["put_wall_us"].append((t1 - t0) / n * 1e6)
            res["put_cpu_us"].append((c1 - c0) / n * 1e6)
            res["outbox_delivery_us"].append((t2 - t0) / n * 1e6)
    finally:
        drainer[0].stop()
        link.stop()
        queue.close()
        broker.stop()
    med = {k: statistics.median(v) for k, v in res.items()}
    print(f"load average {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs); {n} records x "
          f"{args.rounds} alternating rounds; medians per record")
    print(f"{'':28}{'publish (old)':>15}{'outbox (new)':>15}{'ratio':>8}")
    for label, a, b in (("request path, wall us", "publish_wall_us", "put_wall_us"),
                        ("request path, CPU us", "publish_cpu_us", "put_cpu_us"),
                        ("queued -> acked, wall us", "direct_delivery_us",
                         "outbox_delivery_us")):
        print(f"{label:28}{med[a]:>15.1f}{med[b]:>15.1f}{med[b] / med[a]:>8.2f}")
    summary: dict[str, Any] = {k: round(v, 2) for k, v in med.items()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
