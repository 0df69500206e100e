"""``agentctl collect | fleet | route | simulate``: the fleet side's command line (issue 7)."""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click

from agent.cli import EXIT_CONFIG, _fail
from agent.errors import ConfigError

_DEFAULT_DB = "sqlite:///edgelm-fleet.db"


def _broker(url: str, mqtt_version: str = "5") -> Any:
    from agent.mqtt import parse_broker_url

    try:
        return dataclasses.replace(parse_broker_url(url), protocol=int(mqtt_version))
    except ConfigError as exc:
        _fail(str(exc), EXIT_CONFIG)


def _store(db: str, create: bool = True) -> Any:
    from agent.fleet.store import FleetStore

    try:
        return FleetStore(db, create=create)
    except (ConfigError, OSError) as exc:
        _fail(str(exc), EXIT_CONFIG)


def _segment(kind: str, value: str) -> str:
    from agent.protocol import validate_segment

    try:
        return validate_segment(kind, value)
    except ValueError as exc:
        _fail(str(exc), EXIT_CONFIG)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


@click.command("collect")
@click.option("--broker", default="mqtt://127.0.0.1:1883", show_default=True)
@click.option("--fleet", required=True, help="Fleet id (topic segment).")
@click.option("--db", default=_DEFAULT_DB, show_default=True,
              help="sqlite:///path or postgresql://user@host:port/db (needs the 'fleet' extra).")
@click.option("--group", default=None,
              help="Shared-subscription group (default edgelm-collect-FLEET); collectors in "
                   "one group split the load.")
@click.option("--telemetry-every", type=click.FloatRange(min=0), default=10.0,
              show_default=True, help="Store at most one telemetry row per device per N s.")
@click.option("--retention-days", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="Delete telemetry, results and request records older than this (0: keep).")
@click.option("--client-id", default=None,
              help="MQTT client id, the key of the broker-side session (default "
                   "edgelm-collect-FLEET-GROUP-HOSTNAME; give each collector on one host its "
                   "own).")
@click.option("--session-expiry", "session_expiry_s", type=click.IntRange(min=0),
              default=86400, show_default=True,
              help="Seconds the broker keeps queueing results and records for this collector "
                   "while it is down or restarting (0: a clean session, nothing is kept).")
def collect(broker: str, fleet: str, db: str, group: str | None, telemetry_every: float,
            retention_days: float, client_id: str | None, session_expiry_s: int) -> None:
    """Store a fleet's status, telemetry, results, bench and routing records."""
    import socket

    from agent.fleet.collector import FleetCollector

    _segment("--fleet", fleet)
    if client_id is None and session_expiry_s > 0:
        client_id = (f"edgelm-collect-{fleet}-{group or 'default'}-"
                     f"{socket.gethostname().split('.')[0]}")
    if client_id is not None and (not client_id or len(client_id.encode()) > 65535
                                  or any(c in client_id for c in "/+#\0")):
        _fail(f"--client-id {client_id!r}: must be 1-65535 bytes without / + # or NUL",
              EXIT_CONFIG)
    store = _store(db)
    collector = FleetCollector(store, _broker(broker), fleet, group=group,
                               telemetry_every_s=telemetry_every,
                               retention_s=retention_days * 86400 if retention_days else None,
                               client_id=client_id, session_expiry_s=session_expiry_s)
    stop = _stop_on_signals()
    click.echo(f"collecting fleet {fleet} into {store.kind} (schema v{store.version()})",
               err=True)
    collector.run_forever(stop)
    store.close()


def _fmt(v: Any, digits: int = 1, scale: float = 1.0) -> str:
    return "-" if v is None else f"{float(v) * scale:.{digits}f}"


@click.command("fleet")
@click.option("--db", default=_DEFAULT_DB, show_default=True)
@click.option("--fleet", default=None, help="Only this fleet.")
@click.option("--json", "as_json", is_flag=True)
def fleet_cmd(db: str, fleet: str | None, as_json: bool) -> None:
    """Devices, online/offline, power, temperature, load, queue depth, recent TTFT and TGS."""
    from agent.fleet.collector import fleet_view

    store = _store(db, create=False)
    rows = fleet_view(store, fleet)
    store.close()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no devices recorded yet (is `agentctl collect` running?)")
        return
    click.echo(f"{'device':<20} {'state':<8} {'power W':>8} {'temp C':>7} {'cpu %':>6} "
               f"{'load1':>6} {'queue':>5} {'TTFT ms':>8} {'TGS tok/s':>10}")
    for r in rows:
        click.echo(f"{r['device']:<20} {r['state']:<8} {_fmt(r['power_mw'], 2, 1e-3):>8} "
                   f"{_fmt(r['temperature_c']):>7} {_fmt(r['cpu_util_pct'], 0):>6} "
                   f"{_fmt(r['load_1m'], 2):>6} {_fmt(r['queue_depth'], 0):>5} "
                   f"{_fmt(r['recent_ttft_ms'], 0):>8} {_fmt(r['recent_decode_tok_s']):>10}")


@click.command("route")
@click.option("--broker", default="mqtt://127.0.0.1:1883", show_default=True)
@click.option("--fleet", required=True)
@click.option("--router-id", default="router", show_default=True)
@click.option("--policy", type=click.Choice(["random", "weighted", "load_aware"]),
              default="load_aware", show_default=True)
@click.option("--http-port", type=click.IntRange(0, 65535), default=8088, show_default=True,
              help="OpenAI-compatible endpoint on 127.0.0.1 (0: any free port).")
@click.option("--no-http", is_flag=True, help="MQTT ingress only.")
@click.option("--window", "window_s", type=click.FloatRange(min=0.001), default=60.0,
              show_default=True, help="Sliding-window length, s.")
@click.option("--window-requests", type=click.IntRange(min=1), default=None,
              help="Requests per device per window (default: unlimited).")
@click.option("--window-tokens", type=click.IntRange(min=1), default=None,
              help="Prompt+completion tokens per device per window (default: unlimited).")
@click.option("--max-wait", "max_wait_s", type=click.FloatRange(min=0), default=10.0,
              show_default=True, help="Fall back when a device's backlog exceeds this, s.")
@click.option("--max-outstanding", type=click.IntRange(min=1), default=4, show_default=True,
              help="Requests in flight per device.")
@click.option("--attempt-timeout", type=click.FloatRange(min=0.1), default=60.0,
              show_default=True, help="Silence after which a device is considered failed, s.")
@click.option("--max-attempts", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--cloud-url", default=None,
              help="OpenAI-compatible fallback, e.g. https://api.example.com/v1 "
                   "(none: refuse instead of falling back).")
@click.option("--cloud-model", default=None)
@click.option("--cloud-key-env", default=None,
              help="NAME of the environment variable that holds the API key.")
@click.option("--cloud-price-in", type=float, default=0.15, show_default=True,
              help="USD per million prompt tokens.")
@click.option("--cloud-price-out", type=float, default=0.60, show_default=True,
              help="USD per million completion tokens.")
@click.option("--price-per-kwh", type=float, default=0.25, show_default=True)
@click.option("--assumed-power-w", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Estimate edge energy as this board power x service time (labelled "
                   "'assumed') for devices that report no power; default: their energy and "
                   "edge cost are null, with the reason.")
@click.option("--seed", type=int, default=None)
@click.option("--state-dir", type=click.Path(file_okay=False), default=None,
              help="Outbox of accounting records and their sequence counter (default: the "
                   "agent's state directory + router/ROUTER_ID); one router per directory.")
@click.option("--db", default=None,
              help="The collector's database: preload each device's measured decode tok/s "
                   "(latest bench record, else recent results) at start.")
def route(broker: str, fleet: str, router_id: str, policy: str, http_port: int, no_http: bool,
          window_s: float, window_requests: int | None, window_tokens: int | None,
          max_wait_s: float, max_outstanding: int, attempt_timeout: float, max_attempts: int,
          cloud_url: str | None, cloud_model: str | None, cloud_key_env: str | None,
          cloud_price_in: float, cloud_price_out: float, price_per_kwh: float,
          assumed_power_w: float | None, seed: int | None, state_dir: str | None,
          db: str | None) -> None:
    """Edge-first router: MQTT and OpenAI-compatible HTTP in, devices or the cloud out.

    Every request's accounting record is committed to an on-disk outbox before the client
    gets its answer, then published for the collector: a broker outage or a crash of the
    router loses none.
    """
    from agent.daemon import default_state_dir
    from agent.fleet.cloud import CloudConfig
    from agent.fleet.ratelimit import WindowLimits
    from agent.fleet.router import RouterConfig, serve

    _segment("--fleet", fleet)
    _segment("--router-id", router_id)
    if cloud_url:
        from backends.openai import OpenAIBackend

        avail = OpenAIBackend.check()
        if not avail.ok:
            _fail(f"--cloud-url needs the openai backend: {avail.reason}", EXIT_CONFIG)
    config = RouterConfig(
        fleet=fleet, router_id=router_id, policy=policy,
        limits=WindowLimits(window_s, window_requests, window_tokens),
        max_wait_s=max_wait_s, attempt_timeout_s=attempt_timeout, max_attempts=max_attempts,
        max_outstanding=max_outstanding,
        cloud=CloudConfig(cloud_url, cloud_model, cloud_key_env, cloud_price_in,
                          cloud_price_out) if cloud_url else None,
        price_per_kwh=price_per_kwh, assumed_power_w=assumed_power_w,
        http_port=None if no_http else http_port, seed=seed,
        state_dir=Path(state_dir) if state_dir else default_state_dir() / "router" / router_id,
        db=db,
    )
    stop = _stop_on_signals()

    def ready(router: Any) -> None:
        where = f"http://127.0.0.1:{router.http_port}/v1" if router.http_port else "no HTTP"
        click.echo(f"routing fleet {fleet} ({policy}); MQTT {router.ingress_topic}; {where}",
                   err=True)
        click.echo(f"state {router.state_dir}: {router.backlog_at_start} accounting "
                   f"record(s) from before to deliver; speeds preloaded for "
                   f"{len(router.preloaded)} device(s)", err=True)

    try:
        serve(config, _broker(broker), stop, on_ready=ready)
    except ConfigError as exc:
        _fail(str(exc), EXIT_CONFIG)
    except OSError as exc:
        _fail(f"cannot start the router: {exc}", EXIT_CONFIG)


DEFAULT_MIX = "jetson-agx-orin:2,jetson-orin-nano:4,rpi5:10"


@click.command("simulate")
@click.option("--devices", "mix", default=None,
              help="Preset mix NAME:COUNT,… (presets: jetson-agx-orin, jetson-orin-nano, "
                   "rpi5; approximate public figures). Default: "
                   f"{DEFAULT_MIX} without --bench, none with it (the measured devices "
                   "alone; give --devices too to mix them with presets).")
@click.option("--bench", "bench_files", multiple=True, metavar="FILE[:COUNT]",
              help="Device profile from a bench record (agentctl bench --json); repeatable. "
                   "Use FILE:COUNT for several such devices.")
@click.option("--requests", type=click.IntRange(min=1), default=20_000, show_default=True)
@click.option("--users", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--pattern", type=click.Choice(["steady", "bursty"]), default="bursty",
              show_default=True)
@click.option("--load", type=click.FloatRange(min=0.001), default=0.8, show_default=True,
              help="Mean offered load relative to fleet capacity.")
@click.option("--burst-factor", type=click.FloatRange(min=1), default=6.0, show_default=True)
@click.option("--burst-share", type=click.FloatRange(0.001, 0.999), default=0.1,
              show_default=True)
@click.option("--prompt-tokens", type=click.FloatRange(min=1), default=200.0, show_default=True)
@click.option("--completion-tokens", type=click.FloatRange(min=1), default=120.0,
              show_default=True)
@click.option("--token-dist", type=click.Choice(["lognormal", "exponential", "fixed"]),
              default="lognormal", show_default=True)
@click.option("--window", "window_s", type=click.FloatRange(min=0.001), default=60.0,
              show_default=True)
@click.option("--budget-factor", type=click.FloatRange(min=0.001), default=1.0,
              show_default=True, help="Window token budget as a multiple of each device's "
              "sustainable token rate.")
@click.option("--window-requests", type=click.IntRange(min=1), default=None)
@click.option("--max-wait", "max_wait_s", type=click.FloatRange(min=0), default=10.0,
              show_default=True)
@click.option("--attempts", type=click.IntRange(min=1), default=2, show_default=True,
              help="Devices random/weighted ask before falling back.")
@click.option("--policy", "policies", multiple=True,
              type=click.Choice(["random", "weighted", "load_aware"]),
              help="Repeatable (default: all three).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False), default=None,
              help="Also write a figure (PNG/SVG/PDF; needs matplotlib, the 'report' extra).")
def simulate_cmd(mix: str, bench_files: tuple[str, ...], requests: int, users: int,
                 pattern: str, load: float, burst_factor: float, burst_share: float,
                 prompt_tokens: float, completion_tokens: float, token_dist: str,
                 window_s: float, budget_factor: float, window_requests: int | None,
                 max_wait_s: float, attempts: int, policies: tuple[str, ...], seed: int,
                 as_json: bool, plot_file: str | None) -> None:
    """Simulate the fleet policies under steady or bursty load (same code as the router)."""
    from agent.fleet.simulator import (
        SimConfig,
        parse_mix,
        plot,
        profile_from_bench,
        render,
        run,
    )

    try:
        if mix is None:
            mix = "" if bench_files else DEFAULT_MIX
        devices = parse_mix(mix) if mix else []
        for spec in bench_files:
            path, count = spec, "1"
            if not Path(spec).exists() and ":" in spec:
                path, _, count = spec.rpartition(":")
            record = json.loads(Path(path).read_text())
            devices.extend([profile_from_bench(record, Path(path).name)] * int(count))
        cfg = SimConfig(
            devices=tuple(devices), requests=requests, users=users, pattern=pattern, load=load,
            burst_factor=burst_factor, burst_share=burst_share, prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens, token_dist=token_dist, window_s=window_s,
            budget_factor=budget_factor, window_requests=window_requests,
            max_wait_s=max_wait_s, attempts=attempts, seed=seed)
    except (ValueError, OSError) as exc:
        _fail(str(exc), EXIT_CONFIG)
    report = run(cfg, policies or ("random", "weighted", "load_aware"))
    if as_json:
        json.dump(report, sys.stdout, indent=2)
        click.echo()
    else:
        click.echo(render(report))
    if plot_file:
        try:
            plot(report, plot_file)
        except ImportError as exc:
            _fail(f"--plot needs matplotlib (pip install 'edgelm-agent[report]'): {exc}")
        click.echo(f"figure: {plot_file}", err=True)


COMMANDS: tuple[click.Command, ...] = (collect, fleet_cmd, route, simulate_cmd)
