"""On-device benchmark: the same generation path the daemon serves, measured per DESIGN.md §5.

A bench runs ``warmup`` generations (the first is reported separately as the cold request),
then ``runs`` measured ones, all in the supervised worker process, and produces one
``edgelm.bench/1`` record: per-run metrics, summary statistics with raw samples, the worker's
peak RSS and CPU use, and full provenance. Field names follow llama-bench where they overlap
(``n_prompt``, ``n_gen``, ``n_threads``, ``model_type`` …) so existing tooling can read them.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import agent
from agent.generation import GenerationResult, run_generation
from agent.identity import hardware_identity
from agent.metrics import summarize
from agent.models import ResolvedModel
from agent.worker import InferenceWorker, WorkerConfig
from backends.base import BackendOptions, GenerationRequest, ModelSpec
from probes.process import ProcessProbe

logger = logging.getLogger(__name__)

BENCH_SCHEMA = "edgelm.bench/1"

DEFAULT_MESSAGES: tuple[dict[str, str], ...] = (
    {"role": "system", "content": "You are a concise assistant."},
    {
        "role": "user",
        "content": "Explain in a few sentences what an edge AI agent running on a Raspberry Pi "
        "does and why it reports telemetry.",
    },
)

SUMMARY_METRICS = (
    "ttft_ms",
    "prefill_tok_s",
    "decode_tok_s",
    "itl_ms",
    "tpot_ms",
    "e2e_ms",
    "completion_tokens",
    "cpu_pct",
)


@dataclass(frozen=True)
class BenchConfig:
    """What to benchmark.

    Attributes:
        backend: Registered backend name.
        model: The resolved model.
        threads: Engine threads (positive; ``auto`` already resolved).
        threads_how: How ``threads`` was chosen, for provenance.
        max_tokens: Tokens to generate per run.
        ignore_eos: Generate exactly ``max_tokens`` (EOS tokens are banned).
        runs: Measured repetitions.
        warmup: Unmeasured repetitions before them (the first is the cold request).
        messages: The chat prompt.
        context_tokens: Context window to allocate.
    """

    backend: str
    model: ResolvedModel
    threads: int
    threads_how: str = "configured"
    max_tokens: int = 64
    ignore_eos: bool = False
    runs: int = 3
    warmup: int = 1
    messages: tuple[dict[str, str], ...] = DEFAULT_MESSAGES
    context_tokens: int = 2048


def _run_record(result: GenerationResult, cpu_pct: float | None) -> dict[str, Any]:
    t = result.timings
    return {
        "ttft_ms": t.ttft_ms,
        "prefill_tok_s": t.prefill_tok_s,
        "decode_tok_s": t.decode_tok_s,
        "itl_ms": t.itl_ms,
        "tpot_ms": t.tpot_ms,
        "e2e_ms": t.e2e_ms,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "finish_reason": result.finish_reason,
        "cpu_pct": cpu_pct,
        "engine": result.engine,
        "text": result.text,
    }


def _summary_entry(values: Sequence[float | None]) -> dict[str, Any] | None:
    s = summarize(values)
    return None if s is None else {**dataclasses.asdict(s), "samples": list(s.samples)}


def run_bench(
    config: BenchConfig,
    progress: Callable[[str, int, int], None] | None = None,
    proc_root: str = "/",
) -> dict[str, Any]:
    """Run the benchmark and return an ``edgelm.bench/1`` record.

    Args:
        config: What to run.
        progress: Called as ``progress(phase, done, total)`` with phase ``load``, ``warmup``
            or ``run``.
        proc_root: Root for /proc reads of the worker's CPU and memory.

    Raises:
        backends.base.BackendError: The model could not be loaded or a generation failed.
    """
    if config.runs < 1:
        raise ValueError("runs must be at least 1")
    if config.warmup < 0:
        raise ValueError("warmup must be zero or more")
    worker = InferenceWorker(
        WorkerConfig(
            backend=config.backend,
            model=ModelSpec(
                config.model.name, config.model.path, config.model.format, config.model.sha256
            ),
            options=BackendOptions(threads=config.threads, context_tokens=config.context_tokens),
        )
    )
    request = GenerationRequest(
        messages=config.messages, max_tokens=config.max_tokens, ignore_eos=config.ignore_eos
    )
    started_unix_ms = int(time.time() * 1000)
    if progress:
        progress("load", 0, 1)
    try:
        info = worker.start()
        if progress:
            progress("load", 1, 1)
        procs = ProcessProbe(root=proc_root, pids={"worker": worker.pid})
        procs.sample()
        cold: dict[str, Any] | None = None
        for i in range(config.warmup):
            result = run_generation(worker, request)
            reading = procs.sample().processes["worker"]
            if i == 0:
                cold = _run_record(result, reading.cpu_pct)
            if progress:
                progress("warmup", i + 1, config.warmup)
        runs: list[dict[str, Any]] = []
        for i in range(config.runs):
            procs.sample()
            result = run_generation(worker, request)
            reading = procs.sample().processes["worker"]
            runs.append(_run_record(result, reading.cpu_pct))
            if progress:
                progress("run", i + 1, config.runs)
        final = procs.sample().processes["worker"]
        peak_rss = final.peak_rss_bytes
    finally:
        worker.stop()
    summary = {m: _summary_entry([r[m] for r in runs]) for m in SUMMARY_METRICS}
    return {
        "schema": BENCH_SCHEMA,
        "ts_unix_ms": started_unix_ms,
        "backend": config.backend,
        "model": {
            "name": config.model.name,
            "path": str(config.model.path),
            "sha256": config.model.sha256,
            "format": config.model.format,
            "size_bytes": config.model.size_bytes,
            "quantization": info.get("quantization"),
        },
        "config": {
            "max_tokens": config.max_tokens,
            "ignore_eos": config.ignore_eos,
            "runs": config.runs,
            "warmup": config.warmup,
            "n_threads": config.threads,
            "context_tokens": config.context_tokens,
            "messages": [dict(m) for m in config.messages],
        },
        # llama-bench compatible names
        "n_prompt": runs[0]["prompt_tokens"],
        "n_gen": config.max_tokens,
        "n_threads": config.threads,
        "model_type": info.get("quantization"),
        "model_size": config.model.size_bytes,
        "load_ms": info.get("load_ms"),
        "worker_start_ms": info.get("worker_start_ms"),
        "cold": cold,
        "runs": runs,
        "summary": summary,
        "peak_rss_bytes": peak_rss,
        "provenance": {
            "agent_version": agent.__version__,
            "backend": config.backend,
            "engine": info.get("engine"),
            "engine_version": info.get("engine_version"),
            "build_flags": info.get("build_flags"),
            "model_sha256": config.model.sha256,
            "threads": config.threads,
            "threads_how": config.threads_how,
            "hardware": hardware_identity(),
            "python_implementation": platform.python_implementation(),
        },
    }
