"""The device daemon: probes → telemetry, MQTT requests → the inference worker → replies.

Threads (the single concurrency model of the daemon):

- main thread: signal handling and the supervision loop (later: the systemd watchdog);
- paho's network thread: MQTT I/O; its callbacks only validate and enqueue;
- the sampler thread: probe readings, handed to the telemetry publisher;
- one executor thread per loaded model: runs generations one at a time in the worker
  process and publishes chunks and the final result.

Nothing a client sends can stop the daemon: every request failure becomes a structured error
result (when the request can be answered at all) and a counter.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import agent
from agent.errors import PublishError, RequestError
from agent.generation import run_generation
from agent.identity import hardware_identity
from agent.models import ResolvedModel
from agent.mqtt import BrokerConfig, MqttLink, reply_properties
from agent.protocol import (
    CHUNK_SCHEMA,
    RESULT_SCHEMA,
    STATUS_SCHEMA,
    TELEMETRY_SCHEMA,
    InferRequest,
    Topics,
    parse_request,
    peek_request_id,
)
from agent.sampler import Sampler, Snapshot
from agent.sdnotify import notify, watchdog_interval_s
from agent.sequence import SequenceCounter
from agent.worker import InferenceWorker, WorkerConfig
from backends.base import BackendError, BackendOptions, GenerationRequest, ModelSpec, TokenEvent
from backends.registry import backend_classes
from probes.base import Probe, readings_as_dict
from probes.process import ProcessProbe
from probes.registry import create_probes

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DaemonConfig:
    """Everything the daemon needs; built by the CLI from flags (and later the config file).

    Attributes:
        broker: Broker connection settings.
        fleet / device: Topic segments (validated by :func:`agent.protocol.validate_segment`).
        state_dir: Where the sequence counter (and later the outbox) live.
        backend / model / threads / threads_how / context_tokens: The model to serve.
        telemetry_interval_s: Telemetry publish period.
        probe_root: Filesystem root for probes.
        probe_names: Probes to enable (None: every registered one that is available).
        queue_size: Requests waiting beyond the one running; more get ``overloaded``.
        max_payload_bytes: Larger request payloads get ``too_large``.
        shutdown_grace_s: How long an in-flight generation may run on after SIGTERM.
    """

    broker: BrokerConfig
    fleet: str
    device: str
    state_dir: Path
    backend: str
    model: ResolvedModel
    threads: int
    threads_how: str = "configured"
    context_tokens: int = 2048
    telemetry_interval_s: float = 1.0
    probe_root: str = "/"
    probe_names: tuple[str, ...] | None = None
    queue_size: int = 16
    max_payload_bytes: int = 256 * 1024
    shutdown_grace_s: float = 2.0


@dataclass
class _Job:
    request: InferRequest
    reply_topic: str
    correlation: bytes | None
    accepted_ns: int
    deadline_mono: float | None


@dataclass
class Counters:
    """Request counters published in telemetry."""

    received: int = 0
    completed: int = 0
    errors: dict[str, int] = field(default_factory=lambda: collections.defaultdict(int))
    dropped_unanswerable: int = 0
    duplicates: int = 0


class AgentDaemon:
    """One device's agent."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.topics = Topics(config.fleet, config.device)
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self._seq = SequenceCounter(config.state_dir / "seq")
        self._stop = threading.Event()
        self._draining = threading.Event()
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=config.queue_size)
        self._inflight: _Job | None = None
        self._cancel_inflight = threading.Event()
        self.counters = Counters()
        self._recent_lock = threading.Lock()
        # request id → final result payload (None while queued/running); bounded LRU
        self._recent: collections.OrderedDict[str, bytes | None] = collections.OrderedDict()
        self._hardware = hardware_identity(config.probe_root)
        self._worker = InferenceWorker(WorkerConfig(
            backend=config.backend,
            model=ModelSpec(config.model.name, config.model.path, config.model.format,
                            config.model.sha256),
            options=BackendOptions(threads=config.threads, context_tokens=config.context_tokens),
        ))
        self._probes: list[Probe] = create_probes(
            list(config.probe_names) if config.probe_names else None, config.probe_root
        )
        self._process_probe = next(
            (p for p in self._probes if isinstance(p, ProcessProbe)), None
        )
        self._sampler = Sampler(self._probes, interval_s=config.telemetry_interval_s)
        self._last_telemetry_mono = 0.0
        self._link = MqttLink(
            config.broker,
            client_id=f"edgelm-{config.fleet}-{config.device}",
            will=(self.topics.status, self._status_payload("offline", reason="lwt")),
            subscriptions=[
                (self.topics.request, 1),
                (f"$share/edgelm-{config.fleet}/{self.topics.fleet_request}", 1),
            ] if config.broker.protocol == 5 else [(self.topics.request, 1)],
            on_message=self._on_message,
            on_connect=self._on_connect,
        )
        self._executor = threading.Thread(target=self._execute_loop, name="edgelm-executor",
                                          daemon=True)

    # ------------------------------------------------------------------ envelopes

    def _envelope(self, schema: str, **fields: Any) -> dict[str, Any]:
        return {"schema": schema, "device": self.config.device, "fleet": self.config.fleet,
                "ts_unix_ms": int(time.time() * 1000), "seq": self._seq.next(), **fields}

    def _encode(self, obj: dict[str, Any]) -> bytes:
        return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8")

    def _status_payload(self, state: str, reason: str | None = None) -> bytes:
        worker = self._worker
        backends, errors = backend_classes()
        return self._encode(self._envelope(
            STATUS_SCHEMA,
            state=state,
            reason=reason,
            agent_version=agent.__version__,
            hardware=self._hardware,
            backends={
                **{name: _avail_dict(cls.check()) for name, cls in sorted(backends.items())},
                **{name: {"ok": False, "reason": err} for name, err in errors.items()},
            },
            models=[{
                "name": self.config.model.name,
                "format": self.config.model.format,
                "sha256": self.config.model.sha256,
                "backend": self.config.backend,
                "loaded": worker.alive(),
                "context_tokens": self.config.context_tokens,
                "threads": self.config.threads,
            }],
            probes={name: _avail_dict(a) for name, a in self._probe_health().items()},
            worker={"pid": worker.pid, "restarts": worker.restarts,
                    "last_failure": worker.last_failure},
        ))

    def _probe_health(self) -> dict[str, Any]:
        try:
            return self._sampler.health()
        except AttributeError:  # during construction, before the sampler exists
            return {p.name: p.check() for p in self._probes}

    # ------------------------------------------------------------------ MQTT callbacks

    def _on_connect(self) -> None:
        self._link.publish(self.topics.status, self._status_payload("online"), qos=1, retain=True)

    def _on_message(self, msg: Any) -> None:
        """Validate and enqueue; runs on paho's thread, so it never blocks."""
        accepted_ns = time.monotonic_ns()
        self.counters.received += 1
        props = getattr(msg, "properties", None)
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        payload: bytes = msg.payload
        try:
            if self._draining.is_set() or self._stop.is_set():
                raise RequestError("overloaded", "the agent is draining or shutting down",
                                   peek_request_id(payload), {"retryable": True})
            request = parse_request(payload, self.config.max_payload_bytes)
        except RequestError as exc:
            rid = exc.request_id or peek_request_id(payload)
            topic = response_topic or (self.topics.response(rid) if rid else None)
            self.counters.errors[exc.code] += 1
            if topic is None:
                self.counters.dropped_unanswerable += 1
                logger.warning("dropped an unanswerable request on %s: %s", msg.topic, exc.message)
                return
            self._publish_error(topic, correlation, rid, exc.code, exc.message, exc.details)
            return
        reply_topic = response_topic or self.topics.response(request.id)
        with self._recent_lock:
            if request.id in self._recent:
                self.counters.duplicates += 1
                done = self._recent[request.id]
                if done is not None:  # already answered: answer again, do not run again
                    self._link.publish(reply_topic, done, qos=1,
                                       properties=reply_properties(correlation))
                return
            self._recent[request.id] = None
            while len(self._recent) > 10_000:
                self._recent.popitem(last=False)
        deadline = (time.monotonic() + request.deadline_ms / 1000.0
                    if request.deadline_ms else None)
        job = _Job(request, reply_topic, correlation, accepted_ns, deadline)
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            with self._recent_lock:
                self._recent.pop(request.id, None)
            self.counters.errors["overloaded"] += 1
            self._publish_error(reply_topic, correlation, request.id, "overloaded",
                                f"queue full ({self.config.queue_size} waiting)",
                                {"retryable": True, "queue_size": self.config.queue_size})

    # ------------------------------------------------------------------ replies

    def _publish_error(self, topic: str, correlation: bytes | None, rid: str | None, code: str,
                       message: str, details: dict[str, Any] | None = None) -> bytes:
        payload = self._encode(self._envelope(
            RESULT_SCHEMA, id=rid, status="error", text=None, finish_reason="error",
            usage=None, timings=None, energy=None, served_by=self._served_by(),
            error={"code": code, "message": message, "details": details or {}},
        ))
        try:
            self._link.publish(topic, payload, qos=1, properties=reply_properties(correlation))
        except PublishError:
            logger.exception("could not publish an error result")
        return payload

    def _served_by(self) -> dict[str, Any]:
        return {"device": self.config.device, "fleet": self.config.fleet,
                "backend": self.config.backend, "model": self.config.model.name,
                "model_sha256": self.config.model.sha256, "threads": self.config.threads}

    # ------------------------------------------------------------------ execution

    def _execute_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            self._inflight = job
            try:
                final = self._execute(job)
            except Exception as exc:  # the executor must survive anything a request causes
                logger.exception("request %s failed unexpectedly", job.request.id)
                final = self._publish_error(job.reply_topic, job.correlation, job.request.id,
                                            "backend_failed", f"internal error: {exc}")
            finally:
                self._inflight = None
            with self._recent_lock:
                if job.request.id in self._recent:
                    self._recent[job.request.id] = final

    def _execute(self, job: _Job) -> bytes:
        req = job.request
        if req.model is not None and req.model not in (self.config.model.name,
                                                       self.config.model.sha256):
            self.counters.errors["unknown_model"] += 1
            return self._publish_error(job.reply_topic, job.correlation, req.id, "unknown_model",
                                       f"this device serves {self.config.model.name!r}, "
                                       f"not {req.model!r}",
                                       {"available": [self.config.model.name]})
        if job.deadline_mono is not None and time.monotonic() >= job.deadline_mono:
            self.counters.errors["deadline_exceeded"] += 1
            return self._publish_error(job.reply_topic, job.correlation, req.id,
                                       "deadline_exceeded", "the deadline passed while queued")
        gen = GenerationRequest(
            max_tokens=req.max_tokens, messages=req.messages, prompt=req.prompt,
            temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed,
            ignore_eos=req.ignore_eos, stop=req.stop,
        )
        props = reply_properties(job.correlation)
        index = 0

        def on_event(event: TokenEvent) -> None:
            nonlocal index
            if self._cancel_inflight.is_set():
                raise BackendError("backend_failed", "the agent is shutting down",
                                   {"retryable": True})
            if req.stream and event.text and not event.final:
                self._link.publish(job.reply_topic, self._encode(self._envelope(
                    CHUNK_SCHEMA, id=req.id, index=index, delta=event.text,
                    tokens=len(event.token_ids),
                )), qos=1, properties=props)
                index += 1

        try:
            with self._sampler.fast(0.1):
                result = run_generation(self._worker, gen, accepted_ns=job.accepted_ns,
                                        deadline_mono=job.deadline_mono, on_event=on_event)
        except BackendError as exc:
            self.counters.errors[exc.code] += 1
            return self._publish_error(job.reply_topic, job.correlation, req.id, exc.code,
                                       exc.message, exc.details)
        t = result.timings
        payload = self._encode(self._envelope(
            RESULT_SCHEMA, id=req.id, status="ok", text=result.text,
            finish_reason=result.finish_reason,
            usage={"prompt_tokens": result.prompt_tokens,
                   "completion_tokens": result.completion_tokens,
                   "total_tokens": (result.prompt_tokens or 0) + result.completion_tokens},
            timings={"queue_ms": t.queue_ms, "ttft_ms": t.ttft_ms,
                     "prefill_tok_s": t.prefill_tok_s, "decode_tok_s": t.decode_tok_s,
                     "itl_ms": t.itl_ms, "tpot_ms": t.tpot_ms, "e2e_ms": t.e2e_ms},
            energy=None,
            served_by=self._served_by(), chunks=index, error=None,
        ))
        self._link.publish(job.reply_topic, payload, qos=1, properties=props)
        self.counters.completed += 1
        return payload

    # ------------------------------------------------------------------ telemetry

    def _on_snapshot(self, snap: Snapshot) -> None:
        if snap.t_mono_s - self._last_telemetry_mono < self.config.telemetry_interval_s * 0.95:
            return  # the sampler runs faster inside inference windows; telemetry stays at 1 Hz
        self._last_telemetry_mono = snap.t_mono_s
        if not self._link.is_connected():
            return  # telemetry is a live view; results are what must not be lost
        payload = self._envelope(
            TELEMETRY_SCHEMA,
            probes=snap.readings,
            power=[readings_as_dict(p) for p in snap.power],
            errors=snap.errors,
            queue_depth=self._jobs.qsize(),
            inflight=1 if self._inflight is not None else 0,
            requests={"received": self.counters.received, "completed": self.counters.completed,
                      "errors": dict(self.counters.errors),
                      "dropped_unanswerable": self.counters.dropped_unanswerable,
                      "duplicates": self.counters.duplicates},
            worker={"pid": self._worker.pid, "restarts": self._worker.restarts},
        )
        try:
            self._link.publish(self.topics.telemetry, self._encode(payload), qos=0)
        except PublishError as exc:
            logger.debug("telemetry not published: %s", exc)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Load the model, start sampling and connect. Returns once the model is loaded.

        A model that fails to load is reported in ``status`` and retried on the next request;
        it does not stop the daemon.
        """
        try:
            self._worker.start()
        except BackendError as exc:
            logger.error("model failed to load: %s: %s", exc.code, exc.message)
        if self._process_probe is not None:
            self._process_probe.set_pid("worker", self._worker.pid)
        self._sampler.add_listener(self._on_snapshot)
        self._sampler.start()
        self._executor.start()
        self._link.start()

    def request_stop(self) -> None:
        """Ask the daemon to shut down (signal-safe: sets an event only)."""
        self._stop.set()

    def run_forever(self) -> int:
        """Run until SIGTERM/SIGINT; return the process exit code (0 on a clean stop)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.request_stop())
        self.start()
        notify("READY=1\nSTATUS=serving " + self.config.model.name)
        tick_s = min(0.5, watchdog_interval_s() or 0.5)
        while not self._stop.wait(tick_s):
            # Fed from the main loop, not a side thread: a hung loop stops the pings.
            notify("WATCHDOG=1")
            if self._process_probe is not None:
                self._process_probe.set_pid("worker", self._worker.pid)
        notify("STOPPING=1")
        self.shutdown()
        return 0

    def shutdown(self) -> None:
        """Stop within a few seconds: finish or cancel the in-flight request, publish offline."""
        self._stop.set()
        self._draining.set()
        deadline = time.monotonic() + self.config.shutdown_grace_s
        while self._inflight is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        self._cancel_inflight.set()
        # Queued requests are answered, not dropped: the client can retry elsewhere.
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self._publish_error(job.reply_topic, job.correlation, job.request.id,
                                    "overloaded", "the agent is shutting down",
                                    {"retryable": True})
        self._jobs.put(None)
        self._executor.join(timeout=1.5)
        pending = []
        try:
            pending.append(self._link.publish(
                self.topics.status, self._status_payload("offline", reason="shutdown"),
                qos=1, retain=True))
        except PublishError:
            logger.warning("could not publish the offline status; the broker's LWT will")
        self._link.stop(timeout_s=1.5, pending=pending)
        self._sampler.stop()
        self._worker.stop(timeout_s=1.0)
        logger.info("stopped")


def _avail_dict(avail: Any) -> dict[str, Any]:
    out = {"ok": bool(avail.ok), "reason": str(avail.reason or "")}
    if hasattr(avail, "degraded"):
        out["degraded"] = bool(avail.degraded)
    return out


def default_state_dir() -> Path:
    """``$STATE_DIRECTORY`` (systemd), else /var/lib/edgelm if writable, else ~/.local/state."""
    env = os.environ.get("STATE_DIRECTORY")
    if env:
        return Path(env.split(":")[0])
    system = Path("/var/lib/edgelm")
    if os.access(system if system.exists() else system.parent, os.W_OK):
        return system
    return Path.home() / ".local/state/edgelm"
