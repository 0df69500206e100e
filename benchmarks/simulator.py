"""Simulator scale: 1,000,000 requests over 100 devices, per policy, with the wall time.

    .venv/bin/python benchmarks/simulator.py [--requests N] [--policy P ...] [--pattern P]

The target (issue 7) is under a minute per run on the project's 2-core machine.
"""

from __future__ import annotations

import argparse
import time

from agent.fleet.simulator import SimConfig, parse_mix, simulate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--policy", action="append", default=None)
    ap.add_argument("--pattern", default="bursty")
    args = ap.parse_args()
    devices = tuple(parse_mix("jetson-agx-orin:10,jetson-orin-nano:30,rpi5:60"))
    cfg = SimConfig(devices=devices, requests=args.requests, users=1000, pattern=args.pattern,
                    seed=7)
    print(f"{args.requests} requests, {len(devices)} devices, pattern {args.pattern}")
    for policy in args.policy or ["random", "weighted", "load_aware"]:
        t0 = time.perf_counter()
        r = simulate(cfg, policy)
        wall = time.perf_counter() - t0
        print(f"{policy:<11} {wall:6.1f} s wall ({wall / args.requests * 1e6:.1f} µs/request)"
              f"  cloud {r.cloud_requests} req / {r.cloud_tokens} tok  Jain "
              f"{r.jain_utilisation:.3f}  {'OK' if wall < 60 else 'OVER'} (target < 60 s)")


if __name__ == "__main__":
    main()
