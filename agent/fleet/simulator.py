"""Discrete-event simulation of an edge fleet with cloud fallback (arXiv 2505.16508, §fleet).

Model:

- **Arrivals**: ``users`` independent Poisson sources (open loop). ``steady``: a constant total
  rate. ``bursty``: the same mean rate, modulated by alternating phases with exponentially
  distributed lengths — ``burst_share`` of the time at ``burst_factor`` × the mean rate, the rest
  at the rate that keeps the mean unchanged. The superposition of the users is generated as one
  piecewise-Poisson stream (exact, and cheap at a million requests).
- **Demand**: prompt and completion tokens drawn per request (``lognormal`` with σ = 0.8,
  ``exponential`` or ``fixed``), with the given means.
- **Devices**: one request at a time each (as ``agentctl run`` serves), FIFO, service time =
  prompt/prefill_tok_s + completion/decode_tok_s, drawing ``power_w`` while busy. Profiles come
  from real ``edgelm.bench/1`` records or from built-in presets (public figures, approximate).
- **Routing**: exactly the router's code — :class:`agent.fleet.policy.FleetState`, the policies
  and the :class:`agent.fleet.ratelimit.RateLimiter` — with simulated seconds as the clock.
  A request no device can take (budget spent, backlog longer than ``max_wait_s``) goes to the
  cloud.
- **Cost**: cloud = prompt and completion tokens × prices; edge = energy while busy × electricity
  price (DESIGN.md §5 CPR). Idle energy is reported separately, not charged to requests.

Offered load is set relative to the fleet's capacity at the mean demand (``load`` = 1.0 keeps
every device busy on average). Each policy sees the identical request stream for a given seed.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from agent.fleet.policy import (
    Demand,
    DeviceState,
    FleetState,
    jain_index,
    make_policy,
)
from agent.fleet.ratelimit import RateLimiter, WindowLimits

PRESET_SOURCE = ("preset: approximate public figures for a ~1B-parameter 4-bit model under "
                 "llama.cpp; not measured here — replace with bench records")


@dataclass(frozen=True)
class DeviceProfile:
    """Speed and power of one device type.

    Attributes:
        kind: Preset name or bench-record origin.
        decode_tok_s / prefill_tok_s: Throughput.
        power_w / idle_power_w: Board power while serving and idle.
        context_tokens: Context window.
        source: Where the figures come from (preset label or bench file).
    """

    kind: str
    decode_tok_s: float
    prefill_tok_s: float
    power_w: float
    idle_power_w: float
    context_tokens: int = 4096
    source: str = PRESET_SOURCE


PRESETS: dict[str, DeviceProfile] = {
    # GPU (Ampere, 2048 cores) at MAXN; llama.cpp CUDA.
    "jetson-agx-orin": DeviceProfile("jetson-agx-orin", 80.0, 1500.0, 30.0, 9.0),
    # GPU (Ampere, 1024 cores) at 15 W; llama.cpp CUDA.
    "jetson-orin-nano": DeviceProfile("jetson-orin-nano", 30.0, 500.0, 12.0, 5.0),
    # CPU only (4× Cortex-A76 @ 2.4 GHz), 8 GB.
    "rpi5": DeviceProfile("rpi5", 10.0, 40.0, 8.0, 3.0, context_tokens=2048),
}


def profile_from_bench(record: Mapping[str, Any], label: str) -> DeviceProfile:
    """A profile from one ``edgelm.bench/1`` record (``agentctl bench --json``).

    Raises:
        ValueError: The record lacks decode or prefill throughput.
    """
    summary = record.get("summary") or {}

    def mean(metric: str) -> float | None:
        s = summary.get(metric)
        return float(s["mean"]) if isinstance(s, dict) and s.get("mean") else None

    decode, prefill = mean("decode_tok_s"), mean("prefill_tok_s")
    if not decode or not prefill:
        raise ValueError(f"{label}: bench record has no decode/prefill tok/s summary")
    power_mw = mean("power_mw")
    config = record.get("config") or {}
    hardware = (record.get("provenance") or {}).get("hardware") or {}
    kind = str(hardware.get("model") or hardware.get("hostname") or label)
    return DeviceProfile(
        kind=kind, decode_tok_s=decode, prefill_tok_s=prefill,
        power_w=power_mw / 1000.0 if power_mw else 5.0,
        idle_power_w=(power_mw / 1000.0) * 0.4 if power_mw else 2.0,
        context_tokens=int(config.get("context_tokens") or 2048),
        source=f"bench record {label}" + ("" if power_mw else " (power assumed: 5 W)"),
    )


def parse_mix(spec: str) -> list[DeviceProfile]:
    """``"jetson-agx-orin:2,jetson-orin-nano:4,rpi5:10"`` → profiles (count defaults to 1).

    Raises:
        ValueError: Unknown preset or bad count.
    """
    out: list[DeviceProfile] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, count = part.partition(":")
        if name not in PRESETS:
            raise ValueError(f"unknown device preset {name!r}; presets: {', '.join(PRESETS)}")
        n = int(count) if count else 1
        if n < 1:
            raise ValueError(f"device count must be >= 1 in {part!r}")
        out.extend([PRESETS[name]] * n)
    return out


@dataclass(frozen=True)
class SimConfig:
    """One simulation.

    Attributes:
        devices: Device profiles (one entry per device).
        requests: Number of requests.
        users: Number of Poisson sources.
        pattern: ``steady`` or ``bursty``.
        load: Offered load relative to fleet capacity at the mean demand.
        burst_factor / burst_share / burst_mean_s: Bursty phases (rate ×, time share, mean length).
        prompt_tokens / completion_tokens: Mean demand; ``token_dist`` its distribution.
        window_s / budget_factor / window_requests: Per-device sliding window: tokens per window
            = ``budget_factor`` × the device's sustainable token rate × ``window_s``; requests
            per window ``window_requests`` (None: no request cap).
        max_wait_s: Longest acceptable queueing on a device before falling back.
        attempts: Devices an oblivious policy asks before falling back.
        cloud_*: Cloud latency model and prices (USD per million tokens).
        price_per_kwh: Electricity price (USD), DESIGN.md default 0.25.
        seed: Seed of the request stream (and of the policies' draws).
    """

    devices: tuple[DeviceProfile, ...]
    requests: int = 10_000
    users: int = 100
    pattern: str = "steady"
    load: float = 0.8
    burst_factor: float = 6.0
    burst_share: float = 0.1
    burst_mean_s: float = 30.0
    prompt_tokens: float = 200.0
    completion_tokens: float = 120.0
    token_dist: str = "lognormal"
    window_s: float = 60.0
    budget_factor: float = 1.0
    window_requests: int | None = None
    max_wait_s: float = 10.0
    attempts: int = 2
    cloud_ttft_s: float = 0.6
    cloud_decode_tok_s: float = 80.0
    cloud_price_in_per_mtok: float = 0.15
    cloud_price_out_per_mtok: float = 0.60
    price_per_kwh: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.devices:
            raise ValueError("at least one device is needed")
        if self.pattern not in ("steady", "bursty"):
            raise ValueError("pattern must be 'steady' or 'bursty'")
        if self.token_dist not in ("lognormal", "exponential", "fixed"):
            raise ValueError("token_dist must be lognormal, exponential or fixed")
        if self.pattern == "bursty" and self.burst_factor * self.burst_share >= 1.0:
            raise ValueError("burst_factor × burst_share must be < 1 (the mean rate is kept)")
        if self.requests < 1 or self.users < 1 or not self.load > 0:
            raise ValueError("requests, users and load must be positive")


def _percentiles(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    xs.sort()
    n = len(xs)

    def q(p: float) -> float:
        return xs[min(n - 1, max(0, math.ceil(p * n) - 1))]

    return {"p50": q(0.50), "p90": q(0.90), "p99": q(0.99), "mean": sum(xs) / n}


def _token_sampler(rng: random.Random, dist: str, mean: float, cap: int
                   ) -> Callable[[], int]:
    """A draw of token counts with the given mean, clipped to [1, cap]."""
    if dist == "fixed":
        n = max(1, min(cap, round(mean)))
        return lambda: n
    if dist == "exponential":
        expo, lam = rng.expovariate, 1.0 / mean
        return lambda: max(1, min(cap, round(expo(lam))))
    sigma = 0.8  # lognormal with the requested mean
    mu = math.log(mean) - sigma * sigma / 2.0
    logn = rng.lognormvariate
    return lambda: max(1, min(cap, round(logn(mu, sigma))))


def _arrivals(cfg: SimConfig, rate: float, rng: random.Random
              ) -> Iterator[tuple[float, int, int, int]]:
    """``(t, user, prompt_tokens, completion_tokens)`` for every request, in time order."""
    quiet = (1.0 - cfg.burst_factor * cfg.burst_share) / (1.0 - cfg.burst_share)
    burst_len = cfg.burst_mean_s
    quiet_len = burst_len * (1.0 - cfg.burst_share) / cfg.burst_share
    in_burst = False
    phase_end = math.inf if cfg.pattern == "steady" else rng.expovariate(1.0 / quiet_len)
    mult = 1.0 if cfg.pattern == "steady" else quiet
    max_prompt = max(p.context_tokens for p in cfg.devices) * 2
    prompt_tokens = _token_sampler(rng, cfg.token_dist, cfg.prompt_tokens, max_prompt)
    completion_tokens = _token_sampler(rng, cfg.token_dist, cfg.completion_tokens, 4096)
    expo = rng.expovariate
    t = 0.0
    for _ in range(cfg.requests):
        while True:
            nxt = t + expo(rate * mult)
            if nxt < phase_end:
                t = nxt
                break
            t = phase_end  # memoryless: restart the draw at the phase change
            in_burst = not in_burst
            mult = cfg.burst_factor if in_burst else quiet
            phase_end = t + rng.expovariate(1.0 / (burst_len if in_burst else quiet_len))
        user = int(rng.random() * cfg.users)
        p = prompt_tokens()
        yield t, user, p, completion_tokens()


@dataclass
class PolicyResult:
    """Outcome of one policy over the request stream (JSON-ready via :func:`asdict`)."""

    policy: str
    requests: int
    edge_requests: int
    cloud_requests: int
    cloud_by_reason: dict[str, int]
    cloud_tokens: int
    edge_tokens: int
    cloud_cost_usd: float
    edge_energy_j: float
    edge_energy_cost_usd: float
    total_cost_usd: float
    idle_energy_j: float
    utilisation: dict[str, float]
    jain_utilisation: float
    requests_per_device: dict[str, int]
    latency_s: dict[str, float | None]
    edge_latency_s: dict[str, float | None]
    cloud_latency_s: dict[str, float | None]
    ttft_s: dict[str, float | None]
    simulated_s: float
    wall_s: float
    extra: dict[str, Any] = field(default_factory=dict)


def offered_rate(cfg: SimConfig) -> float:
    """Total arrival rate (req/s) for ``cfg.load`` × the fleet's capacity at the mean demand."""
    cap = sum(1.0 / (cfg.prompt_tokens / p.prefill_tok_s
                     + cfg.completion_tokens / p.decode_tok_s) for p in cfg.devices)
    return cfg.load * cap


def simulate(cfg: SimConfig, policy_name: str) -> PolicyResult:
    """Run the request stream of ``cfg`` through ``policy_name``."""
    wall0 = time.perf_counter()
    rng = random.Random(cfg.seed)
    rate = offered_rate(cfg)
    mean_demand = Demand(int(cfg.prompt_tokens), int(cfg.completion_tokens))
    limiter = RateLimiter(WindowLimits(cfg.window_s))
    fleet = FleetState(limiter, max_wait_s=cfg.max_wait_s)
    names: list[str] = []
    width = len(str(len(cfg.devices)))
    for i, prof in enumerate(cfg.devices):
        name = f"{prof.kind}-{i:0{width}d}"
        names.append(name)
        dev = DeviceState(
            name=name, decode_tok_s=prof.decode_tok_s, prefill_tok_s=prof.prefill_tok_s,
            context_tokens=prof.context_tokens, power_w=prof.power_w,
            idle_power_w=prof.idle_power_w, max_outstanding=1 << 30,
        )
        service = dev.service_s(mean_demand)
        limiter.set_limits(name, WindowLimits(
            cfg.window_s, cfg.window_requests,
            max(1, int(cfg.budget_factor * cfg.window_s * mean_demand.tokens / service)),
        ))
        fleet.add(dev)
    policy = make_policy(policy_name, fleet, random.Random(cfg.seed + 1), cfg.attempts)

    busy = dict.fromkeys(names, 0.0)
    served = dict.fromkeys(names, 0)
    cloud_by_reason: dict[str, int] = {}
    latencies: list[float] = []
    edge_lat: list[float] = []
    cloud_lat: list[float] = []
    ttfts: list[float] = []
    cloud_tokens = edge_tokens = 0
    cloud_cost = edge_energy = 0.0
    price_in = cfg.cloud_price_in_per_mtok / 1e6
    price_out = cfg.cloud_price_out_per_mtok / 1e6
    completions: list[tuple[float, int, str]] = []  # (t, tiebreak, device)
    tiebreak = 0
    t = 0.0
    devices = fleet.devices
    for t, _user, p, c in _arrivals(cfg, rate, rng):
        while completions and completions[0][0] <= t:
            tc, _, dname = heapq.heappop(completions)
            fleet.finish(devices[dname], tc)
        demand = Demand(p, c)
        decision = fleet.route(policy, t, demand)
        chosen = decision.device
        if chosen is None:
            reason = decision.reason or "no_capacity"
            cloud_by_reason[reason] = cloud_by_reason.get(reason, 0) + 1
            cloud_tokens += p + c
            cloud_cost += p * price_in + c * price_out
            ttft = cfg.cloud_ttft_s
            lat = ttft + c / cfg.cloud_decode_tok_s
            cloud_lat.append(lat)
        else:
            dev = chosen
            # commit() advanced free_at by exactly this request's service time
            service = dev.service_s(demand)
            end = dev.free_at
            start = end - service
            ttft = start - t + p / dev.prefill_tok_s
            lat = end - t
            busy[dev.name] += service
            served[dev.name] += 1
            edge_tokens += p + c
            edge_energy += service * dev.power_w
            edge_lat.append(lat)
            tiebreak += 1
            heapq.heappush(completions, (end, tiebreak, dev.name))
        latencies.append(lat)
        ttfts.append(ttft)
    horizon = max([t, *(d.free_at for d in devices.values())])
    util = {n: (busy[n] / horizon if horizon > 0 else 0.0) for n in names}
    idle_energy = sum((horizon - busy[n]) * devices[n].idle_power_w for n in names)
    edge_cost = edge_energy / 3.6e6 * cfg.price_per_kwh
    return PolicyResult(
        policy=policy_name, requests=cfg.requests,
        edge_requests=sum(served.values()), cloud_requests=sum(cloud_by_reason.values()),
        cloud_by_reason=cloud_by_reason, cloud_tokens=cloud_tokens, edge_tokens=edge_tokens,
        cloud_cost_usd=cloud_cost, edge_energy_j=edge_energy, edge_energy_cost_usd=edge_cost,
        total_cost_usd=cloud_cost + edge_cost, idle_energy_j=idle_energy,
        utilisation=util, jain_utilisation=jain_index(util.values()),
        requests_per_device=served,
        latency_s=_percentiles(latencies), edge_latency_s=_percentiles(edge_lat),
        cloud_latency_s=_percentiles(cloud_lat), ttft_s=_percentiles(ttfts),
        simulated_s=horizon, wall_s=time.perf_counter() - wall0,
    )


def run(cfg: SimConfig, policies: Sequence[str]) -> dict[str, Any]:
    """Simulate every policy on the same stream; add the paper-finding verdict."""
    results = [simulate(cfg, p) for p in policies]
    by_name = {r.policy: r for r in results}
    verdict: dict[str, Any] = {"checked": False}
    if "random" in by_name and "load_aware" in by_name:
        ra, la = by_name["random"].cloud_tokens, by_name["load_aware"].cloud_tokens
        verdict = {
            "checked": cfg.pattern == "bursty",
            "claim": "under bursty load, load-aware selection sends fewer tokens to the cloud "
                     "than random selection",
            "pattern": cfg.pattern,
            "random_cloud_tokens": ra, "load_aware_cloud_tokens": la,
            "reproduced": la < ra,
        }
    kinds: dict[str, int] = {}
    for prof in cfg.devices:
        kinds[prof.kind] = kinds.get(prof.kind, 0) + 1
    config = {k: v for k, v in asdict(cfg).items() if k != "devices"}
    return {
        "schema": "edgelm.simulation/1",
        "config": {**config, "offered_rate_rps": offered_rate(cfg),
                   "devices": kinds,
                   "device_sources": sorted({p.source for p in cfg.devices})},
        "results": [asdict(r) for r in results],
        "paper_finding": verdict,
    }


def render(report: Mapping[str, Any]) -> str:
    """Plain-text tables of a :func:`run` report."""
    cfg = report["config"]
    lines = [
        f"simulation: {cfg['requests']} requests, {cfg['users']} users, pattern {cfg['pattern']}, "
        f"load {cfg['load']:.2f} ({cfg['offered_rate_rps']:.2f} req/s), seed {cfg['seed']}",
        "devices: " + ", ".join(f"{k}×{n}" for k, n in cfg["devices"].items()),
        *(f"  figures: {s}" for s in cfg["device_sources"]),
        "",
        f"{'policy':<11} {'edge':>8} {'cloud':>8} {'cloud tok':>11} {'cloud $':>9} "
        f"{'edge kWh':>9} {'edge $':>8} {'total $':>9} {'Jain':>5} {'p50 s':>7} "
        f"{'p90 s':>7} {'p99 s':>7}",
    ]
    for r in report["results"]:
        lat = r["latency_s"]
        lines.append(
            f"{r['policy']:<11} {r['edge_requests']:>8} {r['cloud_requests']:>8} "
            f"{r['cloud_tokens']:>11} {r['cloud_cost_usd']:>9.4f} "
            f"{r['edge_energy_j'] / 3.6e6:>9.4f} {r['edge_energy_cost_usd']:>8.4f} "
            f"{r['total_cost_usd']:>9.4f} {r['jain_utilisation']:>5.3f} "
            f"{_f(lat['p50'])} {_f(lat['p90'])} {_f(lat['p99'])}")
    lines.append("")
    lines.append("utilisation by device type (mean), cloud fallbacks by reason:")
    for r in report["results"]:
        per_kind: dict[str, list[float]] = {}
        for name, u in r["utilisation"].items():
            per_kind.setdefault(name.rsplit("-", 1)[0], []).append(u)
        kinds = ", ".join(f"{k} {sum(v) / len(v):.2f}" for k, v in per_kind.items())
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(r["cloud_by_reason"].items())) or "-"
        lines.append(f"  {r['policy']:<11} {kinds}; fallbacks: {reasons}; "
                     f"{r['wall_s']:.2f} s wall")
    v = report["paper_finding"]
    lines.append("")
    if "reproduced" not in v:
        lines.append("paper finding: not checked (needs --policy random and --policy load_aware)")
    elif not v["checked"]:
        lines.append(f"paper finding ({v['claim']}): not checked — this run is "
                     f"{v['pattern']}, not bursty; here load_aware sent "
                     f"{v['load_aware_cloud_tokens']} and random {v['random_cloud_tokens']} "
                     "tokens to the cloud")
    else:
        word = "REPRODUCED" if v["reproduced"] else "NOT reproduced"
        lines.append(f"paper finding ({v['claim']}): {word} — load_aware "
                     f"{v['load_aware_cloud_tokens']} vs random {v['random_cloud_tokens']} "
                     "cloud tokens")
    return "\n".join(lines)


def _f(x: float | None) -> str:
    return f"{x:>7.2f}" if x is not None else f"{'-':>7}"


def plot(report: Mapping[str, Any], path: str) -> None:
    """Write a figure of a :func:`run` report (needs matplotlib: the ``report`` extra).

    Panels: cloud tokens per policy; cost split into cloud and edge energy; mean utilisation
    per device type; latency p50/p90/p99.

    Raises:
        ImportError: matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    names = [r["policy"] for r in results]
    xs = range(len(names))
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    ax = axes[0]
    ax.bar(xs, [r["cloud_tokens"] / 1e6 for r in results], color="tab:red")
    ax.set_title("tokens sent to the cloud")
    ax.set_ylabel("million tokens")
    ax = axes[1]
    cloud = [r["cloud_cost_usd"] for r in results]
    edge = [r["edge_energy_cost_usd"] for r in results]
    ax.bar(xs, cloud, label="cloud tokens", color="tab:red")
    ax.bar(xs, edge, bottom=cloud, label="edge energy", color="tab:green")
    ax.set_title("cost")
    ax.set_ylabel("USD")
    ax.legend()
    ax = axes[2]
    kinds = sorted({n.rsplit("-", 1)[0] for n in results[0]["utilisation"]})
    width = 0.8 / max(1, len(kinds))
    for k, kind in enumerate(kinds):
        vals = []
        for r in results:
            us = [u for n, u in r["utilisation"].items() if n.rsplit("-", 1)[0] == kind]
            vals.append(sum(us) / len(us))
        ax.bar([x + k * width for x in xs], vals, width, label=kind)
    ax.set_title("mean utilisation (Jain: " + ", ".join(
        f"{r['jain_utilisation']:.2f}" for r in results) + ")")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax = axes[3]
    for q in ("p50", "p90", "p99"):
        ax.plot(list(xs), [r["latency_s"][q] for r in results], marker="o", label=q)
    ax.set_title("end-to-end latency")
    ax.set_ylabel("s")
    ax.legend()
    for ax in axes:
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names)
    cfg = report["config"]
    fig.suptitle(f"{cfg['requests']} requests, {cfg['pattern']} load {cfg['load']}, "
                 f"seed {cfg['seed']}; devices: "
                 + ", ".join(f"{k}×{n}" for k, n in cfg["devices"].items())
                 + (" (presets: approximate public figures)"
                    if any(s.startswith("preset") for s in cfg["device_sources"]) else ""),
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
