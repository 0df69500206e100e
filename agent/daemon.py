"""The device daemon: probes → telemetry, MQTT requests → admission → workers → the outbox.

Protocol rules embodied here (DESIGN.md §4 and §7, issue 5):

- every final result, error result, bench record and command result is committed to the
  **outbox** (:mod:`agent.outbox`) before it is published, so a broker outage during a stream
  loses no result; stream chunks are live only (published while connected, counted when
  dropped offline) because the final result carries the whole text;
- requests pass **admission** (:mod:`agent.admission`): drain state, idempotency (a retried id
  is never run twice, also across a restart: completed results are kept in
  ``idempotency.sqlite3`` in the state directory), a per-client sliding-window rate limit,
  then a bounded queue served by ``concurrency`` executors, each owning one worker process; a
  full queue answers ``overloaded`` at once;
- each final result carries ``energy`` from the :class:`agent.energy.EnergyIntegrator` over
  the execution window, which is bracketed by power samples taken on the executor
  (:meth:`agent.sampler.Sampler.sample_power_now`) while the sampler runs at
  ``fast_interval_s`` as long as requests are queued; None values and a reason when nothing
  measures power, never 0;
- ``cmd/bench`` runs on the daemon's own worker, through the job queue: requests queued
  before it run first, later ones wait behind it, and no second model copy is loaded;
- ``cmd/reload`` and SIGHUP re-read the configuration the daemon started with (file,
  ``EDGELM_*``, its command-line flags): settings that can change live are applied, the
  workers are restarted (after their in-flight generation) on the possibly new model, and
  settings that need a restart are listed as ``restart_required``; a bad configuration is an
  error result and the daemon keeps serving on the old one;
- the retained ``status`` is re-published once per **health change** (probe degraded or
  recovered, worker restarted or died, drain toggled), never per sample;
- prompts and generated text are never logged unless ``log_content`` is set.

Threads (the single concurrency model of the daemon: threads around paho's loop):

- main thread: signal handling, the supervision loop, the systemd watchdog (fed from this
  loop, so a hang stops the pings), health-change detection, idle-baseline measurement;
- ``edgelm-mqtt``: the MQTT network thread (:mod:`agent.mqtt`); callbacks only validate and
  enqueue, never block;
- ``edgelm-outbox``: the outbox drainer; ``edgelm-sampler``: probes;
- ``edgelm-executor-N``: one per worker process, runs generations and publishes chunks;
- short-lived ``edgelm-cmd`` threads for ``cmd/reload``, SIGHUP and ``cmd/bench`` (the bench
  itself runs on an executor, the command thread waits for it).

Executors and exclusive work: an executor runs a request only while nothing exclusive (a bench
run, a worker restart by reload) holds the gate, and exclusive work starts only once no request
runs, so bench timings are clean and a reload never races a request for a worker.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import agent
from agent.admission import (
    AdmissionConfig,
    IdempotencyCache,
    ResultStore,
    SlidingWindowRateLimiter,
    request_fingerprint,
)
from agent.energy import EnergyIntegrator, EnergyResult
from agent.errors import PublishError, RequestError
from agent.generation import GenerationResult, run_generation
from agent.identity import hardware_identity
from agent.models import ResolvedModel
from agent.mqtt import BrokerConfig, MqttLink, reply_properties
from agent.outbox import OutboxConfig, OutboxDrainer, OutboxQueue
from agent.prometheus import Histogram, PrometheusServer, flatten_numeric, render_gauges
from agent.protocol import (
    CHUNK_SCHEMA,
    CMD_RESULT_SCHEMA,
    RESULT_SCHEMA,
    STATUS_SCHEMA,
    TELEMETRY_SCHEMA,
    InferRequest,
    Topics,
    parse_command,
    parse_request,
    peek_request_id,
)
from agent.sampler import Sampler, Snapshot
from agent.sdnotify import notify, reloading_message, watchdog_interval_s
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
    """Everything the daemon needs; built by the CLI from the config file, env and flags.

    Attributes:
        broker: Broker connection settings.
        fleet / device: Topic segments (validated by :func:`agent.protocol.validate_segment`).
        state_dir: Where the sequence counter and the outbox live.
        backend / model / threads / threads_how / context_tokens: The model to serve.
        stream_batch_ms: Shortest gap between two streamed chunks of one request (the first
            text and the final result are never held); 0: one chunk per token.
        worker_nice: Added to the worker process's nice value (0: the agent's priority).
        telemetry_interval_s: Telemetry publish period.
        probe_root: Filesystem root for probes.
        probe_names: Probes to enable (None: every registered one that is available).
        admission: Queue, concurrency, payload limit, rate limit, idempotency.
        outbox: Outbox bounds and pacing.
        telemetry_via_outbox: Queue telemetry in the outbox too (QoS 1, survives outages).
        fast_interval_s: Sampling interval during a generation (energy resolution).
        energy_min_coverage: Smallest window coverage for which energy is reported.
        baseline_window_s / baseline_every_s: Idle-baseline window and refresh period.
        log_content: Log prompts and outputs (off: never written to logs).
        log_level: Root log level (``debug`` … ``error``); None leaves the CLI's ``-v`` level.
        prometheus_listen: ``host:port`` of the Prometheus endpoint; None: off.
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
    stream_batch_ms: int = 50
    worker_nice: int = 0
    telemetry_interval_s: float = 1.0
    probe_root: str = "/"
    probe_names: tuple[str, ...] | None = None
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    telemetry_via_outbox: bool = False
    fast_interval_s: float = 0.1
    energy_min_coverage: float = 0.9
    baseline_window_s: float = 10.0
    baseline_every_s: float = 600.0
    log_content: bool = False
    log_level: str | None = None
    prometheus_listen: str | None = None
    shutdown_grace_s: float = 2.0


# DaemonConfig field -> the configuration key(s) an operator edits (agent.toml / EDGELM_*).
_FIELD_KEYS = {
    "fleet": "agent.fleet", "device": "agent.device", "state_dir": "agent.state_dir",
    "backend": "model.backend", "model": "model.name", "threads": "model.threads",
    "threads_how": "model.threads", "context_tokens": "model.context_tokens",
    "stream_batch_ms": "model.stream_batch_ms", "worker_nice": "model.worker_nice",
    "telemetry_interval_s": "telemetry.interval_s", "probe_root": "telemetry.probe_root",
    "probe_names": "telemetry.probes", "telemetry_via_outbox": "outbox.telemetry",
    "fast_interval_s": "telemetry.fast_interval_s",
    "energy_min_coverage": "energy.min_coverage",
    "baseline_window_s": "energy.baseline_window_s",
    "baseline_every_s": "energy.baseline_every_s",
    "log_content": "agent.log_content", "log_level": "agent.log_level",
    "prometheus_listen": "prometheus.listen", "shutdown_grace_s": "shutdown_grace_s",
}
_BROKER_URL_FIELDS = ("host", "port", "tls")

# error.code values of edgelm.infer.result/1 (agent/schemas/infer_result.json).
RESULT_ERROR_CODES = frozenset({
    "bad_request", "too_large", "context_overflow", "unknown_model", "overloaded",
    "deadline_exceeded", "backend_failed",
})

# The power sample before a generation delays its first token: only sources whose last read
# took at most this long are read then (sysfs counters and rails: well under 1 ms, see
# benchmarks/energy_window.py; a vcgencmd fork on a Pi: several ms, left to the sampler).
START_SAMPLE_MAX_COST_S = 0.002

# Settings a running daemon cannot change: the MQTT session and topics, files opened at start,
# the probes created at start, the number of executors, the outbox drainer's pacing (read once
# by agent.outbox.OutboxDrainer) and the Prometheus socket.
RESTART_REQUIRED = frozenset({
    "agent.fleet", "agent.device", "agent.state_dir", "telemetry.probe_root",
    "telemetry.probes", "admission.concurrency", "outbox.replay_rate_per_s",
    "outbox.inflight_window", "outbox.synchronous", "prometheus.listen",
})


def _config_values(cfg: DaemonConfig) -> dict[str, list[Any]]:
    """Configuration key -> the values behind it (several fields can share one key)."""
    out: dict[str, list[Any]] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in ("broker", "admission", "outbox"):
            section = "mqtt" if f.name == "broker" else f.name
            for sub in dataclasses.fields(value):
                key = ("mqtt.broker" if f.name == "broker" and sub.name in _BROKER_URL_FIELDS
                       else f"{section}.{sub.name}")
                out.setdefault(key, []).append(getattr(value, sub.name))
            continue
        out.setdefault(_FIELD_KEYS.get(f.name, f.name), []).append(value)
    return out


def config_changes(old: DaemonConfig, new: DaemonConfig) -> tuple[list[str], list[str]]:
    """Keys whose values differ: ``(changed, restart_required)``, both sorted.

    ``restart_required`` is the subset a running daemon cannot apply (every ``mqtt.*`` key and
    :data:`RESTART_REQUIRED`).
    """
    a, b = _config_values(old), _config_values(new)
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    restart = [k for k in changed if k.startswith("mqtt.") or k in RESTART_REQUIRED]
    return changed, restart


def applicable(old: DaemonConfig, new: DaemonConfig) -> DaemonConfig:
    """``new`` with every setting that needs a restart kept as in ``old``."""
    return dataclasses.replace(
        new, broker=old.broker, fleet=old.fleet, device=old.device, state_dir=old.state_dir,
        probe_root=old.probe_root, probe_names=old.probe_names,
        prometheus_listen=old.prometheus_listen,
        admission=dataclasses.replace(new.admission, concurrency=old.admission.concurrency),
        outbox=dataclasses.replace(new.outbox, replay_rate_per_s=old.outbox.replay_rate_per_s,
                                   inflight_window=old.outbox.inflight_window,
                                   synchronous=old.outbox.synchronous),
    )


class CommandError(Exception):
    """An operator command failed in a way the result names (``code``, ``message``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class _Reply:
    topic: str
    correlation: bytes | None


@dataclass
class _Job:
    request: InferRequest
    reply: _Reply
    accepted_ns: int
    deadline_mono: float | None
    # False when the final result is a retryable error (shutting down, worker crashed): the id
    # is forgotten so a retry runs, instead of being answered with that error (from disk,
    # across restarts) for the whole idempotency TTL.
    remember: bool = True


@dataclass
class _BenchJob:
    """``cmd/bench`` waiting in the job queue; the command thread waits on ``done``."""

    cmd: dict[str, Any]
    done: threading.Event = field(default_factory=threading.Event)
    record: dict[str, Any] | None = None
    error: BaseException | None = None
    worker_pid: int | None = None


@dataclass
class Counters:
    """Request counters published in telemetry."""

    received: int = 0
    completed: int = 0
    errors: dict[str, int] = field(default_factory=lambda: collections.defaultdict(int))
    dropped_unanswerable: int = 0
    duplicates: int = 0
    rate_limited: int = 0
    chunks_dropped_offline: int = 0
    commands: int = 0


class AgentDaemon:
    """One device's agent.

    Args:
        config: The configuration it starts with.
        reload_config: Builds the configuration again the way ``config`` was built (file,
            environment, the same command-line flags), for ``cmd/reload`` and SIGHUP; it
            raises :class:`agent.errors.ConfigError` naming the file or variable and the key.
            None: a reload keeps ``config`` and only restarts the workers.
    """

    def __init__(self, config: DaemonConfig,
                 reload_config: Callable[[], DaemonConfig] | None = None) -> None:
        self.config = config
        self._reload_config = reload_config
        self.topics = Topics(config.fleet, config.device)
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self._seq = open_sequence(config.state_dir / "seq")
        self._stop = threading.Event()
        self._draining = threading.Event()
        self._reload_requested = threading.Event()
        self._reload_deferred = False
        self._startup_log_level = logging.getLogger().level
        adm = config.admission
        self._jobs: queue.Queue[_Job | _BenchJob | None] = queue.Queue(
            maxsize=max(1, adm.queue_size))
        self._inflight: dict[int, _Job] = {}
        self._cancel_inflight = threading.Event()
        # The gate between requests (shared) and benches / worker restarts (exclusive).
        self._gate = threading.Condition()
        self._running_requests = 0
        self._exclusive_waiting = 0
        self._exclusive_active = False
        self.counters = Counters()
        self._results = ResultStore(config.state_dir / "idempotency.sqlite3",
                                    adm.idempotency_ttl_s, adm.idempotency_max_entries,
                                    synchronous=config.outbox.synchronous)
        self._idem = IdempotencyCache(adm.idempotency_ttl_s, adm.idempotency_max_entries,
                                      store=self._results)
        self._limiter = SlidingWindowRateLimiter(adm.rate_limit, adm.rate_window_s)
        self._hardware = hardware_identity(config.probe_root)
        self._workers = [InferenceWorker(_worker_config(config))
                         for _ in range(adm.concurrency)]
        self._probes: list[Probe] = create_probes(
            list(config.probe_names) if config.probe_names else None, config.probe_root
        )
        self._process_probe = next(
            (p for p in self._probes if isinstance(p, ProcessProbe)), None
        )
        self._sampler = Sampler(self._probes, interval_s=config.telemetry_interval_s)
        self._energy = EnergyIntegrator(self._sampler, min_coverage=config.energy_min_coverage)
        self._apply_log_level(config.log_level)
        self._last_telemetry_mono = 0.0
        self._last_telemetry: dict[str, Any] | None = None
        self._last_activity_mono = time.monotonic()
        self._last_baseline_mono: float | None = None
        self._health_key: Any = None
        self._cmd_lock = threading.Lock()
        self._hist = {
            "ttft_ms": Histogram("edgelm_ttft_ms", "Time to first token, ms (DESIGN.md §5)"),
            "itl_ms": Histogram("edgelm_itl_ms", "Mean inter-token latency per request, ms",
                                (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)),
            "e2e_ms": Histogram("edgelm_e2e_ms", "Request accepted to last token, ms"),
        }
        self.outbox = OutboxQueue(config.state_dir / "outbox.sqlite3", config.outbox)
        subs = [(self.topics.request, 1), (f"{self.topics.prefix}/cmd/+", 1)]
        if config.broker.protocol == 5:
            subs.append((f"$share/edgelm-{config.fleet}/{self.topics.fleet_request}", 1))
        self._link = MqttLink(
            config.broker,
            client_id=f"edgelm-{config.fleet}-{config.device}",
            will=(self.topics.status, self._status_payload("offline", reason="lwt")),
            subscriptions=subs,
            on_message=self._on_message,
            on_connect=self._on_connect,
            on_publish=self._on_publish,
        )
        self._drainer = OutboxDrainer(self.outbox, self._link)
        self._executors = [
            threading.Thread(target=self._execute_loop, args=(i,), name=f"edgelm-executor-{i}",
                             daemon=True)
            for i in range(len(self._workers))
        ]
        self._prometheus = (PrometheusServer(config.prometheus_listen, self.render_metrics)
                            if config.prometheus_listen else None)

    # ------------------------------------------------------------------ envelopes

    def _envelope(self, schema: str, **fields: Any) -> dict[str, Any]:
        return {"schema": schema, "device": self.config.device, "fleet": self.config.fleet,
                "ts_unix_ms": int(time.time() * 1000), "seq": self._seq.next(), **fields}

    def _encode(self, obj: dict[str, Any]) -> bytes:
        return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8")

    def _worker_summary(self) -> dict[str, Any]:
        first = self._workers[0]
        failures = [w.last_failure for w in self._workers if w.last_failure]
        return {"pid": first.pid, "restarts": sum(w.restarts for w in self._workers),
                "last_failure": failures[-1] if failures else None}

    def _status_payload(self, state: str, reason: str | None = None) -> bytes:
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
                "loaded": any(w.alive() for w in self._workers),
                "context_tokens": self.config.context_tokens,
                "threads": self.config.threads,
                "concurrency": len(self._workers),
            }],
            probes={name: _avail_dict(a) for name, a in self._probe_health().items()},
            worker=self._worker_summary(),
            workers=[{"pid": w.pid, "restarts": w.restarts, "last_failure": w.last_failure}
                     for w in self._workers],
            draining=self._draining.is_set(),
        ))

    def _probe_health(self) -> dict[str, Any]:
        try:
            return self._sampler.health()
        except AttributeError:  # during construction, before the sampler exists
            return {p.name: p.check() for p in self._probes}

    def _health_fingerprint(self) -> Any:
        probes = tuple(sorted((k, a.ok, bool(getattr(a, "degraded", False)))
                              for k, a in self._sampler.health().items()))
        workers = tuple((w.restarts, w.alive()) for w in self._workers)
        return probes, workers, self._draining.is_set()

    def publish_status(self, reason: str | None = None) -> None:
        """Publish the retained ``online`` status now (if connected; reconnects re-announce)."""
        if not self._link.is_connected():
            return
        try:
            self._link.publish(self.topics.status, self._status_payload("online", reason),
                               qos=1, retain=True)
        except PublishError as exc:
            logger.warning("status not published: %s", exc)

    # ------------------------------------------------------------------ MQTT callbacks

    def _on_connect(self) -> None:
        self._health_key = self._health_fingerprint()
        self.publish_status()
        self._drainer.wake()

    def _on_publish(self) -> None:
        self._drainer.wake()

    def _on_message(self, msg: Any) -> None:
        """Dispatch: commands, else inference requests. Runs on the network thread."""
        if msg.topic.startswith(f"{self.topics.prefix}/cmd/"):
            self._on_command(msg)
        else:
            self._on_request(msg)

    def _reply_of(self, msg: Any, request_id: str | None, fallback: str | None) -> _Reply | None:
        props = getattr(msg, "properties", None)
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        topic = response_topic or fallback
        return _Reply(topic, correlation) if topic else None

    def _on_request(self, msg: Any) -> None:
        """Validate, admit and enqueue; never blocks."""
        accepted_ns = time.monotonic_ns()
        self.counters.received += 1
        payload: bytes = msg.payload
        adm = self.config.admission
        try:
            if self._stop.is_set():
                raise RequestError("overloaded", "the agent is shutting down",
                                   peek_request_id(payload, adm.max_payload_bytes),
                                   {"retryable": True, "reason": "shutting_down"})
            if self._draining.is_set():
                raise RequestError("overloaded", "the agent is draining (cmd/drain)",
                                   peek_request_id(payload, adm.max_payload_bytes),
                                   {"retryable": True, "reason": "draining"})
            request = parse_request(payload, adm.max_payload_bytes)
        except RequestError as exc:
            rid = exc.request_id or peek_request_id(payload, adm.max_payload_bytes)
            reply = self._reply_of(msg, rid, self.topics.response(rid) if rid else None)
            self.counters.errors[exc.code] += 1
            if reply is None:
                self.counters.dropped_unanswerable += 1
                logger.warning("dropped an unanswerable request on %s: %s", msg.topic, exc.message)
                return
            self._send_error(reply, rid, exc.code, exc.message, exc.details)
            return
        reply = self._reply_of(msg, request.id, self.topics.response(request.id))
        assert reply is not None
        if self.config.log_content:
            logger.info("request %s: %s", request.id,
                        request.prompt if request.prompt is not None else request.messages)
        state, done = self._idem.claim(request.id, reply, request_fingerprint(request))
        if state == IdempotencyCache.CONFLICT:
            # Not _refuse: the id stays with the request it was first used for.
            self.counters.errors["bad_request"] += 1
            self._send_error(reply, request.id, "bad_request",
                             f"request id {request.id!r} was already used for a different "
                             "request; send a new id (a retry must repeat the request)",
                             {"reason": "id_reused"})
            return
        if state != IdempotencyCache.NEW:
            self.counters.duplicates += 1
            if done is not None:  # already answered: answer again (same seq), do not run again
                self._send(reply, done, kind="result")
            return
        client = request.client_id or reply.topic
        allowed, retry_after_s = self._limiter.allow(client)
        if not allowed:
            self.counters.rate_limited += 1
            self._refuse(request.id, reply, "rate limit exceeded for this client",
                         {"retryable": True, "reason": "rate_limited",
                          "retry_after_ms": int(retry_after_s * 1000) + 1,
                          "limit": adm.rate_limit, "window_s": adm.rate_window_s})
            return
        deadline_ms = request.deadline_ms or adm.default_deadline_ms or None
        deadline = (time.monotonic() + deadline_ms / 1000.0) if deadline_ms else None
        job = _Job(request, reply, accepted_ns, deadline)
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            self._refuse(request.id, reply, f"queue full ({adm.queue_size} waiting)",
                         {"retryable": True, "reason": "queue_full",
                          "queue_size": adm.queue_size})

    def _refuse(self, rid: str, reply: _Reply, message: str, details: dict[str, Any]) -> None:
        """Answer ``overloaded`` to a request that was claimed but will not run."""
        waiters = self._idem.forget(rid)
        self.counters.errors["overloaded"] += 1
        payload = self._send_error(reply, rid, "overloaded", message, details)
        for w in waiters:
            self._send(w, payload, kind="result")

    def _on_command(self, msg: Any) -> None:
        name = msg.topic.rsplit("/", 1)[1]
        self.counters.commands += 1
        fallback = f"{self.topics.prefix}/cmd/{name}/result"
        try:
            cmd = parse_command(name, msg.payload)
        except RequestError as exc:
            reply = self._reply_of(msg, None, fallback)
            assert reply is not None
            self._send_cmd_result(reply, name, exc.request_id, "error",
                                  error={"code": exc.code, "message": exc.message})
            return
        reply = self._reply_of(msg, cmd.get("id"), fallback)
        assert reply is not None
        logger.info("operator command %s", name)
        if name == "drain":
            if cmd.get("resume"):
                self._draining.clear()
            else:
                self._draining.set()
            self._send_cmd_result(reply, name, cmd.get("id"), "ok",
                                  details={"draining": self._draining.is_set(),
                                           "queued": self._jobs.qsize(),
                                           "inflight": len(self._inflight)})
            return
        if not self._cmd_lock.acquire(blocking=False):
            self._send_cmd_result(reply, name, cmd.get("id"), "error",
                                  error={"code": "busy",
                                         "message": "another reload or bench is running"})
            return
        target = self._do_reload if name == "reload" else self._do_bench
        threading.Thread(target=self._run_command, args=(target, reply, name, cmd),
                         name="edgelm-cmd", daemon=True).start()

    def _run_command(self, target: Any, reply: _Reply, name: str, cmd: dict[str, Any]) -> None:
        try:
            details = target(cmd)
            self._send_cmd_result(reply, name, cmd.get("id"), "ok", details=details)
        except CommandError as exc:
            logger.error("command %s failed: %s: %s", name, exc.code, exc.message)
            self._send_cmd_result(reply, name, cmd.get("id"), "error",
                                  error={"code": exc.code, "message": exc.message})
        except Exception as exc:
            logger.exception("command %s failed", name)
            self._send_cmd_result(reply, name, cmd.get("id"), "error",
                                  error={"code": "failed", "message": f"{exc}"})
        finally:
            self._cmd_lock.release()

    # ------------------------------------------------------------------ reload

    def _do_reload(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """``cmd/reload`` and SIGHUP: re-read the configuration, apply it, restart the workers.

        systemd hears ``RELOADING=1`` before and ``READY=1`` after, whatever the outcome (a
        failed reload leaves the daemon serving on its old configuration, still ready).

        Raises:
            CommandError: ``config_error`` naming the file or variable and the key; nothing
                was applied.
        """
        notify(reloading_message())
        try:
            return self._reload()
        finally:
            notify("READY=1\nSTATUS=serving " + self.config.model.name)

    def _reload(self) -> dict[str, Any]:
        t0 = time.monotonic()
        old = self.config
        new = old
        if self._reload_config is not None:
            try:
                new = self._reload_config()
            except Exception as exc:  # ConfigError, ModelError, a bad value deeper down
                raise CommandError("config_error", f"configuration not reloaded, still "
                                    f"serving on the previous one: {exc}") from exc
        changed, restart_required = config_changes(old, new)
        applied = applicable(old, new)
        failure: str | None = None
        was_loaded = False
        with self._exclusive():
            # No request runs meanwhile: every setting and the worker restart apply between
            # two requests, never in the middle of one.
            was_loaded = all(w.alive() for w in self._workers)
            self._apply_live(old, applied)
            self.config = applied
            failure = self._restart_workers(applied)
            if failure is not None and was_loaded:
                # The new model settings do not load (a backend that is not installed, a
                # model it cannot read): a reload that leaves the device serving nothing is
                # worse than no reload, so everything goes back as it was.
                self._apply_live(applied, old)
                self.config = old
                back = self._restart_workers(old)
                if back is not None:
                    logger.error("reload: the previous model does not load again either: %s",
                                 back)
        if failure is not None and was_loaded:
            self._set_worker_pids()
            self.publish_status(reason="reloaded")
            raise CommandError("load_failed", f"configuration not reloaded, still serving on "
                               f"the previous one: the model does not load with it: {failure}")
        self._set_worker_pids()
        self.publish_status(reason="reloaded")
        if restart_required:
            logger.warning("reload: %s changed but need(s) a restart (systemctl restart "
                           "edgelm-agent); still using the old value(s)",
                           ", ".join(restart_required))
        logger.info("configuration reloaded; changed: %s", ", ".join(changed) or "nothing")
        return {"reload_ms": (time.monotonic() - t0) * 1000.0,
                "loaded": all(w.alive() for w in self._workers),
                "changed": changed, "restart_required": restart_required,
                "workers_restarted": len(self._workers)}

    def _restart_workers(self, cfg: DaemonConfig) -> str | None:
        """Restart every worker on ``cfg``'s model; the first load failure, or None."""
        failure = None
        for w in self._workers:
            w.stop(timeout_s=5.0)
            w.config = _worker_config(cfg, w.config)
            try:
                w.start()
            except BackendError as exc:
                logger.error("reload: model failed to load: %s", exc.message)
                failure = failure or f"{exc.code}: {exc.message}"
        return failure

    def _apply_live(self, old: DaemonConfig, new: DaemonConfig) -> None:
        """Hand the settings that can change while running to the parts that hold them."""
        if new.telemetry_interval_s != old.telemetry_interval_s:
            self._sampler.set_interval(new.telemetry_interval_s)
        adm = new.admission
        self._limiter.reconfigure(adm.rate_limit, adm.rate_window_s)
        self._idem.reconfigure(adm.idempotency_ttl_s, adm.idempotency_max_entries)
        with self._jobs.mutex:  # queue.Queue reads maxsize under this lock
            self._jobs.maxsize = max(1, adm.queue_size)
            self._jobs.not_full.notify_all()
        # The outbox reads its bounds, TTL and drop policy from .config on every put; the
        # drainer's pacing was read once (RESTART_REQUIRED keeps it as it was).
        self.outbox.config = new.outbox
        self._energy.set_min_coverage(new.energy_min_coverage)
        self._apply_log_level(new.log_level)

    def _apply_log_level(self, level: str | None) -> None:
        root = logging.getLogger()
        root.setLevel(self._startup_log_level if level is None else level.upper())
        logger.debug("log level %s", logging.getLevelName(root.getEffectiveLevel()))

    def _request_reload(self) -> None:
        """SIGHUP handler: only sets an event (the main loop starts the reload)."""
        self._reload_requested.set()

    def _start_signal_reload(self) -> None:
        """Run a SIGHUP reload on a command thread, once no other command runs."""
        if not self._cmd_lock.acquire(blocking=False):
            # A bench or reload runs; the event stays set and the next tick retries.
            if not self._reload_deferred:
                logger.info("SIGHUP: the reload waits for the running command")
                self._reload_deferred = True
            return
        self._reload_deferred = False
        self._reload_requested.clear()
        logger.info("SIGHUP: reloading the configuration")
        threading.Thread(target=self._signal_reload, name="edgelm-cmd", daemon=True).start()

    def _signal_reload(self) -> None:
        try:
            details = self._do_reload({})
            logger.info("SIGHUP reload done: changed %s; restart required for %s; loaded %s",
                        details["changed"], details["restart_required"], details["loaded"])
        except CommandError as exc:
            logger.error("SIGHUP reload failed: %s", exc.message)
        except Exception:
            logger.exception("SIGHUP reload failed")
        finally:
            self._cmd_lock.release()

    # ------------------------------------------------------------------ exclusive work

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Wait until no request runs, then hold executors off requests for the block."""
        with self._gate:
            self._exclusive_waiting += 1
            try:
                while self._exclusive_active or self._running_requests:
                    self._gate.wait()
            finally:
                self._exclusive_waiting -= 1
            self._exclusive_active = True
        try:
            yield
        finally:
            with self._gate:
                self._exclusive_active = False
                self._gate.notify_all()

    @contextlib.contextmanager
    def _shared(self) -> Iterator[None]:
        """Run one request: waits while exclusive work runs or waits to run."""
        with self._gate:
            while self._exclusive_active or self._exclusive_waiting:
                self._gate.wait()
            self._running_requests += 1
        try:
            yield
        finally:
            with self._gate:
                self._running_requests -= 1
                self._gate.notify_all()

    # ------------------------------------------------------------------ bench

    def _do_bench(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Queue a bench on the daemon's own worker and wait for it; queue its record.

        Through the job queue, like a request: requests queued before it run first, later ones
        wait behind it, and the executor runs it exclusively (no other executor generates
        meanwhile), so its timings are not mixed with served requests and no second copy of
        the model is loaded.

        Raises:
            CommandError: ``overloaded`` when the queue is full; ``failed`` when the bench
                failed or the agent shut down first.
        """
        job = _BenchJob(cmd)
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise CommandError("overloaded", f"queue full ({self.config.admission.queue_size} "
                                "waiting); try the bench again later") from None
        job.done.wait()
        if job.error is not None:
            raise CommandError("failed", f"bench failed: {job.error}") from job.error
        record = job.record
        assert record is not None
        record.update(device=self.config.device, fleet=self.config.fleet,
                      seq=self._seq.next(), request_id=cmd.get("id"))
        if not self.config.log_content:
            for run in [*record.get("runs", []), record.get("cold") or {}]:
                run.pop("text", None)
        self.outbox.put(self.topics.bench_result, self._encode(record), kind="bench")
        return {"topic": self.topics.bench_result, "seq": record["seq"],
                "worker_pid": job.worker_pid}

    def _run_bench_job(self, job: _BenchJob, worker: InferenceWorker) -> None:
        """Executor side of ``cmd/bench``: the bench engine on this executor's worker."""
        from agent.bench import BenchCancelledError, BenchConfig, run_bench

        cmd, cfg = job.cmd, self.config
        try:
            with self._exclusive():
                record = run_bench(BenchConfig(
                    backend=cfg.backend, model=cfg.model, threads=cfg.threads,
                    threads_how=cfg.threads_how, max_tokens=int(cmd.get("max_tokens", 32)),
                    ignore_eos=bool(cmd.get("ignore_eos", True)), runs=int(cmd.get("runs", 3)),
                    warmup=int(cmd.get("warmup", 1)), context_tokens=cfg.context_tokens,
                    probe_root=cfg.probe_root,
                ), worker=worker, sampler=self._sampler, should_stop=self._stop.is_set)
            job.record, job.worker_pid = record, worker.pid
        except BenchCancelledError as exc:  # SIGTERM: stop within the shutdown budget
            logger.info("bench cancelled: the agent is shutting down")
            job.error = exc
        except Exception as exc:  # reported to the operator; the executor goes on
            logger.exception("bench failed")
            job.error = exc
        finally:
            self._last_activity_mono = time.monotonic()
            job.done.set()

    # ------------------------------------------------------------------ replies

    def _send(self, reply: _Reply, payload: bytes, kind: str) -> None:
        """Commit a message to the outbox (published in order, at least once)."""
        self.outbox.put(reply.topic, payload, kind=kind, correlation=reply.correlation)

    def _send_error(self, reply: _Reply, rid: str | None, code: str, message: str,
                    details: dict[str, Any] | None = None) -> bytes:
        payload = self._encode(self._envelope(
            RESULT_SCHEMA, id=rid, status="error", text=None, finish_reason="error",
            usage=None, timings=None, energy=None, served_by=self._served_by(),
            error={"code": code, "message": message, "details": details or {}},
        ))
        self._send(reply, payload, kind="result")
        return payload

    def _send_cmd_result(self, reply: _Reply, name: str, cid: str | None, status: str,
                         details: dict[str, Any] | None = None,
                         error: dict[str, Any] | None = None) -> None:
        payload = self._encode(self._envelope(
            CMD_RESULT_SCHEMA, id=cid, command=name, status=status, details=details or {},
            error=error))
        self._send(reply, payload, kind="cmd")

    def _served_by(self) -> dict[str, Any]:
        return {"device": self.config.device, "fleet": self.config.fleet,
                "backend": self.config.backend, "model": self.config.model.name,
                "model_sha256": self.config.model.sha256, "threads": self.config.threads}

    # ------------------------------------------------------------------ execution

    def _execute_loop(self, index: int) -> None:
        # The fast sampling rate is held from the first job until the queue runs empty, not
        # per request: back-to-back requests then never start inside a slow interval.
        with contextlib.ExitStack() as fast_rate:
            fast = False
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                if isinstance(job, _BenchJob):
                    fast_rate.close()  # the bench sets its own rate
                    fast = False
                    self._run_bench_job(job, self._workers[index])
                    continue
                if not fast:
                    fast_rate.enter_context(self._sampler.fast(self.config.fast_interval_s))
                    fast = True
                self._run_job(index, job)
                if self._jobs.empty():
                    fast_rate.close()
                    fast = False

    def _run_job(self, index: int, job: _Job) -> None:
        with self._shared():
            self._inflight[index] = job
            self._last_activity_mono = time.monotonic()
            try:
                final = self._execute(job, self._workers[index])
            except Exception as exc:  # the executor must survive anything a request causes
                logger.exception("request %s failed unexpectedly", job.request.id)
                final = self._send_error(job.reply, job.request.id, "backend_failed",
                                         f"internal error: {type(exc).__name__}")
            finally:
                self._inflight.pop(index, None)
                self._last_activity_mono = time.monotonic()
        # After the outbox commit (in _execute), never before: see IdempotencyCache.complete.
        if job.remember:
            waiters = self._idem.complete(job.request.id, final)
        else:
            waiters = self._idem.forget(job.request.id)
        for waiter in waiters:
            self._send(waiter, final, kind="result")

    def _fail(self, job: _Job, code: str, message: str,
              details: dict[str, Any] | None = None) -> bytes:
        if code not in RESULT_ERROR_CODES:
            # A backend's own code (``unknown_backend`` from the registry after a bad model
            # setting, a plugin's invention) is outside the result schema clients validate
            # against: send the contract's code, keep the backend's in the details.
            details = {**(details or {}), "backend_code": code}
            code = "backend_failed"
        self.counters.errors[code] += 1
        if details and details.get("retryable"):
            job.remember = False
        return self._send_error(job.reply, job.request.id, code, message, details)

    def _execute(self, job: _Job, worker: InferenceWorker) -> bytes:
        req = job.request
        if req.model is not None and req.model not in (self.config.model.name,
                                                       self.config.model.sha256):
            return self._fail(job, "unknown_model", f"this device serves "
                              f"{self.config.model.name!r}, not {req.model!r}",
                              {"available": [self.config.model.name]})
        if job.deadline_mono is not None and time.monotonic() >= job.deadline_mono:
            return self._fail(job, "deadline_exceeded", "the deadline passed while queued")
        gen = GenerationRequest(
            max_tokens=req.max_tokens, messages=req.messages, prompt=req.prompt,
            temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed,
            ignore_eos=req.ignore_eos, stop=req.stop,
        )
        props = reply_properties(job.reply.correlation)
        index = 0
        untold_tokens = 0  # tokens whose text has not gone out in a chunk yet

        def on_batch(events: list[TokenEvent]) -> None:
            # One chunk per worker message: the events of up to model.stream_batch_ms (the
            # first text alone, at once). The final event carries text too: what the stream
            # held back as a possible stop-string prefix or an incomplete UTF-8 character.
            # The chunks' deltas add up to the result's text, and their tokens to the tokens
            # that made it.
            nonlocal index, untold_tokens
            if self._cancel_inflight.is_set():
                raise BackendError("backend_failed", "the agent is shutting down",
                                   {"retryable": True})
            untold_tokens += sum(len(e.token_ids) for e in events)
            text = "".join(e.text for e in events)
            if req.stream and text:
                tokens, untold_tokens = untold_tokens, 0
                if self._link.is_connected():
                    try:
                        self._link.publish(job.reply.topic, self._encode(self._envelope(
                            CHUNK_SCHEMA, id=req.id, index=index, delta=text,
                            tokens=tokens,
                        )), qos=1, properties=props)
                    except PublishError:
                        self.counters.chunks_dropped_offline += 1
                else:  # live view only: the final result (outbox) carries the whole text
                    self.counters.chunks_dropped_offline += 1
                index += 1

        # Power samples on both sides of the execution window (a few sysfs reads each; the
        # sampler thread's ticks are at fast_interval_s meanwhile, see _execute_loop). At the
        # start only after idle (inside a fast stretch the last tick is recent enough) and
        # only from cheap sources: this one delays the first token. The end sample replaces
        # waiting for the sampler thread's next tick, so it is taken from every source.
        self._sampler.sample_power_now(max_age_s=self.config.fast_interval_s,
                                       max_cost_s=START_SAMPLE_MAX_COST_S)
        try:
            result = run_generation(worker, gen, accepted_ns=job.accepted_ns,
                                    deadline_mono=job.deadline_mono, on_batch=on_batch)
        except BackendError as exc:
            return self._fail(job, exc.code, exc.message, exc.details)
        energy = self._request_energy(result, closed=self._sampler.sample_power_now() is not None)
        t = result.timings
        for key in ("ttft_ms", "itl_ms", "e2e_ms"):
            self._hist[key].observe(getattr(t, key))
        if self.config.log_content:
            logger.info("result %s: %r", req.id, result.text)
        payload = self._encode(self._envelope(
            RESULT_SCHEMA, id=req.id, status="ok", text=result.text,
            finish_reason=result.finish_reason,
            usage={"prompt_tokens": result.prompt_tokens,
                   "completion_tokens": result.completion_tokens,
                   "total_tokens": (result.prompt_tokens or 0) + result.completion_tokens},
            timings={"queue_ms": t.queue_ms, "ttft_ms": t.ttft_ms,
                     "prefill_tok_s": t.prefill_tok_s, "decode_tok_s": t.decode_tok_s,
                     "itl_ms": t.itl_ms, "tpot_ms": t.tpot_ms, "e2e_ms": t.e2e_ms},
            energy=energy,
            served_by=self._served_by(), chunks=index, error=None,
        ))
        self._send(job.reply, payload, kind="result")
        self.counters.completed += 1
        return payload

    def _request_energy(self, result: GenerationResult, closed: bool) -> dict[str, Any]:
        """Energy of the execution window, split prefill/decode (DESIGN.md §5).

        Args:
            result: The generation, with its window's timestamps.
            closed: A power sample was taken after the window ended, so there is nothing to
                wait for. Otherwise (no source that can be sampled on demand, e.g. only the
                estimate probe) wait briefly for the sampler thread's next tick, and only
                when there is power to integrate.
        """
        t0 = result.started_ns / 1e9
        t1 = result.end_ns / 1e9
        latest = self._sampler.latest()
        settle = (3 * self.config.fast_interval_s
                  if not closed and latest is not None and latest.power else 0.0)
        total = self._energy.measure(t0, t1, tokens=result.completion_tokens or None,
                                     settle_timeout_s=settle)
        out = energy_fields(total)
        first = result.first_token_ns
        if first is not None:
            pre0 = (result.prefill_start_ns or result.started_ns) / 1e9
            out["prefill"] = _phase(self._energy.measure(pre0, first / 1e9))
            last = result.last_token_ns
            if last is not None and last > first:
                out["decode"] = _phase(self._energy.measure(
                    first / 1e9, last / 1e9, tokens=max(1, result.completion_tokens - 1)))
        return out

    # ------------------------------------------------------------------ telemetry

    def _telemetry(self, snap: Snapshot) -> dict[str, Any]:
        return self._envelope(
            TELEMETRY_SCHEMA,
            probes=snap.readings,
            power=[readings_as_dict(p) for p in snap.power],
            errors=snap.errors,
            queue_depth=self._jobs.qsize(),
            inflight=len(self._inflight),
            requests={"received": self.counters.received, "completed": self.counters.completed,
                      "errors": dict(self.counters.errors),
                      "dropped_unanswerable": self.counters.dropped_unanswerable,
                      "duplicates": self.counters.duplicates,
                      "rate_limited": self.counters.rate_limited,
                      "chunks_dropped_offline": self.counters.chunks_dropped_offline},
            worker={"pid": self._workers[0].pid,
                    "restarts": sum(w.restarts for w in self._workers)},
            outbox=self.outbox.stats().as_dict(),
            mqtt={"connected": self._link.is_connected(), "connects": self._link.connects,
                  "connect_failures": self._link.connect_failures,
                  "publish_denied": self._link.publish_denied},
            draining=self._draining.is_set(),
        )

    def _on_snapshot(self, snap: Snapshot) -> None:
        if snap.t_mono_s - self._last_telemetry_mono < self.config.telemetry_interval_s * 0.95:
            return  # the sampler runs faster inside inference windows; telemetry stays at 1 Hz
        self._last_telemetry_mono = snap.t_mono_s
        if not self.config.telemetry_via_outbox and not self._link.is_connected():
            if self._prometheus is not None:
                self._last_telemetry = self._telemetry(snap)
            return  # a live view; results are what must not be lost
        body = self._telemetry(snap)
        self._last_telemetry = body
        payload = self._encode(body)
        if self.config.telemetry_via_outbox:
            self.outbox.put(self.topics.telemetry, payload, kind="telemetry")
            return
        try:
            self._link.publish(self.topics.telemetry, payload, qos=0)
        except PublishError as exc:
            logger.debug("telemetry not published: %s", exc)

    # ------------------------------------------------------------------ Prometheus

    def render_metrics(self) -> str:
        """The Prometheus exposition text: telemetry gauges and latency histograms."""
        tele = self._last_telemetry or {}
        samples = list(flatten_numeric("edgelm", tele.get("probes", {})))
        for key in ("requests", "outbox", "mqtt", "worker"):
            samples += flatten_numeric(f"edgelm_{key}", tele.get(key, {}))
        samples += flatten_numeric("edgelm_power_mw",
                                   [{"source": p.get("source"), "v": p.get("power_mw")}
                                    for p in tele.get("power", [])])
        samples += [("edgelm_queue_depth", {}, float(self._jobs.qsize())),
                    ("edgelm_inflight", {}, float(len(self._inflight))),
                    ("edgelm_up", {}, 1.0)]
        lines = render_gauges((n.removesuffix("_v"), lab, v) for n, lab, v in samples)
        for hist in self._hist.values():
            lines += hist.render()
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ lifecycle

    def _set_worker_pids(self) -> None:
        if self._process_probe is None:
            return
        for i, w in enumerate(self._workers):
            self._process_probe.set_pid("worker" if i == 0 else f"worker{i + 1}", w.pid)

    def start(self) -> None:
        """Load the model(s), start sampling, the outbox and MQTT. Returns once loaded.

        A model that fails to load is reported in ``status`` and retried on the next request;
        it does not stop the daemon.
        """
        for w in self._workers:
            try:
                w.start()
            except BackendError as exc:
                logger.error("model failed to load: %s: %s", exc.code, exc.message)
        self._set_worker_pids()
        self._sampler.add_listener(self._on_snapshot)
        self._sampler.start()
        for t in self._executors:
            t.start()
        self._drainer.start()
        if self._prometheus is not None:
            self._prometheus.start()
        self._link.start()

    def request_stop(self) -> None:
        """Ask the daemon to shut down (signal-safe: sets an event only)."""
        self._stop.set()

    def _tick(self) -> None:
        """One pass of the supervision loop (main thread)."""
        self._set_worker_pids()
        key = self._health_fingerprint()
        if self._health_key is not None and key != self._health_key:
            logger.info("health changed; re-publishing status")
            self.publish_status(reason="health_changed")
        if self._link.is_connected():
            self._health_key = key
        now = time.monotonic()
        idle_for = now - self._last_activity_mono
        due = (self._last_baseline_mono is None
               or now - self._last_baseline_mono >= self.config.baseline_every_s)
        busy = self._inflight or self._exclusive_active  # a bench is not idle either
        if not busy and idle_for >= self.config.baseline_window_s and due:
            self._last_baseline_mono = now
            self._energy.measure_baseline(now - self.config.baseline_window_s, now)

    def run_forever(self, reload_pending: Callable[[], bool] | None = None,
                    stop_pending: Callable[[], bool] | None = None) -> int:
        """Run until SIGTERM/SIGINT; return the process exit code (0 on a clean stop).

        SIGHUP reloads the configuration (see :meth:`_do_reload`), on a command thread started
        from this loop: the handler itself only sets an event.

        Args:
            reload_pending: Whether a SIGHUP came before this method took the signal over
                (the CLI catches it from its start); read once the handler is installed, so
                none is lost in between.
            stop_pending: The same for SIGTERM/SIGINT: a stop asked for while the agent was
                still starting ends it here, cleanly (exit 0), before anything is started.
        """
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.request_stop())
        signal.signal(signal.SIGHUP, lambda *_: self._request_reload())
        if stop_pending is not None and stop_pending():
            logger.info("stop requested during start-up; nothing was started")
            self.outbox.close()
            self._results.close()
            return 0
        if reload_pending is not None and reload_pending():
            logger.info("SIGHUP during start-up: reloading once started")
            self._request_reload()
        self.start()
        notify("READY=1\nSTATUS=serving " + self.config.model.name)
        failures = self._link.connect_failures
        logger.info("ready: %s/%s serving %s on %s (%d thread(s)); broker %s:%d%s",
                    self.config.fleet, self.config.device, self.config.model.name,
                    self.config.backend, self.config.threads, self.config.broker.host,
                    self.config.broker.port, "" if self._link.is_connected()
                    else f" (not connected: {failures} attempt(s) failed, retrying)" if failures
                    else " (connecting)")
        tick_s = min(0.5, watchdog_interval_s() or 0.5)
        while not self._stop.wait(tick_s):
            # Fed from the main loop, not a side thread: a hung loop stops the pings.
            notify("WATCHDOG=1")
            if self._reload_requested.is_set():
                self._start_signal_reload()
            try:
                self._tick()
            except Exception:
                logger.exception("supervision tick failed")
        notify("STOPPING=1")
        self.shutdown()
        return 0

    def shutdown(self) -> None:
        """Stop within a few seconds: finish or cancel in-flight work, flush, publish offline."""
        self._stop.set()
        self._draining.set()
        deadline = time.monotonic() + self.config.shutdown_grace_s
        while self._inflight and time.monotonic() < deadline:
            time.sleep(0.02)
        self._cancel_inflight.set()
        # Queued requests are answered, not dropped: the client can retry elsewhere.
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if isinstance(job, _BenchJob):
                job.error = RuntimeError("the agent is shutting down")
                job.done.set()
            elif job is not None:
                self._refuse(job.request.id, job.reply, "the agent is shutting down",
                             {"retryable": True, "reason": "shutting_down"})
        for _ in self._executors:
            self._jobs.put(None)
        for t in self._executors:
            t.join(timeout=1.5 / len(self._executors))
        # Give the outbox a moment to flush; what remains is sent after the next start.
        flush_end = time.monotonic() + 1.0
        while (self._link.is_connected() and self.outbox.stats().depth
               and time.monotonic() < flush_end):
            time.sleep(0.02)
        self._drainer.stop(timeout_s=0.5)
        pending = []
        try:
            pending.append(self._link.publish(
                self.topics.status, self._status_payload("offline", reason="shutdown"),
                qos=1, retain=True))
        except PublishError:
            logger.warning("could not publish the offline status; the broker's LWT will")
        self._link.stop(timeout_s=1.0, pending=pending)
        if self._prometheus is not None:
            self._prometheus.stop()
        self._sampler.stop()
        for w in self._workers:
            w.stop(timeout_s=1.0 / len(self._workers))
        self.outbox.close()
        self._results.close()
        logger.info("stopped")


def _worker_config(config: DaemonConfig, base: WorkerConfig | None = None) -> WorkerConfig:
    """The worker's configuration for ``config``'s model (keeping ``base``'s supervision)."""
    spec = ModelSpec(config.model.name, config.model.path, config.model.format,
                     config.model.sha256)
    options = BackendOptions(threads=config.threads, context_tokens=config.context_tokens)
    if base is None:
        base = WorkerConfig(backend=config.backend, model=spec, options=options)
    return dataclasses.replace(base, backend=config.backend, model=spec, options=options,
                               stream_batch_s=config.stream_batch_ms / 1000.0,
                               nice_increment=config.worker_nice)


def energy_fields(res: EnergyResult) -> dict[str, Any]:
    """The ``energy`` object of a final result: labelled values, None (with a reason) if unknown.

    Field names carry units (mJ, mW, s). ``source`` joins the summed sources with ``+``.
    """
    return {
        "gross_mj": res.gross_energy_mj,
        "net_mj": res.net_energy_mj,
        "mj_per_token": res.gross_mj_per_token,
        "net_mj_per_token": res.net_mj_per_token,
        "tokens_per_j": res.gross_tokens_per_j,
        "mean_power_mw": res.mean_power_mw,
        "baseline_power_mw": res.baseline_power_mw,
        "source": "+".join(res.sources) if res.sources else None,
        "method": res.method,
        "estimated": res.estimated,
        "coverage": res.coverage,
        "sample_interval_s": res.sample_interval_s,
        "window_s": res.duration_s,
        "tokens": res.tokens,
        "reason": res.reason or None,
    }


def _phase(res: EnergyResult) -> dict[str, Any]:
    return {"gross_mj": res.gross_energy_mj, "net_mj": res.net_energy_mj,
            "mj_per_token": res.gross_mj_per_token, "coverage": res.coverage,
            "window_s": res.duration_s, "reason": res.reason or None}


def _avail_dict(avail: Any) -> dict[str, Any]:
    out = {"ok": bool(avail.ok), "reason": str(avail.reason or "")}
    if hasattr(avail, "degraded"):
        out["degraded"] = bool(avail.degraded)
    return out


def open_sequence(path: Path) -> SequenceCounter:
    """The device's message counter (see :mod:`agent.sequence` for how it never repeats)."""
    return SequenceCounter(path)


def default_state_dir() -> Path:
    """``$STATE_DIRECTORY`` (systemd), else /var/lib/edgelm if writable, else ~/.local/state."""
    env = os.environ.get("STATE_DIRECTORY")
    if env:
        return Path(env.split(":")[0])
    system = Path("/var/lib/edgelm")
    if os.access(system if system.exists() else system.parent, os.W_OK):
        return system
    return Path.home() / ".local/state/edgelm"
