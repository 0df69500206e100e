"""Worker isolation on the real model: a SIGKILLed or hung worker becomes an error result for
the in-flight request, is restarted with backoff, and the next request succeeds."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.generation import run_generation
from agent.worker import InferenceWorker, WorkerConfig
from backends.base import BackendError, BackendOptions, GenerationRequest, ModelSpec
from tests.integration.backend_contract import BENCH_MESSAGES

pytestmark = pytest.mark.model

LONG = GenerationRequest(messages=BENCH_MESSAGES, max_tokens=1000, ignore_eos=True)
SHORT = GenerationRequest(messages=BENCH_MESSAGES, max_tokens=8, ignore_eos=True)


def _worker(model_path: Path, cancel_grace_s: float = 2.0) -> InferenceWorker:
    return InferenceWorker(WorkerConfig(
        backend="llamacpp",
        model=ModelSpec("smollm2-135m", model_path, "gguf"),
        options=BackendOptions(threads=2, context_tokens=1200),
        backoff_initial_s=0.2, backoff_max_s=2.0, cancel_grace_s=cancel_grace_s,
    ))


@pytest.fixture
def worker(model_path: Path) -> Iterator[InferenceWorker]:
    w = _worker(model_path)
    w.start()
    yield w
    w.stop()


def test_sigkill_mid_generation_fails_that_request_and_restarts(worker: InferenceWorker) -> None:
    first_pid = worker.pid
    seen = 0
    with pytest.raises(BackendError) as err:
        for event in worker.generate(LONG):
            if event.token_ids:
                seen += 1
            if seen == 3:
                worker.kill_for_test()
    assert err.value.code == "backend_failed"
    assert "SIGKILL" in err.value.message
    assert not worker.alive()
    assert worker.last_failure is not None and "SIGKILL" in worker.last_failure
    # backoff: the restart is scheduled, and the delay doubled for the next crash
    assert worker._backoff_s == pytest.approx(0.4)
    result = run_generation(worker, SHORT)
    assert result.completion_tokens == 8 and result.finish_reason == "length"
    assert worker.restarts == 1
    assert worker.pid is not None and worker.pid != first_pid
    assert worker._backoff_s == pytest.approx(0.2)  # reset after a good request


def test_repeated_crashes_back_off_exponentially(worker: InferenceWorker) -> None:
    for expected in (0.4, 0.8, 1.6, 2.0):
        with pytest.raises(BackendError):
            for event in worker.generate(LONG):
                if event.token_ids:
                    worker.kill_for_test()
        assert worker._backoff_s == pytest.approx(expected)
    assert run_generation(worker, SHORT).completion_tokens == 8


def test_hang_past_deadline_is_deadline_exceeded_and_worker_replaced(
    worker: InferenceWorker,
) -> None:
    pid = worker.pid
    assert pid is not None
    # A hang in native code: the worker neither produces events nor reads the cancel.
    os.kill(pid, signal.SIGSTOP)
    with pytest.raises(BackendError) as err:
        for _event in worker.generate(LONG, deadline_mono=time.monotonic() + 1.0):
            pass
    assert err.value.code == "deadline_exceeded"
    assert not worker.alive()  # it ignored the cancel, so it was killed
    assert worker.last_failure == "worker did not stop after cancel"
    result = run_generation(worker, SHORT)
    assert result.completion_tokens == 8
    assert worker.pid != pid


def test_deadline_on_a_streaming_worker_cancels_without_a_restart(model_path: Path) -> None:
    """Tokens keep flowing past the deadline: it must still fire, and a healthy worker stops
    at the cancel (a generous grace, so a loaded CI machine's slow prefill cannot matter)."""
    worker = _worker(model_path, cancel_grace_s=120.0)
    try:
        worker.start()
        pid = worker.pid
        seen = 0
        with pytest.raises(BackendError) as err:
            for _event in worker.generate(LONG, deadline_mono=time.monotonic() + 0.5):
                seen += 1
                if seen == 1:
                    time.sleep(0.6)  # the deadline passes while tokens are queued
        assert err.value.code == "deadline_exceeded"
        assert seen < LONG.max_tokens
        assert worker.alive() and worker.pid == pid  # the cancel was honoured
        assert run_generation(worker, SHORT).completion_tokens == 8
        assert worker.restarts == 0
    finally:
        worker.stop()


def test_events_are_batched_but_the_first_token_is_never_held(
    model_path: Path, worker: InferenceWorker
) -> None:
    """With a batch interval longer than the generation, the first token still reaches the
    parent while the engine is decoding, the rest travel with the final event (one wake-up
    of the parent instead of one per token), and nothing is lost or reordered."""
    request = GenerationRequest(messages=BENCH_MESSAGES, max_tokens=200, ignore_eos=True)
    batched = InferenceWorker(dataclasses.replace(
        _worker(model_path).config, stream_batch_s=3600.0))
    try:
        batched.start()
        received = [(time.monotonic_ns(), event) for event in batched.generate(request)]
    finally:
        batched.stop()
    tokens = [(at, e) for at, e in received if e.token_ids]
    assert len(tokens) == 200 and received[-1][1].final
    last_token_ns = tokens[-1][1].t_ns
    assert tokens[0][0] < last_token_ns  # delivered before the engine made token 200
    assert all(at >= last_token_ns for at, _ in tokens[1:])  # held for the final flush
    assert [e.t_ns for _, e in tokens] == sorted(e.t_ns for _, e in tokens)
    # the default (50 ms batches) streams the same greedy text
    assert "".join(e.text for _, e in received) == run_generation(worker, request).text
