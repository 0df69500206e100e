"""``agentctl route``: the edge-first router with cloud fallback (DESIGN.md §6).

Ingress:

- MQTT: ``edgelm/v1/{fleet}/route/request`` (``edgelm.infer.request/1`` payloads, through a
  shared subscription so several routers split the load). Replies go to the MQTT v5 response
  topic with the client's correlation data, or to ``edgelm/v1/{fleet}/route/response/{id}``.
  The router has its own ingress topic because devices consume the fleet-wide
  ``edgelm/v1/{fleet}/infer/request`` themselves (a request there would be served twice).
- HTTP on loopback: ``POST /v1/chat/completions`` (OpenAI-compatible, SSE when
  ``stream: true``) and ``GET /v1/models``.

Routing: the shared :class:`~agent.fleet.policy.FleetState` (per-device sliding-window budget,
backlog, live telemetry) and one policy pick a device; the request goes to the device's
``infer/request`` topic with the router's reply topic and correlation data. The router falls
back to the cloud (the ``openai`` backend, :mod:`agent.fleet.cloud`) when the prompt exceeds
every device's context, no device serves the model, or no device can take the request within
its budget and ``max_wait_s``. A device whose LWT (or offline status) arrives leaves the
selection at once; its in-flight requests are retried on another device (up to
``max_attempts``) and then fall back. A device that answers ``overloaded``,
``deadline_exceeded``, ``backend_failed``, ``unknown_model`` or ``context_overflow``, or
stays silent for ``attempt_timeout_s``, is treated the same way.

Accounting: every request ends in exactly one ``edgelm.route.record/1`` (where it was served,
tokens, latency, energy, cost, attempts), published on ``edgelm/v1/{fleet}/router/{id}/record``
for the collector. Records go through the same on-disk outbox as a device's results
(:mod:`agent.outbox`, in the router's state directory): a broker outage or a ``kill -9`` of the
router loses none; they are delivered in order, at least once, after the reconnect or the
restart. The collector deduplicates by ``(router, seq)``, so ``seq`` comes from a
:class:`~agent.sequence.SequenceCounter` in the same directory and never repeats across
restarts (a new directory starts the counter at the clock, in microseconds, so even a lost
directory does not reuse numbers). One process at a time may use a state directory (a lock
file enforces it): two routers sharing one counter would hand out the same numbers and the
collector would drop one of each pair as a duplicate.

Speeds: with ``db`` set, the router starts from each device's decode and prefill tok/s as
the collector stored them (the most recent bench record per device, backend and model, else
the median of its recent results), so ``weighted`` (and the backlog estimates of
``load_aware``) are informed from the first request after a restart instead of from a
uniform prior; live bench records and results then refine them.

Edge energy is the device's reported energy if the result carries one, else its latest
telemetry power × service time (labelled), else an assumed power (labelled). Prompt tokens
are estimated (≈ 4 characters per token) for context and budget checks only; accounting uses
the counts the engine or cloud reports.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import fcntl
import json
import logging
import math
import queue
import random
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

from agent.errors import ConfigError, RequestError
from agent.fleet.cloud import CloudClient, CloudConfig
from agent.fleet.collector import RECORD_SCHEMA, measured_speeds, telemetry_summary
from agent.fleet.policy import (
    NO_CAPACITY,
    NO_CONTEXT,
    NO_MODEL,
    Demand,
    DeviceState,
    FleetState,
    make_policy,
)
from agent.fleet.ratelimit import RateLimiter, WindowLimits
from agent.mqtt import BrokerConfig, MqttLink, reply_properties
from agent.outbox import OutboxConfig, OutboxDrainer, OutboxQueue
from agent.protocol import (
    CHUNK_SCHEMA,
    RESULT_SCHEMA,
    TOPIC_ROOT,
    parse_request,
    peek_request_id,
)
from agent.sequence import SequenceCounter
from backends.base import BackendError

logger = logging.getLogger(__name__)

RETRYABLE = frozenset({"overloaded", "deadline_exceeded", "backend_failed", "unknown_model",
                       "context_overflow"})
_TYPICAL = Demand(64, 64)  # the request assumed for work queued by others
DEVICE_FAILED = "device_failed"  # fallback reason: devices died or refused until attempts ran out


def estimate_prompt_tokens(request: dict[str, Any]) -> int:
    """Rough prompt length (≈ 4 characters per token, + 8 per chat message for the template)."""
    messages = request.get("messages")
    if messages:
        return sum(math.ceil(len(str(m.get("content", ""))) / 4) + 8 for m in messages)
    return math.ceil(len(str(request.get("prompt", ""))) / 4) + 1


@dataclass(frozen=True)
class RouterConfig:
    """Router settings.

    Attributes:
        fleet: Fleet id.
        router_id: This router's id (topic segment).
        policy: ``random``, ``weighted`` or ``load_aware``.
        limits: Default per-device sliding-window budget.
        max_wait_s: Longest expected queueing on a device before falling back.
        attempt_timeout_s: Silence from a device after which it is considered failed.
        max_attempts: Devices tried per request before the cloud.
        attempts_per_pick: Devices an oblivious policy asks per selection.
        max_outstanding: Requests in flight per device (the agent's queue plus one).
        cloud: The fallback endpoint; None means refusing instead of falling back.
        price_per_kwh: Electricity price, USD/kWh (DESIGN.md §5 default 0.25).
        assumed_power_w: Board power, W, to estimate edge energy with (power x service
            time, labelled "assumed") for devices whose telemetry has no power reading.
            None (default): their energy and edge cost are null with the reason, never a
            guess.
        prior_decode_tok_s / prior_prefill_tok_s: Speed assumed before anything is measured.
        http_host / http_port: The OpenAI-compatible endpoint (port None: disabled).
        seed: Seed of the policy's random draws.
        state_dir: Where the record outbox and the sequence counter live (one router per
            directory). None: a temporary directory removed at :meth:`EdgeRouter.stop`, and
            ``seq`` from the wall clock (microseconds) so it still never repeats for this
            router id; records survive a broker outage but not a crash.
        db: The collector's database (``sqlite:///…`` or ``postgresql://…``) to preload
            measured device speeds from; None: start from the priors.
        outbox: Bounds of the record outbox.
    """

    fleet: str
    router_id: str = "router"
    policy: str = "load_aware"
    limits: WindowLimits = field(default_factory=WindowLimits)
    max_wait_s: float = 10.0
    attempt_timeout_s: float = 60.0
    max_attempts: int = 3
    attempts_per_pick: int = 2
    max_outstanding: int = 4
    cloud: CloudConfig | None = None
    price_per_kwh: float = 0.25
    assumed_power_w: float | None = None
    prior_decode_tok_s: float = 20.0
    prior_prefill_tok_s: float = 200.0
    http_host: str = "127.0.0.1"
    http_port: int | None = 0
    seed: int | None = None
    state_dir: Path | None = None
    db: str | None = None
    outbox: OutboxConfig = field(default_factory=OutboxConfig)

    @property
    def base(self) -> str:
        """``edgelm/v1/{fleet}``."""
        return f"{TOPIC_ROOT}/{self.fleet}"


class Sink:
    """Where a request's output goes (MQTT client or HTTP handler)."""

    def text(self, delta: str, tokens: int | None = None) -> None:
        """A new piece of generated text, and the engine tokens that made it when known."""

    def final(self, result: dict[str, Any], record: dict[str, Any]) -> None:
        """The request is finished (``result`` is an ``edgelm.infer.result/1`` body)."""


class QueueSink(Sink):
    """Delivers events into a queue (the HTTP handler's thread reads it)."""

    def __init__(self) -> None:
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()

    def text(self, delta: str, tokens: int | None = None) -> None:
        """Queue a text delta."""
        self.events.put(("text", delta))

    def final(self, result: dict[str, Any], record: dict[str, Any]) -> None:
        """Queue the final result."""
        self.events.put(("final", (result, record)))


@dataclass
class _Pending:
    key: str
    client_id: str
    source: str
    request: dict[str, Any]
    demand: Demand
    sink: Sink
    accepted_mono: float
    deadline_mono: float | None
    attempt: int = 0
    device: DeviceState | None = None
    attempt_started: float = 0.0
    last_heard: float = 0.0
    tried: list[str] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    sent_text: str = ""
    attempt_text: str = ""
    first_text_mono: float | None = None
    cloud: bool = False
    done: bool = False
    fallback_reason: str | None = None
    token_counts: str | None = None
    expected_done: float = 0.0


class EdgeRouter:
    """The router: fleet state from MQTT, ingress from MQTT and HTTP, cloud fallback."""

    def __init__(self, config: RouterConfig, broker: BrokerConfig) -> None:
        self.config = config
        self._lock = threading.RLock()
        self.limiter = RateLimiter(config.limits)
        self.fleet = FleetState(self.limiter, max_wait_s=config.max_wait_s)
        self.policy = make_policy(config.policy, self.fleet,
                                  random.Random(config.seed), config.attempts_per_pick)
        self.cloud = CloudClient(config.cloud) if config.cloud else None
        self._cloud_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=8, thread_name_prefix="edgelm-cloud")
        self.pending: dict[str, _Pending] = {}
        self.records: list[dict[str, Any]] = []
        self._recent_clients: collections.OrderedDict[str, bool] = collections.OrderedDict()
        self.counts: collections.Counter[str] = collections.Counter()
        self._seq_last = 0
        self._stop = threading.Event()
        self.preloaded: dict[str, dict[str, Any]] = {}
        if config.db:
            self.preload_speeds(config.db)
        self._tmp_state: Path | None = None
        if config.state_dir is None:
            self._tmp_state = Path(tempfile.mkdtemp(prefix="edgelm-route-"))
        self.state_dir = config.state_dir or self._tmp_state
        assert self.state_dir is not None
        self._state_lock = _lock_state_dir(self.state_dir)
        self._seq: SequenceCounter | None = (_seeded_counter(self.state_dir / "seq")
                                             if config.state_dir is not None else None)
        self.outbox = OutboxQueue(self.state_dir / "outbox.sqlite3", config.outbox)
        self.backlog_at_start = self.outbox.stats().depth  # records a previous life left
        base = config.base
        self.reply_topic = f"{base}/router/{config.router_id}/reply"
        self.record_topic = f"{base}/router/{config.router_id}/record"
        self.status_topic = f"{base}/router/{config.router_id}/status"
        self.ingress_topic = f"{base}/route/request"
        share = f"$share/edgelm-route-{config.fleet}/" if broker.protocol == 5 else ""
        self._link = MqttLink(
            broker, client_id=f"edgelm-route-{config.fleet}-{config.router_id}",
            will=(self.status_topic, json.dumps({"state": "offline", "reason": "lwt"}).encode()),
            subscriptions=[
                (f"{base}/+/status", 1), (f"{base}/+/telemetry", 0),
                (f"{base}/+/bench/result", 1), (self.reply_topic, 1),
                (f"{share}{self.ingress_topic}", 1),
            ],
            on_message=self._on_message, on_connect=self._on_connect,
            on_publish=self._on_publish,
        )
        self._drainer = OutboxDrainer(self.outbox, self._link)
        self._http: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ helpers

    def _next_seq(self) -> int:
        if self._seq is not None:
            return self._seq.next()
        # No state directory: microseconds since the epoch, strictly increasing, unique
        # across restarts without state on disk (what the collector's (router, seq) key needs
        # as long as the clock does not step back).
        with self._lock:
            self._seq_last = max(self._seq_last + 1, time.time_ns() // 1000)
            return self._seq_last

    def _envelope(self, schema: str, **fields: Any) -> dict[str, Any]:
        return {"schema": schema, "device": self.config.router_id, "fleet": self.config.fleet,
                "ts_unix_ms": int(time.time() * 1000), "seq": self._next_seq(), **fields}

    def _on_connect(self) -> None:
        self._link.publish(self.status_topic, json.dumps({
            "state": "online", "policy": self.config.policy,
            "http_port": self.http_port}).encode(), qos=1, retain=True)
        self._drainer.wake()

    def _on_publish(self) -> None:
        self._drainer.wake()

    @property
    def http_port(self) -> int | None:
        """The bound HTTP port (None when disabled or not started)."""
        return self._http.server_address[1] if self._http is not None else None

    # ------------------------------------------------------------------ fleet state

    def _device(self, name: str) -> DeviceState:
        dev = self.fleet.devices.get(name)
        if dev is None:
            measured = [d.decode_tok_s for d in self.fleet.devices.values()
                        if d.extra.get("measured")]
            dev = DeviceState(
                name=name,
                decode_tok_s=(sum(measured) / len(measured) if measured
                              else self.config.prior_decode_tok_s),
                prefill_tok_s=self.config.prior_prefill_tok_s, context_tokens=2048,
                online=False, max_outstanding=self.config.max_outstanding,
                power_w=self.config.assumed_power_w or 0.0)
            dev.extra["power_source"] = ("assumed" if self.config.assumed_power_w is not None
                                         else None)
            self.fleet.add(dev, time.monotonic())
        return dev

    def preload_speeds(self, url: str) -> dict[str, dict[str, Any]]:
        """Start each stored device at its measured speeds (see the module docstring).

        Devices enter the fleet state offline; their status brings them online. Returns (and
        keeps in :attr:`preloaded`) what was applied per device.

        Raises:
            ConfigError: The database cannot be opened.
        """
        from agent.fleet.store import FleetStore

        store = FleetStore(url, create=False)
        try:
            speeds = measured_speeds(store, self.config.fleet)
        finally:
            store.close()
        now = time.monotonic()
        with self._lock:
            for name, entries in speeds.items():
                dev = self._device(name)
                best = entries[0]
                dev.decode_tok_s = float(best["decode_tok_s"])
                if best.get("prefill_tok_s"):
                    dev.prefill_tok_s = float(best["prefill_tok_s"])
                dev.extra["measured"] = f"db:{best['source']}"
                dev.extra["stored_speeds"] = entries
                self.preloaded[name] = best
                self.fleet.changed(dev, now)
        if speeds:
            logger.info("preloaded measured speeds of %d device(s) from %s", len(speeds),
                        store.kind)
        return self.preloaded

    def _apply_stored_speed(self, dev: DeviceState, models: list[dict[str, Any]]) -> None:
        """Prefer the stored bench record of the backend and model the device has loaded."""
        entries = dev.extra.get("stored_speeds")
        if not isinstance(entries, list) or not str(dev.extra.get("measured", "")).startswith(
                "db:"):
            return  # nothing stored, or live measurements already took over
        loaded = {(m.get("backend"), m.get("name")) for m in models if m.get("loaded", True)}
        for e in entries:
            if e["source"] == "bench" and (e.get("backend"), e.get("model")) in loaded:
                dev.decode_tok_s = float(e["decode_tok_s"])
                if e.get("prefill_tok_s"):
                    dev.prefill_tok_s = float(e["prefill_tok_s"])
                self.preloaded[dev.name] = e
                return

    def _on_status(self, device: str, body: dict[str, Any]) -> None:
        now = time.monotonic()
        dev = self._device(device)
        if body.get("state") == "online":
            models = body.get("models") or []
            names: set[str] = set()
            ctx = 0
            for m in models:
                if m.get("loaded", True):
                    names.update(str(x) for x in (m.get("name"), m.get("sha256")) if x)
                    ctx = max(ctx, int(m.get("context_tokens") or 0))
            dev.models = frozenset(names) if names else frozenset({"<none>"})
            dev.context_tokens = ctx or 2048
            dev.extra["threads"] = models[0].get("threads") if models else None
            self._apply_stored_speed(dev, models)
            self.fleet.set_online(device, True, now)
            self.fleet.changed(dev, now)
            logger.info("device %s online (%s, ctx %d)", device, ",".join(sorted(names)),
                        dev.context_tokens)
        else:
            was_online = dev.online
            self.fleet.set_online(device, False, now)
            if was_online:
                logger.warning("device %s offline (%s): rerouting its requests", device,
                               body.get("reason"))
            for p in [p for p in self.pending.values() if p.device is dev and not p.cloud]:
                self._attempt_failed(p, now, DEVICE_FAILED,
                                     f"device {device} went offline ({body.get('reason')})")

    def _on_telemetry(self, device: str, body: dict[str, Any]) -> None:
        dev = self.fleet.devices.get(device)
        if dev is None:
            return
        s = telemetry_summary(body)
        if s["power_mw"] is not None:
            dev.power_w = float(s["power_mw"]) / 1000.0
            dev.extra["power_source"] = "telemetry"
        util = s["cpu_util_pct"]
        dev.utilisation = min(1.0, max(0.0, float(util) / 100.0)) if util is not None else 0.0
        dev.throttled = _throttled(body.get("probes") or {})
        dev.extra["queue_depth"] = s["queue_depth"]
        now = time.monotonic()
        # Work the device has beyond what this router sent it (other routers, direct clients)
        # lengthens its backlog: live queue depth feeds load_aware through free_at.
        queued = int(s["queue_depth"] or 0) + int(s["inflight"] or 0)
        external = queued - dev.outstanding
        if external > 0:
            dev.free_at = max(dev.free_at, now + external * dev.service_s(_TYPICAL))
        self.fleet.changed(dev, now)

    def _on_bench(self, device: str, body: dict[str, Any]) -> None:
        summary = body.get("summary") or {}
        dev = self._device(device)
        for key, attr in (("decode_tok_s", "decode_tok_s"), ("prefill_tok_s", "prefill_tok_s")):
            s = summary.get(key)
            if isinstance(s, dict) and s.get("mean"):
                setattr(dev, attr, float(s["mean"]))
                dev.extra["measured"] = "bench"
        self.fleet.changed(dev, time.monotonic())

    def _learn(self, dev: DeviceState, timings: dict[str, Any]) -> None:
        """Blend measured speeds into the device (EWMA, α = 0.3; the first one replaces)."""
        for key in ("decode_tok_s", "prefill_tok_s"):
            v = timings.get(key)
            if isinstance(v, (int, float)) and v > 0:
                old = getattr(dev, key)
                first = not dev.extra.get("measured") and key == "decode_tok_s"
                setattr(dev, key, float(v) if first else 0.7 * old + 0.3 * float(v))
        if isinstance(timings.get("decode_tok_s"), (int, float)):
            dev.extra["measured"] = dev.extra.get("measured") or "results"

    # ------------------------------------------------------------------ MQTT

    def _on_message(self, msg: Any) -> None:
        topic = str(msg.topic)
        with self._lock:
            if topic == self.reply_topic:
                self._on_reply(msg)
                return
            if topic.endswith("/route/request"):
                self._on_mqtt_request(msg)
                return
            try:
                body = json.loads(msg.payload.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                return
            if not isinstance(body, dict):
                return
            device = topic.split("/")[3]
            if topic.endswith("/status") and body.get("schema") == "edgelm.status/1":
                self._on_status(device, body)
            elif topic.endswith("/telemetry"):
                self._on_telemetry(device, body)
            elif topic.endswith("/bench/result"):
                self._on_bench(device, body)

    def _on_mqtt_request(self, msg: Any) -> None:
        props = getattr(msg, "properties", None)
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        payload: bytes = msg.payload
        try:
            req = parse_request(payload, 1 << 20)
        except RequestError as exc:
            rid = exc.request_id or peek_request_id(payload)
            topic = response_topic or (f"{self.config.base}/route/response/{rid}" if rid
                                       else None)
            if topic is not None:
                body = self._envelope(
                    RESULT_SCHEMA, id=rid, status="error", text=None, finish_reason="error",
                    usage=None, timings=None, energy=None, served_by=self._router_served_by(),
                    error={"code": exc.code, "message": exc.message, "details": exc.details})
                self._link.publish(topic, _dumps(body), properties=reply_properties(correlation))
            return
        reply = response_topic or f"{self.config.base}/route/response/{req.id}"
        raw = json.loads(payload)
        raw.pop("schema", None)
        self.submit(raw, MqttSink(self, reply, correlation, req.id, bool(raw.get("stream", True))),
                    source="mqtt")

    def _router_served_by(self) -> dict[str, Any]:
        return {"device": self.config.router_id, "fleet": self.config.fleet,
                "backend": "router", "model": "none"}

    # ------------------------------------------------------------------ requests

    def submit(self, request: dict[str, Any], sink: Sink, source: str) -> str:
        """Route one request (wire-format fields); output goes to ``sink``. Returns its key.

        A client id seen before (a client retry) is not routed again: its request is already
        being (or has been) accounted.
        """
        with self._lock:
            client_id = str(request.get("id") or uuid.uuid4().hex)
            if client_id in self._recent_clients:
                self.counts["duplicates"] += 1
                return ""
            self._recent_clients[client_id] = True
            while len(self._recent_clients) > 50_000:
                self._recent_clients.popitem(last=False)
            now = time.monotonic()
            key = f"{self.config.router_id}-{uuid.uuid4().hex[:12]}"
            deadline = request.get("deadline_ms")
            p = _Pending(
                key=key, client_id=client_id, source=source, request=request,
                demand=Demand(estimate_prompt_tokens(request),
                              int(request.get("max_tokens", 256)), request.get("model")),
                sink=sink, accepted_mono=now,
                deadline_mono=now + deadline / 1000.0 if deadline else None)
            self.pending[key] = p
            self.counts["received"] += 1
            self._dispatch(p, now)
            return key

    def _dispatch(self, p: _Pending, now: float) -> None:
        if p.deadline_mono is not None and now >= p.deadline_mono:
            self._finish(p, None, served_by="none", device=None, status="error",
                         error_code="deadline_exceeded",
                         error_message="the deadline passed before a device could serve it")
            return
        if p.attempt >= self.config.max_attempts:
            self._to_cloud(p, DEVICE_FAILED)
            return
        decision = self.fleet.route(self.policy, now, p.demand, exclude=p.tried)
        dev = decision.device
        if dev is None:
            self._to_cloud(p, decision.reason or NO_CAPACITY)
            return
        p.attempt += 1
        p.device = dev
        p.tried.append(dev.name)
        p.attempt_started = p.last_heard = now
        p.expected_done = dev.free_at  # commit() queued it behind the device's known backlog
        p.attempt_text = ""
        body = {k: v for k, v in p.request.items() if k != "client_id"}
        body["id"] = p.key
        body["stream"] = True
        if p.deadline_mono is not None:
            body["deadline_ms"] = max(1, int((p.deadline_mono - now) * 1000))
        props = reply_properties(f"{p.key}\x1f{p.attempt}".encode())
        if props is not None:
            props.ResponseTopic = self.reply_topic
        self.counts[f"dispatched:{dev.name}"] += 1
        self._link.publish(f"{self.config.base}/{dev.name}/infer/request", _dumps(body), qos=1,
                           properties=props)

    def _attempt_failed(self, p: _Pending, now: float, code: str, message: str) -> None:
        dev = p.device
        if dev is not None:
            p.errors.append({"device": dev.name, "code": code, "message": message})
            self.fleet.finish(dev, now)
            p.device = None
        self._dispatch(p, now)

    def _on_reply(self, msg: Any) -> None:
        props = getattr(msg, "properties", None)
        corr = getattr(props, "CorrelationData", None) if props is not None else None
        if not corr:
            return
        key, _, attempt_s = bytes(corr).decode("utf-8", "replace").partition("\x1f")
        p = self.pending.get(key)
        if p is None or p.done or p.cloud or str(p.attempt) != attempt_s or p.device is None:
            self.counts["late_replies"] += 1
            return  # an attempt we already gave up on
        try:
            body = json.loads(msg.payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return
        now = time.monotonic()
        p.last_heard = now
        if body.get("schema") == CHUNK_SCHEMA:
            tokens = body.get("tokens")
            self._emit(p, str(body.get("delta") or ""), now,
                       tokens if isinstance(tokens, int) and not isinstance(tokens, bool)
                       else None)
            return
        if body.get("schema") != RESULT_SCHEMA:
            return
        dev = p.device
        if body.get("status") != "ok":
            err = body.get("error") or {}
            code = str(err.get("code") or "backend_failed")
            if code in RETRYABLE:
                self.limiter.budget(dev.name).refund(now, p.demand.tokens)
                self._attempt_failed(p, now, code, str(err.get("message")))
                return
            self.fleet.finish(dev, now)
            self._finish(p, body, served_by="none", device=dev.name, status="error",
                         error_code=code)
            return
        self.fleet.finish(dev, now)
        timings = body.get("timings") or {}
        self._learn(dev, timings)
        text = str(body.get("text") or "")
        if len(text) > len(p.attempt_text):  # non-streamed tail (or stream=false upstream)
            self._emit(p, text[len(p.attempt_text):], now)
        usage = body.get("usage") or {}
        service_s = max(0.0, float(timings.get("e2e_ms") or 0.0)
                        - float(timings.get("queue_ms") or 0.0)) / 1000.0
        energy = body.get("energy") or {}
        energy_j: float | None = None
        for k, scale in (("energy_j", 1.0), ("gross_mj", 1e-3), ("energy_mj", 1e-3)):
            if isinstance(energy.get(k), (int, float)):
                energy_j = float(energy[k]) * scale
                # keep the device's own label: a power model's figure stays "estimated"
                estimated = energy.get("estimated") is True or energy.get("method") == "estimate"
                source = f"device {energy.get('source') or '?'}" + (
                    " (estimated)" if estimated else "")
                break
        else:
            power_source = dev.extra.get("power_source")
            if power_source == "telemetry":
                energy_j, source = dev.power_w * service_s, "telemetry power x service time"
            elif power_source == "assumed":
                energy_j = dev.power_w * service_s
                source = f"assumed {dev.power_w:g} W (--assumed-power-w) x service time"
            else:
                energy_j = None
                source = (f"not measured: device {dev.name} reports no power (no sensor in "
                          "its telemetry); route --assumed-power-w W estimates it")
        self._finish(p, body, served_by="edge", device=dev.name, status="ok",
                     prompt_tokens=usage.get("prompt_tokens"),
                     completion_tokens=usage.get("completion_tokens"),
                     energy_j=energy_j, energy_source=source,
                     cost_usd=(energy_j / 3.6e6 * self.config.price_per_kwh
                               if energy_j is not None else None),
                     device_timings=timings)

    def _emit(self, p: _Pending, delta: str, now: float, tokens: int | None = None) -> None:
        """Forward new text; on a retried attempt skip what the client already has.

        ``tokens`` (the device chunk's count) goes along only when the whole delta is new:
        for a delta cut by the skip the count of the part forwarded is unknown, and unknown
        is left out rather than guessed.
        """
        if not delta:
            return
        whole = len(p.attempt_text) >= len(p.sent_text)
        p.attempt_text += delta
        if len(p.attempt_text) <= len(p.sent_text):
            return
        new = p.attempt_text[len(p.sent_text):]
        p.sent_text = p.attempt_text
        if p.first_text_mono is None:
            p.first_text_mono = now
        p.sink.text(new, tokens if whole else None)

    def _to_cloud(self, p: _Pending, reason: str) -> None:
        p.device = None
        if self.cloud is None:
            code = {NO_MODEL: "unknown_model", NO_CONTEXT: "context_overflow"}.get(
                reason, "overloaded")
            self._finish(p, None, served_by="none", device=None, status="error",
                         error_code=code, fallback_reason=reason)
            return
        p.cloud = True
        p.attempt_text = ""
        p.fallback_reason = reason
        self.counts["cloud"] += 1
        self._cloud_pool.submit(self._run_cloud, p, reason)

    def _run_cloud(self, p: _Pending, reason: str) -> None:
        assert self.cloud is not None
        try:
            result = self.cloud.generate(
                p.request, lambda text: self._locked_emit(p, text))
        except BackendError as exc:
            with self._lock:
                self._finish(p, None, served_by="cloud", device=None, status="error",
                             error_code=exc.code, fallback_reason=reason,
                             error_message=exc.message)
            return
        except Exception as exc:  # the pool thread must always finish the request
            logger.exception("cloud fallback failed")
            with self._lock:
                self._finish(p, None, served_by="cloud", device=None, status="error",
                             error_code="backend_failed", fallback_reason=reason,
                             error_message=str(exc))
            return
        # Servers that send no usage (llama-cpp-python) leave the prompt count to our estimate.
        prompt_tokens = (result.prompt_tokens if result.prompt_tokens is not None
                         else p.demand.prompt_tokens)
        p.token_counts = ("server usage" if result.prompt_tokens is not None
                          else "prompt estimated (server sent no usage)")
        with self._lock:
            self._finish(p, None, served_by="cloud", device=None, status="ok",
                         prompt_tokens=prompt_tokens,
                         completion_tokens=result.completion_tokens,
                         cost_usd=self.cloud.config.cost_usd(prompt_tokens,
                                                             result.completion_tokens),
                         fallback_reason=reason,
                         cloud_model=result.model, finish_reason=result.finish_reason,
                         text=result.text)

    def _locked_emit(self, p: _Pending, text: str) -> None:
        with self._lock:
            self._emit(p, text, time.monotonic())

    def _finish(self, p: _Pending, device_result: dict[str, Any] | None, *, served_by: str,
                device: str | None, status: str, error_code: str | None = None,
                prompt_tokens: int | None = None, completion_tokens: int | None = None,
                energy_j: float | None = None, energy_source: str | None = None,
                cost_usd: float | None = None, fallback_reason: str | None = None,
                cloud_model: str | None = None, finish_reason: str | None = None,
                text: str | None = None, error_message: str | None = None,
                device_timings: dict[str, Any] | None = None) -> None:
        if p.done:
            return
        p.done = True
        self.pending.pop(p.key, None)
        now = time.monotonic()
        e2e_ms = (now - p.accepted_mono) * 1000.0
        ttft_ms = ((p.first_text_mono - p.accepted_mono) * 1000.0
                   if p.first_text_mono is not None else None)
        fallback_reason = fallback_reason or p.fallback_reason
        record = self._envelope(
            RECORD_SCHEMA, router=self.config.router_id, request_id=p.client_id,
            route_key=p.key, source=p.source, policy=self.config.policy, served_by=served_by,
            edge_device=device, status=status, error_code=error_code,
            fallback_reason=fallback_reason if served_by != "edge" else None,
            attempts=p.attempt, tried=list(p.tried), attempt_errors=p.errors,
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
            prompt_tokens_estimated=p.demand.prompt_tokens, ttft_ms=ttft_ms, e2e_ms=e2e_ms,
            energy_j=energy_j, energy_source=energy_source, cost_usd=cost_usd,
            cloud_model=cloud_model, device_timings=device_timings,
            token_counts=p.token_counts or ("engine" if served_by == "edge" else None))
        if device_result is not None and status == "ok":
            result = dict(device_result)
            result.update({k: record[k] for k in ("fleet", "ts_unix_ms", "seq")})
            result["device"] = self.config.router_id
            result["id"] = p.client_id
            result["text"] = p.sent_text
            result.pop("chunks", None)
        else:
            result = self._envelope(
                RESULT_SCHEMA, id=p.client_id, status=status,
                text=(text if text is not None else p.sent_text) if status == "ok" else None,
                finish_reason=(finish_reason or "stop") if status == "ok" else "error",
                usage=({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                        "total_tokens": (prompt_tokens or 0) + (completion_tokens or 0)}
                       if status == "ok" else None),
                timings={"queue_ms": None, "ttft_ms": ttft_ms, "prefill_tok_s": None,
                         "decode_tok_s": None, "itl_ms": None, "tpot_ms": None,
                         "e2e_ms": e2e_ms} if status == "ok" else None,
                energy=None,
                served_by=({"device": "cloud", "fleet": self.config.fleet, "backend": "openai",
                            "model": cloud_model or "cloud"} if served_by == "cloud"
                           else {"device": device or self.config.router_id,
                                 "fleet": self.config.fleet, "backend": "router",
                                 "model": str(p.request.get("model") or "none")}),
                error=None if status == "ok" else {
                    "code": error_code or "backend_failed",
                    "message": error_message or (device_result or {}).get("error", {}).get(
                        "message") or f"not served ({fallback_reason or error_code})",
                    "details": {"tried": list(p.tried), "fallback_reason": fallback_reason}},
            )
        self.records.append(record)
        self.counts[f"served:{served_by}"] += 1
        # Committed to disk before the client hears the result: once a client has its answer,
        # the accounting of it survives a broker outage and a crash of this process.
        if self.outbox.put(self.record_topic, _dumps(record), kind="record") is None:
            self.counts["records_dropped"] += 1
            logger.error("accounting record of %s not queued (outbox full or closed)",
                         p.client_id)
        try:
            p.sink.final(result, record)
        except Exception:
            logger.exception("could not deliver the result of %s", p.client_id)

    def _watchdog(self) -> None:
        """Give up on silent devices and expired deadlines (every 0.2 s)."""
        while not self._stop.wait(0.2):
            with self._lock:
                now = time.monotonic()
                for p in list(self.pending.values()):
                    if p.done or p.cloud or p.device is None:
                        continue
                    # Silence counts from the last message or from when the request was
                    # expected to finish behind the device's backlog, whichever is later: a
                    # request waiting in a long queue sends nothing and is not lost.
                    if now - max(p.last_heard, p.expected_done) > self.config.attempt_timeout_s:
                        self._attempt_failed(p, now, "timeout",
                                             f"no reply from {p.device.name} for "
                                             f"{self.config.attempt_timeout_s:g} s")

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Connect, start the outbox drainer, the HTTP endpoint (if enabled), the watchdog."""
        self._drainer.start()
        self._link.start()
        if self.config.http_port is not None:
            self._http = ThreadingHTTPServer((self.config.http_host, self.config.http_port),
                                             _make_handler(self))
            self._http.daemon_threads = True
            t = threading.Thread(target=self._http.serve_forever, name="edgelm-route-http",
                                 daemon=True)
            t.start()
            self._threads.append(t)
        w = threading.Thread(target=self._watchdog, name="edgelm-route-watchdog", daemon=True)
        w.start()
        self._threads.append(w)

    def wait_connected(self, timeout_s: float) -> bool:
        """Block until the MQTT link is up."""
        return self._link.wait_connected(timeout_s)

    def online_devices(self) -> list[str]:
        """Names of devices currently selectable."""
        with self._lock:
            return sorted(d.name for d in self.fleet.online())

    def stop(self, flush_s: float = 2.0) -> None:
        """Stop serving; pending requests are finished by their threads or dropped.

        Queued accounting records get up to ``flush_s`` to reach the broker; what remains
        stays in the outbox for the next start (lost only without a state directory).
        """
        self._stop.set()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        self._cloud_pool.shutdown(wait=True, cancel_futures=False)
        end = time.monotonic() + flush_s
        while (self._link.is_connected() and self.outbox.stats().depth
               and time.monotonic() < end):
            time.sleep(0.02)
        self._drainer.stop(timeout_s=0.5)
        try:
            info = self._link.publish(self.status_topic, json.dumps(
                {"state": "offline", "reason": "shutdown"}).encode(), qos=1, retain=True)
            self._link.stop(timeout_s=1.5, pending=[info])
        except Exception:
            self._link.stop(timeout_s=1.0)
        if self.cloud is not None:
            self.cloud.close()
        left = self.outbox.stats().depth
        self.outbox.close()
        if self._tmp_state is not None:
            if left:
                logger.warning("%d accounting record(s) undelivered and discarded (no "
                               "state directory)", left)
            shutil.rmtree(self._tmp_state, ignore_errors=True)
        with contextlib.suppress(OSError):
            self._state_lock.close()


class MqttSink(Sink):
    """Relays a routed request's output to an MQTT client."""

    def __init__(self, router: EdgeRouter, topic: str, correlation: bytes | None, rid: str,
                 stream: bool) -> None:
        self.router = router
        self.topic = topic
        self.props = reply_properties(correlation)
        self.rid = rid
        self.stream = stream
        self.index = 0

    def text(self, delta: str, tokens: int | None = None) -> None:
        """Publish one chunk (when the client asked for streaming).

        ``tokens`` is the device's own count; cloud text and re-routed remainders carry
        none (the field is optional in the chunk schema), never an invented 1.
        """
        if not self.stream:
            return
        extra = {"tokens": tokens} if tokens is not None else {}
        body = self.router._envelope(CHUNK_SCHEMA, id=self.rid, index=self.index, delta=delta,
                                     **extra)
        self.index += 1
        self.router._link.publish(self.topic, _dumps(body), qos=1, properties=self.props)

    def final(self, result: dict[str, Any], record: dict[str, Any]) -> None:
        """Publish the final result."""
        if result.get("status") == "ok":
            result["chunks"] = self.index
        self.router._link.publish(self.topic, _dumps(result), qos=1, properties=self.props)


def _seeded_counter(path: Path) -> SequenceCounter:
    """The router's record counter, unique across restarts and lost state directories.

    See :mod:`agent.sequence`: a counter without a usable file starts from the clock.
    """
    return SequenceCounter(path)


def _lock_state_dir(state_dir: Path) -> IO[str]:
    """Hold an exclusive lock on ``state_dir`` for this process's lifetime.

    Raises:
        ConfigError: Another router holds it (sharing the sequence counter would make the
            collector drop records as duplicates).
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    fh = (state_dir / "lock").open("a")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        fh.close()
        raise ConfigError(f"state directory {state_dir} is in use by another router; give "
                          "each router its own --state-dir") from exc
    return fh


def _throttled(probes: dict[str, Any]) -> bool:
    """True if any probe reports active throttling (keys containing ``throttl``)."""
    for reading in probes.values():
        if isinstance(reading, dict):
            for k, v in reading.items():
                if "throttl" in k and "occurred" not in k and v is True:
                    return True
    return False


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8")


# ---------------------------------------------------------------------- HTTP (OpenAI-compatible)


def _make_handler(router: EdgeRouter) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "edgelm-route"

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("http: %s", format % args)

        def _json(self, code: int, obj: Any) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, code: int, message: str, kind: str) -> None:
            self._json(code, {"error": {"message": message, "type": kind, "code": kind}})

        def _fail(self, result: dict[str, Any], record: dict[str, Any]) -> None:
            err = result.get("error") or {}
            code = 503 if err.get("code") in ("overloaded", "backend_failed") else (
                504 if err.get("code") == "deadline_exceeded" else 400)
            self._json(code, {"error": {"message": err.get("message"),
                                        "type": err.get("code"), "code": err.get("code")},
                              "edgelm": _edgelm(record, result)})

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/v1/models":
                with router._lock:
                    names = sorted({m for d in router.fleet.online() for m in d.models
                                    if len(m) < 64})
                self._json(200, {"object": "list", "data": [
                    {"id": n, "object": "model", "owned_by": "edgelm"} for n in names]})
            elif self.path.rstrip("/") == "/healthz":
                self._json(200, {"ok": True, "devices": router.online_devices()})
            else:
                self._error(404, f"no route {self.path}", "not_found")

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._error(404, f"no route {self.path}", "not_found")
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("body must be a JSON object")
            except ValueError as exc:
                self._error(400, f"invalid JSON: {exc}", "invalid_request_error")
                return
            stream = bool(body.get("stream", False))
            cid = f"chatcmpl-{uuid.uuid4().hex[:20]}"
            # `or` would turn max_tokens 0 into the default; a device refuses 0, so must this
            limit = body.get("max_tokens")
            if limit is None:
                limit = body.get("max_completion_tokens")
            request: dict[str, Any] = {"id": cid, "max_tokens": 256 if limit is None else limit}
            # OpenAI clients send null for "not set"; our request schema has no nulls
            for k in ("messages", "temperature", "top_p", "seed", "stop"):
                if body.get(k) is not None:
                    request[k] = body[k]
            model = body.get("model")
            if model and model not in ("edgelm", "auto", "default"):
                request["model"] = model
            try:
                parse_request(json.dumps(request).encode(), 1 << 20)
            except RequestError as exc:
                self._error(400, exc.message, "invalid_request_error")
                return
            sink = QueueSink()
            router.submit(request, sink, source="http")
            created = int(time.time())
            # A request that fails before any text (no device and the cloud down, a deadline)
            # gets an HTTP error status, streaming or not, as OpenAI's API does; only a failure
            # after the stream has started is reported inside it.
            first = sink.events.get()
            if first[0] == "final" and first[1][0].get("status") != "ok":
                self._fail(*first[1])
                return
            if stream:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True

                def send(obj: Any) -> None:
                    self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
                    self.wfile.flush()

                def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
                    return {"id": cid, "object": "chat.completion.chunk", "created": created,
                            "model": str(model or "edgelm"),
                            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

                try:
                    send(chunk({"role": "assistant", "content": ""}, None))
                    event = first
                    while True:
                        kind, value = event
                        if kind == "text":
                            send(chunk({"content": value}, None))
                            event = sink.events.get()
                            continue
                        result, record = value
                        ok = result.get("status") == "ok"
                        final = chunk({}, result.get("finish_reason") if ok else "error")
                        final["usage"] = _usage(record)
                        final["edgelm"] = _edgelm(record, result)
                        send(final)
                        if not ok:  # mid-stream failure: say what it was
                            err = result.get("error") or {}
                            send({"error": {"message": err.get("message"),
                                            "type": err.get("code"), "code": err.get("code")}})
                        self.wfile.write(b"data: [DONE]\n\n")
                        self.wfile.flush()
                        return
                except (BrokenPipeError, ConnectionResetError):
                    return  # the request still finishes and is accounted
            texts: list[str] = []
            event = first
            while event[0] == "text":
                texts.append(event[1])
                event = sink.events.get()
            result, record = event[1]
            if result.get("status") != "ok":
                self._fail(result, record)
                return
            self._json(200, {
                "id": cid, "object": "chat.completion", "created": created,
                "model": str(model or "edgelm"),
                "choices": [{"index": 0, "message": {"role": "assistant",
                                                     "content": "".join(texts)},
                             "finish_reason": result.get("finish_reason")}],
                "usage": _usage(record), "edgelm": _edgelm(record, result),
            })

    return Handler


def _usage(record: dict[str, Any]) -> dict[str, Any]:
    p = record.get("prompt_tokens") or 0
    c = record.get("completion_tokens") or 0
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _edgelm(record: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    # served_by says where the request was sent; status says whether it was answered there
    return {k: record.get(k) for k in ("status", "error_code", "served_by", "edge_device",
                                       "fallback_reason", "attempts", "tried", "energy_j",
                                       "energy_source", "cost_usd", "token_counts", "ttft_ms",
                                       "e2e_ms")}


def serve(config: RouterConfig, broker: BrokerConfig,
          stop: threading.Event, on_ready: Callable[[EdgeRouter], None] | None = None) -> None:
    """Run a router until ``stop`` is set."""
    router = EdgeRouter(config, broker)
    router.start()
    if on_ready is not None:
        on_ready(router)
    stop.wait()
    router.stop()
