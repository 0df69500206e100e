"""What bracketing a request's energy window costs: ``Sampler.sample_power_now()`` vs a tick.

The daemon takes one on-demand power sample just before a generation starts and one just after
it ends (agent/daemon.py ``_execute``), instead of waiting up to ``3 * fast_interval_s`` for
the sampler thread's next tick after the window (the old ``settle`` wait, up to 300 ms at the
default 0.1 s). This prints, per fixture tree under tests/fixtures/sysfs/ (and this machine's
``/``), the CPU and wall time of one on-demand sample next to one full ``sample_once()`` tick
with every probe, alternating the two in one process and comparing medians of batches.

    .venv/bin/python benchmarks/energy_window.py [--calls 2000] [--batches 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from agent.sampler import Sampler
from probes.registry import create_probes

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "sysfs"


def batch(fn: Callable[[], object], calls: int) -> tuple[float, float]:
    """(CPU µs per call, wall µs per call) over ``calls`` calls."""
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(calls):
        fn()
    return ((time.process_time() - c0) / calls * 1e6, (time.perf_counter() - w0) / calls * 1e6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--batches", type=int, default=7)
    args = ap.parse_args()
    print(f"load: {os.getloadavg()[0]:.2f} (1-min average), {os.cpu_count()} CPUs")
    print(f"{'tree':<22}{'power sources':<34}{'on-demand cpu/wall µs':>24}"
          f"{'full tick cpu/wall µs':>24}{'ratio (cpu)':>13}")
    roots = [FIXTURES / n for n in ("x86-rapl-1pkg", "x86-rapl-2pkg", "jetson-agx-orin",
                                    "rpi5")]
    for root in [*roots, Path("/")]:
        probes = create_probes(None, str(root), options={"jetson": {"use_jtop": False}})
        sampler = Sampler(probes, interval_s=1.0, history_len=64)
        sampler.sample_once()
        sampler.sample_once()  # power sources are known after two ticks
        if sampler.sample_power_now() is None:
            print(f"{root.name or '/':<22}{'none that can be sampled on demand':<34}")
            continue
        sources = ",".join(sorted({p.source for p in sampler.sample_power_now().power}))
        demand, tick = [], []
        for i in range(args.batches):  # alternate, so drift on a shared machine hits both
            order = [(demand, sampler.sample_power_now), (tick, sampler.sample_once)]
            for out, fn in order if i % 2 == 0 else order[::-1]:
                out.append(batch(fn, args.calls))
        d_cpu = statistics.median(c for c, _ in demand)
        d_wall = statistics.median(w for _, w in demand)
        t_cpu = statistics.median(c for c, _ in tick)
        t_wall = statistics.median(w for _, w in tick)
        print(f"{root.name or '/':<22}{sources[:33]:<34}{f'{d_cpu:.1f} / {d_wall:.1f}':>24}"
              f"{f'{t_cpu:.1f} / {t_wall:.1f}':>24}{d_cpu / t_cpu:>13.2f}")
    print("the wait these samples replace: up to 3 x fast_interval_s after each request "
          "(300 ms at the default 0.1 s), for the sampler thread's next tick")


if __name__ == "__main__":
    main()
