"""What telemetry costs: one sampler tick with every probe, and decode speed with sampling on.

1. CPU time of one ``Sampler.sample_once()`` tick with all registered probes, on each fixture
   tree under tests/fixtures/sysfs/ (and on this machine's ``/``). The Pi trees answer
   ``vcgencmd`` from their canned outputs, so a real Pi 5 pays one fork/exec per
   ``vcgencmd`` call on top of what is shown; NVML is absent unless nvidia-ml-py is installed.
2. llama.cpp decode tok/s of the real SmolLM2-135M through the agent's worker, with the
   sampler running at 10 Hz vs not running, as a ratio (goal >= 0.99). Runs alternate
   on/off/off/on so slow drift on a shared machine hits both alike; medians are compared.

    .venv/bin/python benchmarks/sampler_cost.py [--ticks 2000] [--runs 6] [--threads 2]
                                          [--max-tokens 64] [--hz 10] [--skip-model]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.sampler import Sampler
from probes.base import Probe
from probes.mqtt_power import MqttPowerProbe
from probes.registry import create_probes

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "sysfs"


def canned_vcgencmd(root: Path):  # type: ignore[no-untyped-def]
    """Answer vcgencmd from the tree's canned outputs (vcgencmd/<cmd>.txt), else None."""
    def run(argv: Sequence[str]) -> str | None:
        f = root / "vcgencmd" / f"{argv[1]}.txt"
        return f.read_text() if f.exists() else None
    return run


def all_probes(root: Path | str, canned: bool) -> list[Probe]:
    options: dict[str, dict[str, Any]] = {
        "estimate": {"idle_mw": 2000.0, "max_mw": 8000.0},
        "mqtt_power": {"topic": "tele/bench-plug/SENSOR"},
        "jetson": {"use_jtop": False},
    }
    if canned:
        options["rpi"] = {"runner": canned_vcgencmd(Path(root))}
    probes = create_probes(None, root, options=options)
    for p in probes:
        if isinstance(p, MqttPowerProbe):  # a fresh plug reading, as if a plug published
            p.feed("tele/bench-plug/SENSOR", b'{"ENERGY": {"Power": 6.2, "Total": 1.5}}')
    return probes


def tick_cost(root: Path | str, ticks: int, canned: bool) -> tuple[float, float]:
    """(CPU µs per tick, wall µs per tick)."""
    sampler = Sampler(all_probes(root, canned), interval_s=0.1)
    sampler.check_probes(force=True)
    for _ in range(20):
        sampler.sample_once()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(ticks):
        sampler.sample_once()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return cpu / ticks * 1e6, wall / ticks * 1e6


def per_probe_cost(root: Path | str, ticks: int, canned: bool) -> dict[str, float]:
    """CPU µs per sample()+power() of each available probe."""
    out: dict[str, float] = {}
    for probe in all_probes(root, canned):
        if not probe.check().ok:
            continue
        for _ in range(5):
            probe.power(probe.sample())
        cpu0 = time.process_time()
        for _ in range(ticks):
            probe.power(probe.sample())
        out[probe.name] = (time.process_time() - cpu0) / ticks * 1e6
    return out


def sampler_cost(ticks: int) -> None:
    trees = sorted(p for p in FIXTURES.iterdir() if p.is_dir())
    print(f"Sampler tick with all probes ({ticks} ticks each; CPU = process time)")
    print(f"{'tree':<22}{'CPU µs/tick':>12}{'wall µs/tick':>13}{'CPU @10 Hz':>12}  "
          "CPU µs per probe")
    rows: list[tuple[str, Path | str, bool]] = [(t.name, t, True) for t in trees]
    rows.append(("this machine (/)", "/", False))
    for name, root, canned in rows:
        cpu_us, wall_us = tick_cost(root, ticks, canned)
        share = cpu_us * 10 / 1e6 * 100  # % of one core at 10 ticks/s
        by_probe = per_probe_cost(root, max(50, ticks // 4), canned)
        detail = ", ".join(f"{k} {v:.0f}" for k, v in sorted(by_probe.items(),
                                                             key=lambda kv: -kv[1]))
        print(f"{name:<22}{cpu_us:>12.0f}{wall_us:>13.0f}{share:>11.2f}%  {detail}")


def decode_on_off(runs: int, threads: int, max_tokens: int, hz: float) -> None:
    from agent.bench import DEFAULT_MESSAGES
    from agent.generation import run_generation
    from agent.models import resolve_model
    from agent.worker import InferenceWorker, WorkerConfig
    from backends.base import BackendOptions, GenerationRequest, ModelSpec
    from probes.process import ProcessProbe

    model = resolve_model("smollm2-135m")
    worker = InferenceWorker(WorkerConfig(
        backend="llamacpp",
        model=ModelSpec(model.name, model.path, model.format, model.sha256),
        options=BackendOptions(threads=threads, context_tokens=2048),
    ))
    worker.start()
    probes = [p for p in all_probes("/", canned=False) if p.name != "process"]
    probes.append(ProcessProbe("/", pids={"agent": os.getpid(), "worker": worker.pid}))
    # As the agent samples: 1 Hz base, fast(1/hz) inside generation windows, where only
    # power sources run at the high rate.
    sampler = Sampler(probes, interval_s=1.0)
    request = GenerationRequest(messages=DEFAULT_MESSAGES, max_tokens=max_tokens,
                                ignore_eos=True)
    run_generation(worker, GenerationRequest(messages=DEFAULT_MESSAGES, max_tokens=8))  # warm
    on: list[float] = []
    off: list[float] = []
    cpu_on: list[float] = []  # this process's CPU (cores) while generating: sampler + pipe
    cpu_off: list[float] = []
    ticks = 0
    try:
        for i in range(runs):
            order = (True, False) if i % 2 == 0 else (False, True)  # on/off, off/on, …
            for sampling in order:
                if sampling:
                    sampler.start()
                    t0 = sampler.stats().ticks
                cpu0, wall0 = time.process_time(), time.perf_counter()
                if sampling:
                    with sampler.fast(1.0 / hz):
                        r = run_generation(worker, request)
                else:
                    r = run_generation(worker, request)
                share = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
                (cpu_on if sampling else cpu_off).append(share)
                if sampling:
                    sampler.stop()
                    ticks += sampler.stats().ticks - t0
                assert r.completion_tokens == max_tokens, r.completion_tokens
                rate = r.timings.decode_tok_s
                assert rate is not None
                (on if sampling else off).append(rate)
                print(f"  run {i + 1}/{runs} sampling {'on ' if sampling else 'off'}: "
                      f"{rate:.2f} tok/s", file=sys.stderr, flush=True)
    finally:
        worker.stop()
    med_on, med_off = statistics.median(on), statistics.median(off)
    stats = sampler.stats()
    print()
    print(f"llama.cpp decode, SmolLM2-135M, {threads} threads, {max_tokens} tokens, "
          f"{runs} alternating pairs, sampler at 1 Hz with fast({1 / hz:g} s) windows "
          f"(power sources only at {hz:g} Hz), {len(probes)} probes")
    print(f"{'':<18}{'median tok/s':>13}{'runs':>30}")
    print(f"{'sampling off':<18}{med_off:>13.2f}   {' '.join(f'{v:.1f}' for v in off)}")
    print(f"{'sampling on':<18}{med_on:>13.2f}   {' '.join(f'{v:.1f}' for v in on)}")
    print(f"ratio on/off      {med_on / med_off:>13.3f}   (goal >= 0.99; "
          f"{ticks} ticks taken, {stats.skipped_ticks} skipped)")
    # Wall-clock tok/s on a busy shared machine is noisy; the sampler's CPU is not. If the
    # worker's threads keep every core busy, sampling can slow decode by at most its share.
    extra = max(0.0, statistics.median(cpu_on) - statistics.median(cpu_off))
    print(f"sampler CPU while generating: {extra * 1000:.1f} ms per s ({extra * 100:.2f} % of "
          f"one core) → worst-case ratio with {threads} busy cores "
          f"{1 - extra / threads:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ticks", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--hz", type=float, default=10.0)
    ap.add_argument("--skip-model", action="store_true", help="Only the sampler tick cost.")
    args = ap.parse_args()
    sampler_cost(args.ticks)
    if not args.skip_model:
        decode_on_off(args.runs, args.threads, args.max_tokens, args.hz)


if __name__ == "__main__":
    main()
