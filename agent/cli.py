"""``agentctl``: the command line of edgelm-agent. The only module that knows about click.

Exit codes: 0 success, 1 runtime failure, 2 usage error (click), 78 configuration error
(EX_CONFIG from sysexits.h, listed in the systemd unit's ``RestartPreventExitStatus`` so a
bad config does not restart-loop).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, NoReturn

import click

import agent
from agent.errors import AgentError, ConfigError, ModelError
from backends.base import BackendError

EXIT_CONFIG = 78

logger = logging.getLogger("agent")


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"agentctl: error: {message}", err=True)
    sys.exit(code)


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * verbose
    # journald adds its own timestamps; keep ours off when running under systemd.
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=max(level, logging.DEBUG), format=fmt, stream=sys.stderr)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(agent.__version__, prog_name="agentctl")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """edgelm-agent: serve small language models on edge devices, measure what they cost."""
    _setup_logging(verbose)


def _resolve(model: str) -> Any:
    from agent.models import resolve_model

    try:
        return resolve_model(model)
    except ModelError as exc:
        _fail(str(exc), EXIT_CONFIG)


def _threads(value: str) -> tuple[int, str]:
    from backends.base import resolve_threads

    try:
        return resolve_threads(value)
    except ValueError as exc:
        _fail(f"--threads: {exc}", EXIT_CONFIG)


# ---------------------------------------------------------------------------------- bench


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


# ---------------------------------------------------------------------------------- infer


@main.command()
@click.argument("prompt")
@click.option("--backend", default="llamacpp", show_default=True)
@click.option("--model", default="smollm2-135m", show_default=True)
@click.option("--max-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True)
@click.option("--system", default=None, help="System message.")
@click.option("--threads", default="auto", show_default=True)
@click.option("--stats/--no-stats", default=False, help="Print timings to stderr afterwards.")
def infer(
    prompt: str, backend: str, model: str, max_tokens: int, temperature: float,
    system: str | None, threads: str, stats: bool,
) -> None:
    """Stream a completion of PROMPT (a chat message) to stdout."""
    from agent.generation import run_generation
    from agent.worker import InferenceWorker, WorkerConfig
    from backends.base import BackendOptions, GenerationRequest, ModelSpec, TokenEvent

    resolved = _resolve(model)
    n_threads, _ = _threads(threads)
    messages: list[dict[str, str]] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": prompt})
    worker = InferenceWorker(WorkerConfig(
        backend=backend,
        model=ModelSpec(resolved.name, resolved.path, resolved.format, resolved.sha256),
        options=BackendOptions(threads=n_threads),
    ))

    def echo(event: TokenEvent) -> None:
        if event.text:
            sys.stdout.write(event.text)
            sys.stdout.flush()

    try:
        worker.start()
        accepted = time.monotonic_ns()
        result = run_generation(
            worker,
            GenerationRequest(messages=tuple(messages), max_tokens=max_tokens,
                              temperature=temperature),
            accepted_ns=accepted, on_event=echo,
        )
    except BackendError as exc:
        _fail(f"{exc.code}: {exc.message}")
    finally:
        worker.stop()
    sys.stdout.write("\n")
    if stats:
        t = result.timings
        click.echo(
            f"[{result.prompt_tokens} prompt + {result.completion_tokens} completion tokens, "
            f"finish={result.finish_reason}, TTFT {_fmt(t.ttft_ms)} ms, "
            f"decode {_fmt(t.decode_tok_s)} tok/s, e2e {_fmt(t.e2e_ms)} ms]",
            err=True,
        )


# ---------------------------------------------------------------------------------- probes


@main.group()
def probes() -> None:
    """Inspect the hardware probes."""


@probes.command("list")
@click.option("--root", default="/", show_default=True, help="Filesystem root (fixture trees).")
@click.option("--json", "as_json", is_flag=True)
def probes_list(root: str, as_json: bool) -> None:
    """Show every registered probe, available or not, with the reason."""
    from probes.registry import available_probe_classes

    classes, errors = available_probe_classes()
    rows: list[dict[str, Any]] = []
    for name, cls in sorted(classes.items()):
        try:
            avail = cls(root=root).check()
            rows.append({"probe": name, "ok": avail.ok, "degraded": avail.degraded,
                         "reason": avail.reason})
        except Exception as exc:  # a plugin bug must not hide the other probes
            rows.append({"probe": name, "ok": False, "degraded": False,
                         "reason": f"check failed: {type(exc).__name__}: {exc}"})
    for name, err in sorted(errors.items()):
        rows.append({"probe": name, "ok": False, "degraded": False,
                     "reason": f"plugin failed to load: {err}"})
    if as_json:
        click.echo(json.dumps(rows))
        return
    for row in rows:
        state = "unavailable"
        if row["ok"]:
            state = "degraded" if row["degraded"] else "ok"
        click.echo(f"{row['probe']:<12} {state:<12} {row['reason']}")


@probes.command("sample")
@click.option("--root", default="/", show_default=True, help="Filesystem root (fixture trees).")
@click.option("--interval", type=click.FloatRange(min=0.01), default=1.0, show_default=True,
              help="Seconds between samples.")
@click.option("--count", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--probe", "names", multiple=True, help="Only these probes (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per sample line.")
def probes_sample(root: str, interval: float, count: int, names: tuple[str, ...],
                  as_json: bool) -> None:
    """Sample the available probes COUNT times, INTERVAL seconds apart."""
    from probes.base import ProbeError, readings_as_dict
    from probes.registry import create_probes

    try:
        active = [p for p in create_probes(list(names) or None, root) if p.check().ok]
    except ProbeError as exc:
        _fail(str(exc), EXIT_CONFIG)
    deadline = time.monotonic()
    for i in range(count):
        if i:
            deadline += interval
            time.sleep(max(0.0, deadline - time.monotonic()))
        out: dict[str, Any] = {"ts_unix_ms": int(time.time() * 1000), "probes": {}, "errors": {}}
        for p in active:
            try:
                out["probes"][p.name] = readings_as_dict(p.sample())
            except Exception as exc:  # one failing probe must not hide the others
                out["errors"][p.name] = f"{type(exc).__name__}: {exc}"
        if as_json:
            click.echo(json.dumps(out))
        else:
            for name, readings in out["probes"].items():
                click.echo(f"[{i}] {name}: {json.dumps(readings)}")
            for name, err in out["errors"].items():
                click.echo(f"[{i}] {name}: ERROR {err}")
    for p in active:
        p.close()


def run_main() -> None:
    """Console entry with AgentError mapping (kept separate for tests)."""
    try:
        main(standalone_mode=True)
    except ConfigError as exc:
        _fail(str(exc), EXIT_CONFIG)
    except AgentError as exc:
        _fail(str(exc))


# ---------------------------------------------------------------------------------- run


@main.command()
@click.option("--config", "config_path", type=click.Path(), default=None,
              help="TOML config (default: $EDGELM_CONFIG or /etc/edgelm/agent.toml if present).")
@click.option("--broker", default=None,
              help="mqtt://[user:pass@]host[:port] or mqtts://… (TLS) [mqtt://127.0.0.1:1883].")
@click.option("--fleet", default=None, help="Fleet id (topic segment); agent.fleet.")
@click.option("--device", default=None, help="Device id (topic segment); agent.device.")
@click.option("--state-dir", type=click.Path(file_okay=False), default=None,
              help="State directory (default: $STATE_DIRECTORY, /var/lib/edgelm or "
                   "~/.local/state/edgelm).")
@click.option("--backend", default=None, help="[llamacpp]")
@click.option("--model", default=None, help="[smollm2-135m]")
@click.option("--threads", default=None, help="[auto]")
@click.option("--ctx", "context_tokens", type=click.IntRange(min=16), default=None,
              help="[2048]")
@click.option("--mqtt-version", type=click.Choice(["5", "3"]), default=None,
              help="MQTT protocol: 5, or 3 for 3.1.1. [5]")
@click.option("--telemetry-interval", type=click.FloatRange(min=0.05), default=None,
              help="Seconds between telemetry messages. [1.0]")
@click.option("--probe-root", default=None,
              help="Filesystem root for probes (fixture trees in tests). [/]")
@click.option("--probe", "probe_names", multiple=True, help="Enable only these probes.")
@click.option("--queue-size", type=click.IntRange(min=0), default=None, help="[16]")
def run(config_path: str | None, **flags: Any) -> None:
    """Run the agent daemon in the foreground (systemd runs exactly this).

    Settings come from the config file, then EDGELM_* variables, then these flags. SIGHUP
    (systemctl reload) or cmd/reload reads them again the same way and applies what can
    change while running.
    """
    import signal

    # SIGHUP's default action ends the process, and systemd counts a death by SIGHUP as a
    # clean exit (Restart=on-failure does not restart it). Reading the configuration,
    # hashing the model and building the daemon take seconds: a reload asked for meanwhile
    # is remembered and done once the daemon runs (run_forever installs its own handler).
    early_reload: list[bool] = []
    signal.signal(signal.SIGHUP, lambda *_: early_reload.append(True))
    # Likewise SIGTERM/SIGINT (systemctl stop, Ctrl-C while the model is hashed): the default
    # action would end the process by the signal; remembered, the agent exits 0 once built.
    early_stop: list[bool] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: early_stop.append(True))
    # A service's lifecycle (worker ready, broker connected, reloads, stop) belongs in its
    # journal: the daemon logs at INFO unless -v or agent.log_level says otherwise. Request
    # content is logged only with agent.log_content.
    if logging.getLogger().level == logging.WARNING:
        logging.getLogger().setLevel(logging.INFO)

    from agent.cli_ops import daemon_config_from, daemon_config_loader
    from agent.daemon import AgentDaemon
    from probes.base import ProbeError

    try:
        config = daemon_config_from(config_path, flags, os.environ)
    except (ConfigError, ModelError) as exc:
        _fail(str(exc), EXIT_CONFIG)
    try:
        daemon = AgentDaemon(config, reload_config=daemon_config_loader(config_path, flags))
    except (OSError, ProbeError, ValueError, ConfigError) as exc:
        _fail(f"cannot start: {exc}", EXIT_CONFIG)
    sys.exit(daemon.run_forever(reload_pending=lambda: bool(early_reload),
                                stop_pending=lambda: bool(early_stop)))


from agent.cli_bench import bench as _bench_group  # noqa: E402  (registers after main exists)

main.add_command(_bench_group, name="bench")

from agent.cli_models import models_group  # noqa: E402  (registers after main exists)

main.add_command(models_group)

from agent import cli_ops as _cli_ops  # noqa: E402,F401  (registers config/outbox commands)
from agent.cli_fleet import COMMANDS as _FLEET_COMMANDS  # noqa: E402  (fleet commands)

for _command in _FLEET_COMMANDS:
    main.add_command(_command)

from agent import cli_report as _cli_report  # noqa: E402  (registers after main exists)

main.add_command(_cli_report.report, name="report")
