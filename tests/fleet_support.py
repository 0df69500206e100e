"""Fleet test helpers: a stub OpenAI-compatible cloud, scripted MQTT devices, router helpers.

Shared by the router, outbox and report tests. The fake devices answer by the wire contract
(chunks, then a result on the MQTT v5 response topic with the request's correlation data),
so routing and accounting are exercised without loading a model.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.fleet.cloud import CloudConfig
from agent.fleet.router import EdgeRouter, RouterConfig
from agent.mqtt import parse_broker_url
from tests.support import Mosquitto, TestClient, validate


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


def make_router(broker: Mosquitto, fleet: str, cloud: StubCloud | None, **kw: Any) -> EdgeRouter:
    cfg = RouterConfig(fleet=fleet, router_id=kw.pop("router_id", "rt"),
                       policy=kw.pop("policy", "load_aware"),
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
