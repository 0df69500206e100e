"""The inference worker: the loaded model lives in its own process.

Native inference code can segfault, be OOM-killed or hang. Keeping it in a child process
means the agent's MQTT connection, telemetry and offline status survive: the failure becomes
a ``backend_failed`` (or ``deadline_exceeded``) result for the in-flight request, and the
worker is started again with exponential backoff.

Wire between the processes (a ``multiprocessing`` pipe, pickled tuples):

- child → parent: ``("ready", info)`` | ``("load_failed", code, message)`` |
  ``("events", rid, [TokenEvent, ...])`` | ``("error", rid, code, message, details)`` |
  ``("done", rid)``
- parent → child: ``("generate", rid, GenerationRequest)`` | ``("cancel", rid)`` | ``("stop",)``

Timestamps in events are ``time.monotonic_ns()``, valid across the two processes, taken by the
engine loop; so batching events on the wire changes no metric.

Why events travel in batches: a message per token costs far more than its bytes. On the
project's 2-core VM each send woke the blocked parent (poll → recv → unpickle), about 0.1 ms
of parent CPU per wake-up measured with a fake engine, while the engine's two threads keep
both cores busy; every wake-up preempts an engine thread, and a preempted thread stalls its
partner at the next barrier. So the first token of a stream goes out at once (the wire adds
nothing to TTFT; until some text has gone out, every event does), later ones are sent when
``stream_batch_s`` has passed since the last send, and the final event flushes. A slow engine
(one token per interval or slower) still sends every token as it comes; a fast one sends a
few tokens per message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import select
import signal
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from backends.base import (
    Backend,
    BackendError,
    BackendOptions,
    GenerationRequest,
    ModelSpec,
    TokenEvent,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    """What the worker loads and how it is supervised.

    Attributes:
        backend: Registered backend name (``llamacpp`` …).
        model: The model to load.
        options: Backend load options (threads already resolved).
        load_timeout_s: Longest wait for the model to load.
        token_timeout_s: Longest silence between two events before the worker is declared
            hung and killed (a stuck native call cannot be interrupted otherwise).
        backoff_initial_s: First restart delay after a crash; doubles up to ``backoff_max_s``.
        backoff_max_s: Cap on the restart delay.
        cancel_grace_s: How long a cancelled generation may take to stop (the worker reads
            the cancel between tokens, so a long native call such as prefill delays it)
            before the worker is killed.
        nice_increment: Added to the worker process's nice value at start-up (0, the
            default: the agent's priority). A lower engine priority lets the agent's MQTT
            and executor threads preempt the engine's threads, which fill every core while
            they decode. Off by default because it did not pay on the shared 2-core VM
            (benchmarks/daemon.py: two agents side by side, requests alternating, 2 engine
            threads, load 3-8, four runs, either agent started first): +10 raised TTFT
            1.5-3.4x in every run, the added latency moved within noise (p50 8.6 vs 4.6,
            6.7 vs 6.4, 4.7 vs 5.5, 2.1 vs 1.7 ms) and decode tok/s with the agent idle
            swung both ways (0.45x to 1.8x). A niced engine thread loses its core to any
            other runnable thread and its partner then waits at the next barrier. Worth
            measuring on a dedicated board, where the agent is the engine's only rival.
        stream_batch_s: Shortest gap between two event messages of one generation (the
            first token and the final event are never held back); 0 sends one message per
            event. See the module docstring for why.
    """

    backend: str
    model: ModelSpec
    options: BackendOptions
    load_timeout_s: float = 300.0
    token_timeout_s: float = 60.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    cancel_grace_s: float = 2.0
    nice_increment: int = 0
    stream_batch_s: float = 0.05


def _child_main(conn: multiprocessing.connection.Connection, config: WorkerConfig) -> None:
    """Worker process body: load, then serve generate requests one at a time."""
    # The parent owns signal handling; a terminal Ctrl-C must not kill the worker mid-token.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if config.nice_increment > 0:
        # Before the engine starts its threads, which inherit it (Linux nice is per thread).
        try:
            os.nice(config.nice_increment)
        except OSError as exc:  # lowering one's own priority needs no privilege; be safe
            logger.warning("worker priority unchanged: %s", exc)
    from backends.registry import create_backend

    try:
        backend = create_backend(config.backend)
        backend.load(config.model, config.options)
        info = backend.info()
    except BackendError as exc:
        conn.send(("load_failed", exc.code, exc.message))
        return
    except Exception as exc:
        conn.send(("load_failed", "backend_failed", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", info))
    inbox = select.poll()
    inbox.register(conn.fileno(), select.POLLIN)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break
        if msg[0] == "stop":
            break
        if msg[0] != "generate":
            continue  # a late "cancel" for a request that already finished
        if _serve_generation(conn, inbox, backend, msg[1], msg[2], config.stream_batch_s):
            break  # "stop" arrived mid-generation
    backend.close()


def _serve_generation(
    conn: multiprocessing.connection.Connection,
    inbox: select.poll,
    backend: Backend,
    rid: int,
    request: GenerationRequest,
    batch_s: float,
) -> bool:
    """Stream one generation's events to the parent in batches; True if told to stop.

    ``inbox`` polls the pipe for a cancel between tokens: one ``poll(2)`` call, where
    ``Connection.poll`` would build and tear down a selector per token.
    """
    batch_ns = int(batch_s * 1e9)
    pending: list[TokenEvent] = []
    last_send_ns = 0
    text_sent = False  # until the first text goes out, every event does at once
    try:
        for event in backend.generate(request):
            pending.append(event)
            now = time.monotonic_ns()
            # A first token may carry no text yet (half of a UTF-8 character): the first
            # visible chunk, which a client sees as TTFT, is never held back either.
            if event.final or not text_sent or now - last_send_ns >= batch_ns:
                conn.send(("events", rid, pending))
                text_sent = text_sent or any(e.text for e in pending)
                pending, last_send_ns = [], now
            if inbox.poll(0):
                peek = conn.recv()
                if peek[0] == "cancel" and peek[1] == rid:
                    break  # the parent discards events after a cancel: drop the batch
                if peek[0] == "stop":
                    return True
        else:
            if pending:  # a backend whose stream ended without a final event
                conn.send(("events", rid, pending))
        conn.send(("done", rid))
    except BackendError as exc:
        _flush(conn, rid, pending)
        conn.send(("error", rid, exc.code, exc.message, exc.details))
    except Exception as exc:
        _flush(conn, rid, pending)
        conn.send(("error", rid, "backend_failed", f"{type(exc).__name__}: {exc}", {}))
    return False


def _flush(
    conn: multiprocessing.connection.Connection, rid: int, pending: list[TokenEvent]
) -> None:
    """Deliver the events produced before a failure, so the consumer sees them first."""
    if pending:
        conn.send(("events", rid, pending))


def _config_for_backend(config: WorkerConfig) -> WorkerConfig:
    """Swap a known model's GGUF for the prepared format the backend loads.

    ``bench --model smollm2-135m --backend onnxruntime`` resolves the name to the bundled
    GGUF; the ONNX and LiteRT backends need the build ``agentctl models prepare`` put in the
    model cache. A missing build becomes ``unknown_model`` with the command that makes it.
    """
    from backends.registry import backend_classes

    cls = backend_classes()[0].get(config.backend)
    if cls is None or config.model.format in cls.formats:
        return config
    from agent.errors import ModelError
    from agent.model_cache import BACKEND_FORMAT, resolve_for_backend
    from agent.models import KNOWN_MODELS

    if config.model.name not in KNOWN_MODELS or config.backend not in BACKEND_FORMAT:
        return config
    try:
        resolved = resolve_for_backend(config.model.name, config.backend, verify=False)
    except ModelError as exc:
        raise BackendError("unknown_model", str(exc)) from None
    model = ModelSpec(resolved.name, resolved.path, resolved.format, resolved.sha256 or None)
    logger.info("backend %s loads %s from %s", config.backend, resolved.format, resolved.path)
    return dataclasses.replace(config, model=model)


class InferenceWorker:
    """Supervises one worker process holding one loaded model.

    ``generate`` may be called from any thread; calls are serialized (one generation per
    loaded model at a time, which is also what the hardware can do efficiently).
    """

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self._ctx = multiprocessing.get_context("spawn")
        self._proc: Any = None
        self._conn: multiprocessing.connection.Connection | None = None
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._info: dict[str, Any] = {}
        self._backoff_s = config.backoff_initial_s
        self._next_start_mono = 0.0
        self.restarts = 0
        self._started_once = False
        self.last_failure: str | None = None
        self.load_ms: float | None = None

    @property
    def pid(self) -> int | None:
        """The worker's process id while it runs."""
        proc = self._proc
        return int(proc.pid) if proc is not None and proc.is_alive() else None

    @property
    def info(self) -> dict[str, Any]:
        """The backend's ``info()`` from the last successful load."""
        return dict(self._info)

    def alive(self) -> bool:
        """True while the worker process runs."""
        return self._proc is not None and self._proc.is_alive()

    def start(self) -> dict[str, Any]:
        """Start the worker and wait until the model is loaded.

        Raises:
            BackendError: The model failed to load, or the worker died while loading.
        """
        with self._lock:
            if self.alive():
                return self.info
            self.config = _config_for_backend(self.config)
            delay = self._next_start_mono - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            parent, child = self._ctx.Pipe(duplex=True)
            proc = self._ctx.Process(
                target=_child_main, args=(child, self.config), name="edgelm-worker", daemon=True
            )
            t0 = time.monotonic()
            proc.start()
            child.close()
            self._proc, self._conn = proc, parent
            try:
                if not parent.poll(self.config.load_timeout_s):
                    self._kill()
                    raise BackendError("backend_failed", "model load timed out")
                msg = parent.recv()
            except (EOFError, OSError):
                code = proc.exitcode
                self._reap()
                self._schedule_restart(f"worker died while loading (exit {code})")
                raise BackendError(
                    "backend_failed", f"worker died while loading the model (exit {code})"
                ) from None
            if msg[0] == "load_failed":
                self._reap()
                raise BackendError(msg[1], msg[2])
            self._started_once = True
            self._info = dict(msg[1])
            self.load_ms = (time.monotonic() - t0) * 1000.0
            self._info["worker_start_ms"] = self.load_ms
            logger.info("worker pid %d ready in %.0f ms", proc.pid, self.load_ms)
            return self.info

    def _schedule_restart(self, reason: str) -> None:
        self.last_failure = reason
        self._next_start_mono = time.monotonic() + self._backoff_s
        self._backoff_s = min(self._backoff_s * 2, self.config.backoff_max_s)

    def _reap(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._proc is not None:
            self._proc.join(timeout=1)
        self._proc, self._conn = None, None

    def _kill(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
        self._reap()

    def generate(
        self, request: GenerationRequest, deadline_mono: float | None = None
    ) -> Generator[TokenEvent, None, None]:
        """Run one generation in the worker and stream its events one by one.

        See :meth:`generate_batches` (same arguments and errors).
        """
        with contextlib.closing(self.generate_batches(request, deadline_mono)) as batches:
            for batch in batches:
                yield from batch

    def generate_batches(
        self, request: GenerationRequest, deadline_mono: float | None = None
    ) -> Generator[list[TokenEvent], None, None]:
        """Run one generation in the worker and stream its events as the worker sent them.

        One batch is one pipe message: the events of at most ``stream_batch_s`` (the first
        event, the events before any text and the final one travel alone or close a batch),
        so a consumer can forward a batch as one message downstream.

        Args:
            request: The generation.
            deadline_mono: ``time.monotonic()`` value after which the generation is cancelled
                and :class:`BackendError` ``deadline_exceeded`` raised.

        Raises:
            BackendError: ``backend_failed`` if the worker crashed or hung (it is restarted
                for the next request), ``deadline_exceeded``, or the backend's own errors.
        """
        with self._lock:
            if not self.alive():
                if self._proc is not None:  # it died between requests
                    self._reap()
                    self._schedule_restart("worker died while idle")
                if self._started_once:
                    self.restarts += 1
                self.start()
            assert self._conn is not None
            conn = self._conn
            rid = next(self._ids)
            conn.send(("generate", rid, request))
            finished = False
            try:
                while True:
                    if deadline_mono is not None and time.monotonic() >= deadline_mono:
                        # Checked on every message too: a worker that keeps streaming
                        # tokens never lets poll() time out, so the deadline would be
                        # missed until the generation ended.
                        self._cancel_or_kill(rid)
                        finished = True
                        raise BackendError("deadline_exceeded", "the request deadline passed")
                    timeout = self.config.token_timeout_s
                    if deadline_mono is not None:
                        timeout = min(timeout, max(0.0, deadline_mono - time.monotonic()))
                    if not conn.poll(timeout):
                        if deadline_mono is not None and time.monotonic() >= deadline_mono:
                            self._cancel_or_kill(rid)
                            finished = True
                            raise BackendError("deadline_exceeded", "the request deadline passed")
                        self._kill()
                        self._schedule_restart("worker hung")
                        finished = True
                        raise BackendError(
                            "backend_failed",
                            f"worker produced nothing for {self.config.token_timeout_s:.0f} s "
                            "and was killed",
                        )
                    try:
                        msg = conn.recv()
                    except (EOFError, OSError):
                        finished = True
                        self._on_crash()
                    if msg[0] == "events" and msg[1] == rid:
                        yield list(msg[2])
                    elif msg[0] == "done" and msg[1] == rid:
                        finished = True
                        self._backoff_s = self.config.backoff_initial_s
                        return
                    elif msg[0] == "error" and msg[1] == rid:
                        finished = True
                        raise BackendError(msg[2], msg[3], msg[4])
            finally:
                if not finished and self.alive():
                    # The consumer stopped early (client gone, stop string, shutdown).
                    self._cancel_or_kill(rid)

    def _on_crash(self) -> None:
        proc = self._proc
        code = proc.exitcode if proc is not None else None
        if proc is not None:
            proc.join(timeout=1)
            code = proc.exitcode
        self._reap()
        if code is not None and code < 0:
            try:
                why = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                why = f"killed by signal {-code}"
        else:
            why = f"exited with code {code}"
        self._schedule_restart(f"worker {why}")
        logger.error("inference worker %s during a generation; it will be restarted", why)
        raise BackendError("backend_failed", f"the inference worker {why}")

    def _cancel_or_kill(self, rid: int) -> None:
        """Ask the worker to stop generating ``rid``; kill it if it does not within grace."""
        grace_s = self.config.cancel_grace_s
        conn = self._conn
        if conn is None:
            return
        try:
            conn.send(("cancel", rid))
            end = time.monotonic() + grace_s
            while time.monotonic() < end:
                if not conn.poll(max(0.0, end - time.monotonic())):
                    break
                msg = conn.recv()
                if msg[0] in ("done", "error") and msg[1] == rid:
                    return
        except (EOFError, OSError):
            pass
        self._kill()
        self._schedule_restart("worker did not stop after cancel")

    def stop(self, timeout_s: float = 3.0) -> None:
        """Stop the worker: polite ``stop`` first, SIGKILL after ``timeout_s``."""
        with self._lock:
            proc, conn = self._proc, self._conn
            if proc is None:
                return
            try:
                if conn is not None:
                    conn.send(("stop",))
            except (OSError, ValueError):
                pass
            proc.join(timeout=timeout_s)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=1)
            self._reap()

    def kill_for_test(self) -> None:
        """SIGKILL the worker (used by fault-injection tests and ``cmd/reload``)."""
        pid = self.pid
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
