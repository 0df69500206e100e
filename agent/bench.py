"""On-device benchmark: the same generation path the daemon serves, measured per DESIGN.md §5.

A bench loads the model in the supervised worker process, runs ``warmup`` generations (the
first is reported separately as the cold request), then ``runs`` measured ones, and optionally
a quality task (GSM8K Pass@1). It produces one ``edgelm.bench/1`` record: per-run metrics,
summary statistics with raw samples, energy per run and per phase from the probes (or ``null``
with the reason), the device's thermal/clock/throttle state before and after every run, the
paper's Q/R/U/CPR/PCR (arXiv 2505.16508), the worker's peak RSS and CPU, and provenance.

Field names follow llama-bench where they overlap (``n_prompt``, ``n_gen``, ``n_threads``,
``model_type``, ``model_size``, ``avg_ts``/``stddev_ts``) so existing tooling reads them.

Method notes:
- Runs during which throttling was flagged (Raspberry Pi ``get_throttled`` bits set now, or a
  sticky "has occurred" bit newly set) are kept but marked ``valid: false`` and left out of the
  summary.
- ``cooldown_c`` waits until the hottest temperature sensor reads below the threshold before
  each run, instead of sleeping a fixed time.
- ``prompt_tokens`` builds an exact-length synthetic prompt of seeded random token ids (as
  llama-bench does), bypassing the chat template.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import agent
from agent.energy import EnergyIntegrator, EnergyResult
from agent.generation import GenerationResult, run_generation
from agent.identity import hardware_identity
from agent.metrics import summarize
from agent.models import ResolvedModel
from agent.sampler import Sampler, Snapshot
from agent.utility import (
    DEFAULT_PRICE_PER_KWH,
    DEFAULT_TTFT_REF_MS,
    edge_cpr_cents,
    pcr,
    responsiveness,
    utility,
)
from agent.worker import InferenceWorker, WorkerConfig
from backends.base import BackendOptions, GenerationRequest, ModelSpec
from probes.process import ProcessProbe
from probes.registry import create_probes

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
    "energy_mj",
    "energy_net_mj",
    "mj_per_token",
    "power_mw",
)

ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class BenchConfig:
    """What to benchmark, and how.

    Attributes:
        backend: Registered backend name.
        model: The resolved model.
        threads: Engine threads (positive; ``auto`` already resolved).
        threads_how: How ``threads`` was chosen, for provenance.
        max_tokens: Tokens to generate per run.
        ignore_eos: Generate exactly ``max_tokens`` (end-of-generation tokens are banned).
        runs: Measured repetitions.
        warmup: Unmeasured repetitions before them (the first is the cold request).
        messages: Chat prompts, used round-robin over runs.
        prompt_tokens: Exact-length synthetic prompt instead of ``messages``.
        context_tokens: Context window to allocate.
        quality: ``"gsm8k"`` to measure Q, or None.
        quality_limit: Score only the first N items of the evaluation set.
        quality_full: Use all 1,319 test items instead of the stratified 100.
        quality_max_tokens: Generation budget per quality item.
        alpha: Weight of Q in U = αQ + (1−α)R.
        ttft_ref_ms: R's reference TTFT (R = min(1, ref / TTFT)).
        price_per_kwh: Electricity price for the edge CPR (currency units per kWh).
        cooldown_c: Wait before each run until the hottest sensor is below this, °C.
        cooldown_timeout_s: Give up waiting after this long (the run is marked).
        probe_root: Filesystem root for the probes.
        probe_options: Per-probe options (e.g. the ``estimate`` probe's idle/max power).
        sample_interval_s: Sampling interval inside runs (≥ 10 Hz by default).
        baseline_s: Idle time measured before the runs for net energy (0 disables).
        backend_options: Engine-specific options (``BackendOptions.extra``), e.g. an
            ``openai`` endpoint's ``base_url`` and token prices.
    """

    backend: str
    model: ResolvedModel
    threads: int
    threads_how: str = "configured"
    max_tokens: int = 64
    ignore_eos: bool = False
    runs: int = 3
    warmup: int = 1
    messages: tuple[tuple[dict[str, str], ...], ...] = (DEFAULT_MESSAGES,)
    prompt_tokens: int | None = None
    context_tokens: int = 2048
    quality: str | None = None
    quality_limit: int | None = None
    quality_full: bool = False
    quality_max_tokens: int = 256
    alpha: float = 0.5
    ttft_ref_ms: float = DEFAULT_TTFT_REF_MS
    price_per_kwh: float = DEFAULT_PRICE_PER_KWH
    cooldown_c: float | None = None
    cooldown_timeout_s: float = 300.0
    probe_root: str = "/"
    probe_options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    sample_interval_s: float = 0.05
    baseline_s: float = 2.0
    backend_options: dict[str, Any] = dataclasses.field(default_factory=dict)


def _energy_dict(res: EnergyResult | None) -> dict[str, Any] | None:
    if res is None:
        return None
    return {
        "method": res.method,
        "sources": list(res.sources),
        "estimated": res.estimated,
        "coverage": res.coverage,
        "sample_interval_s": res.sample_interval_s,
        "duration_s": res.duration_s,
        "mean_power_mw": res.mean_power_mw,
        "gross_mj": res.gross_energy_mj,
        "net_mj": res.net_energy_mj,
        "baseline_power_mw": res.baseline_power_mw,
        "tokens": res.tokens,
        "gross_mj_per_token": res.gross_mj_per_token,
        "net_mj_per_token": res.net_mj_per_token,
        "gross_tokens_per_j": res.gross_tokens_per_j,
        "reason": res.reason or None,
    }


def device_state(snap: Snapshot | None) -> dict[str, Any]:
    """Thermal, clock, governor and throttle state from one sampler snapshot."""
    if snap is None:
        return {"max_temp_c": None, "reason": "no snapshot"}
    r = snap.readings
    cpu = r.get("cpu", {})
    cores = cpu.get("cores") or []
    freqs = [c.get("cur_freq_khz") for c in cores if c.get("cur_freq_khz") is not None]
    governors = sorted({c["governor"] for c in cores if c.get("governor")})
    rpi = r.get("rpi", {})
    jetson = r.get("jetson", {})
    return {
        "max_temp_c": r.get("thermal", {}).get("max_temp_c"),
        "cpu_freq_mhz": [f / 1000.0 for f in freqs] or None,
        "governors": governors or None,
        "throttled_raw": rpi.get("throttled_raw"),
        "throttled_now": any(
            rpi.get(k) is True
            for k in ("under_voltage_now", "freq_capped_now", "throttled_now",
                      "soft_temp_limit_now")
        ) if rpi else None,
        "power_mode": jetson.get("power_mode") if jetson else None,
    }


def _throttle_flagged(before: dict[str, Any], after: dict[str, Any]) -> str | None:
    if after.get("throttled_now"):
        return f"throttling flagged during the run (get_throttled={after.get('throttled_raw')})"
    b, a = before.get("throttled_raw"), after.get("throttled_raw")
    if isinstance(b, int) and isinstance(a, int) and (a & ~b) & 0xF0000:
        return f"a sticky throttle bit was newly set (get_throttled {b:#x} → {a:#x})"
    return None


def synthetic_prompt(n_tokens: int, vocab_size: int, seed: int = 0) -> tuple[int, ...]:
    """Seeded random token ids in [256, vocab) (low ids hold special and byte tokens)."""
    if n_tokens <= 0:
        raise ValueError("prompt_tokens must be positive")
    if vocab_size <= 256:
        raise ValueError(f"vocabulary too small for synthetic prompts ({vocab_size})")
    rng = random.Random(seed)
    return tuple(256 + int(rng.random() * (vocab_size - 256)) for _ in range(n_tokens))


class _Bench:
    """One bench session: worker, sampler, integrator.

    ``worker`` and ``sampler`` may be the daemon's own (``cmd/bench``): the bench then
    measures the model copy that serves requests instead of loading a second one, and
    neither is started or stopped here.
    """

    def __init__(self, config: BenchConfig, progress: ProgressFn | None,
                 worker: InferenceWorker | None = None, sampler: Sampler | None = None) -> None:
        self.c = config
        self.progress = progress or (lambda *_: None)
        self.owns_worker = worker is None
        self.worker = worker if worker is not None else InferenceWorker(WorkerConfig(
            backend=config.backend,
            model=ModelSpec(config.model.name, config.model.path, config.model.format,
                            config.model.sha256),
            options=BackendOptions(threads=config.threads, context_tokens=config.context_tokens,
                                   extra=dict(config.backend_options)),
        ))
        self.owns_sampler = sampler is None
        if sampler is None:
            probes = [p for p in create_probes(None, config.probe_root,
                                               options=config.probe_options)
                      if p.name != "process"]
            sampler = Sampler(probes, interval_s=1.0)
        self.sampler = sampler
        # Its own ProcessProbe instance: CPU% is a rate, and the sampler's instance (if any)
        # keeps its state on the sampler thread.
        self.procs = ProcessProbe(root=config.probe_root)
        self.energy = EnergyIntegrator(self.sampler, lookback_s=2.0)
        self.notes: list[str] = []
        self.should_stop: Callable[[], bool] = lambda: False

    def _snapshot(self) -> Snapshot:
        # The sampler thread owns the probes (rate probes keep state between samples and are
        # not thread-safe): read its latest tick instead of sampling from this thread.
        latest = self.sampler.latest()
        return latest if latest is not None else self.sampler.sample_once()

    def cooldown(self) -> dict[str, Any] | None:
        if self.c.cooldown_c is None:
            return None
        start = time.monotonic()
        while True:
            temp = device_state(self._snapshot()).get("max_temp_c")
            waited = time.monotonic() - start
            if temp is None:
                return {"target_c": self.c.cooldown_c, "waited_s": waited, "reached": False,
                        "reason": "no temperature sensor: cannot cool down to a threshold"}
            if temp < self.c.cooldown_c:
                return {"target_c": self.c.cooldown_c, "waited_s": waited, "reached": True,
                        "temp_c": temp}
            if waited > self.c.cooldown_timeout_s:
                return {"target_c": self.c.cooldown_c, "waited_s": waited, "reached": False,
                        "temp_c": temp, "reason": "cooldown timed out"}
            time.sleep(1.0)

    def check_stop(self) -> None:
        """Raise :class:`BenchCancelledError` if the caller wants the bench to end now."""
        if self.should_stop():
            raise BenchCancelledError("the bench was cancelled (the agent is shutting down)")

    def generate(self, request: GenerationRequest) -> dict[str, Any]:
        """One measured generation with energy, state and CPU figures."""
        cool = self.cooldown()
        before = device_state(self._snapshot())
        self.procs.sample()
        with self.sampler.fast(self.c.sample_interval_s):
            # Bracket the window with power samples taken here: the last 1 Hz tick is up to a
            # second old, and a window whose start falls in that gap loses coverage (short
            # requests then got no energy at all). Without a source that can be sampled on
            # demand, let the high-rate ticks start first instead.
            if self.sampler.sample_power_now() is None:
                time.sleep(2 * self.c.sample_interval_s)
            self.check_stop()
            result = run_generation(self.worker, request, on_event=lambda _: self.check_stop())
            self.sampler.sample_power_now()
            energy = self._energy(result)
        cpu_pct = self.procs.sample().processes["worker"].cpu_pct
        after = device_state(self._snapshot())
        record = _run_record(result, cpu_pct, energy)
        record["state_before"], record["state_after"] = before, after
        if cool is not None:
            record["cooldown"] = cool
        invalid = _throttle_flagged(before, after)
        record["valid"] = invalid is None
        if invalid:
            record["invalid_reason"] = invalid
        return record

    def _energy(self, r: GenerationResult) -> dict[str, Any]:
        out: dict[str, Any] = {}
        end = r.last_token_ns or r.end_ns
        total = self.energy.measure(r.accepted_ns / 1e9, end / 1e9,
                                    tokens=r.completion_tokens, settle_timeout_s=0.3)
        out["total"] = _energy_dict(total)
        if r.prefill_start_ns and r.first_token_ns and r.last_token_ns:
            out["prefill"] = _energy_dict(self.energy.measure(
                r.prefill_start_ns / 1e9, r.first_token_ns / 1e9, tokens=r.prompt_tokens))
            out["decode"] = _energy_dict(self.energy.measure(
                r.first_token_ns / 1e9, r.last_token_ns / 1e9,
                tokens=max(0, r.completion_tokens - 1)))
        return out


def _run_record(result: GenerationResult, cpu_pct: float | None,
                energy: dict[str, Any] | None = None) -> dict[str, Any]:
    t = result.timings
    total = (energy or {}).get("total") or {}
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
        "energy_mj": total.get("gross_mj"),
        "energy_net_mj": total.get("net_mj"),
        "mj_per_token": total.get("gross_mj_per_token"),
        "power_mw": total.get("mean_power_mw"),
        "energy": energy,
        "engine": result.engine,
        "text": result.text,
    }


def _summary_entry(values: Sequence[float | None]) -> dict[str, Any] | None:
    s = summarize(values)
    return None if s is None else {**dataclasses.asdict(s), "samples": list(s.samples)}


def _quality(b: _Bench, progress: ProgressFn) -> dict[str, Any]:
    from agent.quality import DEFAULT_SEED, extract_answer, messages_for, select_items

    c = b.c
    if c.quality != "gsm8k":
        raise ValueError(f"unknown quality task {c.quality!r} (supported: gsm8k)")
    items = select_items(limit=c.quality_limit, full=c.quality_full)
    rows = []
    for i, item in enumerate(items):
        rec = b.generate(GenerationRequest(messages=messages_for(item),
                                           max_tokens=c.quality_max_tokens))
        predicted = extract_answer(rec["text"])
        rows.append({
            "index": item.index,
            "expected": str(item.answer),
            "predicted": None if predicted is None else str(predicted),
            "correct": predicted is not None and predicted == item.answer,
            "ttft_ms": rec["ttft_ms"],
            "e2e_ms": rec["e2e_ms"],
            "prompt_tokens": rec["prompt_tokens"],
            "completion_tokens": rec["completion_tokens"],
            "energy_mj": rec["energy_mj"],
            "cost": (rec.get("engine") or {}).get("cost"),
            "valid": rec["valid"],
        })
        progress("quality", i + 1, len(items))
    correct = sum(1 for r in rows if r["correct"])
    return {
        "task": "gsm8k",
        "metric": "pass@1",
        "selection": ("full test split" if c.quality_full else
                      f"length-stratified {len(rows)} of 1319 (seed {DEFAULT_SEED})"
                      if c.quality_limit is None else
                      f"first {len(rows)} of the length-stratified 100 (seed {DEFAULT_SEED})"),
        "n": len(rows),
        "correct": correct,
        "pass_at_1": correct / len(rows) if rows else None,
        "max_tokens": c.quality_max_tokens,
        "items": rows,
    }


def paper_metrics(record: dict[str, Any], config: BenchConfig) -> dict[str, Any]:
    """Q, R, U, edge CPR and PCR for a bench record; None with reasons where not measurable."""
    reasons: list[str] = []
    quality = record.get("quality")
    q = quality.get("pass_at_1") if quality else None
    if q is None:
        reasons.append("Q needs --quality gsm8k")
    rows = (quality or {}).get("items") or record["runs"]
    ttfts = [r["ttft_ms"] for r in rows if r.get("ttft_ms")]
    ttft = summarize(ttfts).mean if ttfts else None  # type: ignore[union-attr]
    r_value = responsiveness(ttft, config.ttft_ref_ms) if ttft else None
    u = utility(q, r_value, config.alpha) if q is not None and r_value is not None else None
    costs = [(r.get("cost") if "cost" in r else (r.get("engine") or {}).get("cost"))
             for r in rows]
    priced = [float(c) for c in costs if c is not None]
    if rows and len(priced) == len(rows):
        # A priced remote endpoint: CPR is what the provider bills for the tokens.
        cpr_cloud = sum(priced) / len(priced) * 100.0
        return {
            "alpha": config.alpha, "ttft_ref_ms": config.ttft_ref_ms,
            "r_normalisation": "ratio: min(1, ttft_ref_ms / ttft_ms)",
            "price_per_kwh": None, "q": q, "ttft_ms": ttft, "r": r_value, "u": u,
            "energy_per_response_mj": None, "energy_sources": [],
            "cpr_basis": "cloud_tokens", "cpr_cents": cpr_cloud,
            "pcr": pcr(u, cpr_cloud) if u is not None and cpr_cloud > 0 else None,
            "reasons": reasons,
        }
    energies = [r["energy_mj"] for r in rows if r.get("energy_mj") is not None]
    if len(energies) < len(rows):
        first = next((r for r in record["runs"] if r.get("energy")), None)
        why = (((first or {}).get("energy") or {}).get("total") or {}).get("reason")
        reasons.append(f"energy not measured for {len(rows) - len(energies)} of {len(rows)} "
                       f"responses: {why or 'no power source'}")
    energy = sum(energies) / len(energies) if energies and len(energies) == len(rows) else None
    cpr = edge_cpr_cents(energy, config.price_per_kwh) if energy is not None else None
    pcr_value = pcr(u, cpr) if u is not None and cpr else None
    if u is not None and cpr is None:
        reasons.append("PCR needs CPR, which needs energy per response")
    sources = sorted({s for r in record["runs"]
                      for s in (((r.get("energy") or {}).get("total") or {}).get("sources") or [])})
    return {
        "alpha": config.alpha,
        "ttft_ref_ms": config.ttft_ref_ms,
        "r_normalisation": "ratio: min(1, ttft_ref_ms / ttft_ms)",
        "price_per_kwh": config.price_per_kwh,
        "q": q,
        "ttft_ms": ttft,
        "r": r_value,
        "u": u,
        "energy_per_response_mj": energy,
        "energy_sources": sources,
        "energy_estimated": any(
            (((r.get("energy") or {}).get("total") or {}).get("estimated") is True)
            for r in record["runs"]),
        "cpr_basis": "edge_energy",
        "cpr_cents": cpr,
        "pcr": pcr_value,
        "reasons": reasons,
    }


class BenchCancelledError(Exception):
    """``run_bench``'s ``should_stop`` said stop (the daemon is shutting down)."""


def run_bench(config: BenchConfig, progress: ProgressFn | None = None, *,
              worker: InferenceWorker | None = None,
              sampler: Sampler | None = None,
              should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Run the benchmark and return an ``edgelm.bench/1`` record.

    Args:
        config: What to run.
        progress: Called with ``(phase, done, total)``.
        worker: A started worker to measure (the daemon's), instead of loading the model in
            a new one; it is left running. The caller keeps other work off it meanwhile.
        sampler: A running sampler to read power from (the daemon's), instead of a new one
            over freshly created probes; it is left running.
        should_stop: Polled between runs, during the idle baseline and on every token: True
            ends the bench with :class:`BenchCancelledError` (the generation in flight is
            cancelled). The daemon passes its shutdown flag: a bench of up to 20 x 512
            tokens must not hold SIGTERM past systemd's stop timeout.

    Raises:
        backends.base.BackendError: The model could not be loaded or a generation failed.
        BenchCancelledError: ``should_stop`` returned True.
        ValueError: A configuration value is out of range.
    """
    if config.runs < 1:
        raise ValueError("runs must be at least 1")
    if config.warmup < 0:
        raise ValueError("warmup must be zero or more")
    b = _Bench(config, progress, worker, sampler)
    if should_stop is not None:
        b.should_stop = should_stop
    prog = b.progress
    started_unix_ms = int(time.time() * 1000)
    prog("load", 0, 1)
    if b.owns_sampler:
        b.sampler.start()
    try:
        info = b.worker.start()
        prog("load", 1, 1)
        b.procs.set_pid("worker", b.worker.pid)
        if config.baseline_s > 0:
            t0 = time.monotonic()
            with b.sampler.fast(0.1):
                while time.monotonic() - t0 < config.baseline_s:
                    b.check_stop()
                    time.sleep(min(0.05, max(0.0, config.baseline_s
                                             - (time.monotonic() - t0))))
            baseline = b.energy.measure_baseline(t0, time.monotonic(), settle_timeout_s=0.3)
            if baseline is None:
                b.notes.append("no idle baseline: no power source (net energy not available)")
        requests = _requests(config, info)
        cold: dict[str, Any] | None = None
        for i in range(config.warmup):
            rec = b.generate(requests[i % len(requests)])
            if i == 0:
                cold = rec
            prog("warmup", i + 1, config.warmup)
        runs: list[dict[str, Any]] = []
        for i in range(config.runs):
            runs.append(b.generate(requests[i % len(requests)]))
            prog("run", i + 1, config.runs)
        quality = _quality(b, prog) if config.quality else None
        peak_rss = b.procs.sample().processes["worker"].peak_rss_bytes
    finally:
        if b.owns_worker:
            b.worker.stop()
        if b.owns_sampler:
            b.sampler.stop()
    valid = [r for r in runs if r["valid"]]
    summary = {m: _summary_entry([r[m] for r in valid]) for m in SUMMARY_METRICS}
    tgs = summary.get("decode_tok_s") or {}
    record: dict[str, Any] = {
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
            # e.g. "onnx-optimum" for a file whose format is plain "onnx"
            "prepared_as": info.get("prepared_as"),
        },
        "config": {
            "max_tokens": config.max_tokens,
            "ignore_eos": config.ignore_eos,
            "runs": config.runs,
            "warmup": config.warmup,
            "n_threads": config.threads,
            "context_tokens": config.context_tokens,
            "prompt_tokens": config.prompt_tokens,
            "messages": [[dict(m) for m in conv] for conv in config.messages]
            if config.prompt_tokens is None else None,
            "cooldown_c": config.cooldown_c,
            "sample_interval_s": config.sample_interval_s,
            "probe_root": config.probe_root,
        },
        # llama-bench compatible names
        "n_prompt": runs[0]["prompt_tokens"],
        "n_gen": config.max_tokens,
        "n_threads": config.threads,
        "model_type": info.get("quantization"),
        "model_size": config.model.size_bytes,
        "avg_ts": tgs.get("mean"),
        "stddev_ts": tgs.get("stdev"),
        "load_ms": info.get("load_ms"),
        "worker_start_ms": info.get("worker_start_ms"),
        "cold": cold,
        "runs": runs,
        "valid_runs": len(valid),
        "summary": summary,
        "peak_rss_bytes": peak_rss,
        "energy": {
            "baseline_power_mw": b.energy.baseline.power_mw if b.energy.baseline else None,
            "baseline_sources": list(b.energy.baseline.sources) if b.energy.baseline else [],
            "probes": {k: {"ok": a.ok, "reason": a.reason}
                       for k, a in b.sampler.health().items()},
        },
        "quality": quality,
        "notes": b.notes,
        "provenance": {
            "agent_version": agent.__version__,
            "backend": config.backend,
            "engine": info.get("engine"),
            "engine_version": info.get("engine_version"),
            "build_flags": info.get("build_flags"),
            "model_sha256": config.model.sha256,
            "threads": config.threads,
            "threads_how": config.threads_how,
            "hardware": hardware_identity(config.probe_root),
            "python_implementation": platform.python_implementation(),
        },
    }
    record["paper"] = paper_metrics(record, config)
    return record


def _requests(config: BenchConfig, info: dict[str, Any]) -> list[GenerationRequest]:
    if config.prompt_tokens is not None:
        vocab = info.get("vocab_size")
        if not vocab:
            raise ValueError(f"backend {config.backend} does not report vocab_size; "
                             "--prompt-tokens needs it")
        ids = synthetic_prompt(config.prompt_tokens, int(vocab))
        return [GenerationRequest(prompt_token_ids=ids, max_tokens=config.max_tokens,
                                  ignore_eos=config.ignore_eos)]
    return [GenerationRequest(messages=conv, max_tokens=config.max_tokens,
                              ignore_eos=config.ignore_eos) for conv in config.messages]
