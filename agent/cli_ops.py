"""``agentctl config check`` and ``agentctl outbox``: operator commands for the daemon.

Also turns the merged configuration (file < ``EDGELM_*`` < flags, see :mod:`agent.config`)
into the daemon's :class:`agent.daemon.DaemonConfig` for ``agentctl run``. Errors are
:class:`agent.errors.ConfigError` naming the file or flag and the key; the CLI exits 78
(EX_CONFIG) on them, which the systemd unit lists in ``RestartPreventExitStatus``.

Registered by the last line of :mod:`agent.cli`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from agent.cli import EXIT_CONFIG, _fail, main
from agent.config import DEFAULT_PATH, AgentConfig, load_config
from agent.errors import ConfigError, ModelError

if TYPE_CHECKING:  # the daemon pulls in paho and the backends; import it lazily
    from agent.daemon import DaemonConfig
    from agent.models import ResolvedModel

_FLAG_KEYS = {
    "broker": "mqtt.broker", "fleet": "agent.fleet", "device": "agent.device",
    "state_dir": "agent.state_dir", "backend": "model.backend", "model": "model.name",
    "threads": "model.threads", "context_tokens": "model.context_tokens",
    "mqtt_version": "mqtt.protocol", "telemetry_interval": "telemetry.interval_s",
    "probe_root": "telemetry.probe_root", "probe_names": "telemetry.probes",
    "queue_size": "admission.queue_size",
}


def config_path_of(explicit: str | None, env: Mapping[str, str]) -> tuple[Path, bool]:
    """The config file to read and whether it must exist (named by flag or EDGELM_CONFIG)."""
    if explicit:
        return Path(explicit), True
    if env.get("EDGELM_CONFIG"):
        return Path(env["EDGELM_CONFIG"]), True
    return DEFAULT_PATH, False


def load_from(explicit: str | None, flags: Mapping[str, Any], env: Mapping[str, str]
              ) -> AgentConfig:
    """Load the merged configuration for a command's flags."""
    overrides: dict[str, Any] = {}
    for flag, value in flags.items():
        key = _FLAG_KEYS[flag]
        if value is None or value == ():
            continue
        overrides[key] = int(value) if flag == "mqtt_version" else value
    path, required = config_path_of(explicit, env)
    return load_config(path, env, overrides, required=required)


def check_backend(cfg: AgentConfig) -> None:
    """``model.backend`` must name a registered backend plugin that imports.

    Checked with the rest of the file, so that ``config check`` and a reload refuse a typo
    instead of starting (or reloading) a worker that cannot load anything.

    Raises:
        ConfigError: Naming the file and key, and the backends there are.
    """
    from backends.registry import backend_classes

    known, broken = backend_classes()
    name = cfg.model.backend
    if name in known:
        return
    where = cfg.where("model.backend")
    if name in broken:
        raise ConfigError(f"{where}: model.backend: backend {name!r} cannot be loaded: "
                          f"{broken[name]}")
    raise ConfigError(f"{where}: model.backend: unknown backend {name!r} (registered: "
                      f"{', '.join(sorted(known)) or 'none'})")


def check_identity(cfg: AgentConfig, required: bool = True,
                   skip: frozenset[str] = frozenset()) -> None:
    """``agent.fleet`` and ``agent.device`` are set (when ``required``) and valid segments.

    The error names where the bad value came from (file, variable or flag).

    Raises:
        ConfigError: Naming the origin and key.
    """
    from agent.protocol import validate_segment

    problems: list[str] = []
    for key, value, hint in (("agent.fleet", cfg.agent.fleet, "--fleet or EDGELM_FLEET"),
                             ("agent.device", cfg.agent.device, "--device or EDGELM_DEVICE")):
        if key in skip:  # its value was refused already
            continue
        if not value:
            if required:
                problems.append(f"{cfg.where(key)}: {key} is required ({hint})")
            continue
        try:
            validate_segment(key, value)
        except ValueError as exc:
            problems.append(f"{cfg.where(key)}: {exc}")
    if problems:
        raise ConfigError.of(problems)


def _tls_without_mqtts(cfg: AgentConfig) -> str:
    m = cfg.mqtt
    key = next(k for k, v in (("mqtt.ca_file", m.ca_file), ("mqtt.cert_file", m.cert_file),
                              ("mqtt.key_file", m.key_file)) if v)
    broker_from = ("the default" if "mqtt.broker" not in cfg.origins
                   else f"from {cfg.where('mqtt.broker')}")
    return (f"{cfg.where(key)}: {key} needs an mqtts:// broker URL (mqtt.broker is "
            f"{m.broker!r}, {broker_from})")


def broker_problems(cfg: AgentConfig) -> list[str]:
    """Everything wrong with the ``[mqtt]`` settings as a whole, each naming its origin."""
    from agent.mqtt import parse_broker_url

    m = cfg.mqtt
    problems: list[str] = []
    tls: bool | None = None
    try:
        tls = parse_broker_url(m.broker).tls
    except ConfigError as exc:
        problems.append(f"{cfg.where('mqtt.broker')}: mqtt.broker: {exc}")
    if m.password_file:
        try:
            Path(m.password_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{cfg.where('mqtt.password_file')}: mqtt.password_file: {exc}")
    if tls is False and (m.ca_file or m.cert_file or m.key_file):
        problems.append(_tls_without_mqtts(cfg))
    if m.key_file and not m.cert_file:
        problems.append(f"{cfg.where('mqtt.key_file')}: mqtt.key_file needs mqtt.cert_file")
    return problems


def service_problems(cfg: AgentConfig, *, identity_required: bool,
                     skip: frozenset[str] = frozenset(), verify_model: bool = True,
                     models: list[ResolvedModel] | None = None) -> list[str]:
    """What ``agentctl run`` would refuse in an otherwise well-formed configuration.

    Every check runs, so one pass lists every problem; a check is skipped when a key it
    reads was already refused (``skip``: its value is a default standing in).

    Args:
        cfg: The merged configuration.
        identity_required: fleet and device must be set (``run``); ``config check`` only
            checks their values, since ``run``'s flags may supply them.
        skip: ``section.key`` names whose values were refused.
        verify_model: Hash a known model against its published sha256 (``run``); ``config
            check`` only checks that it resolves.
        models: Receives the resolved model, so ``run`` does not hash it a second time.
    """
    from agent.models import resolve_model
    from backends.base import resolve_threads

    problems: list[str] = []

    def keep(exc: ConfigError) -> None:
        problems.extend(exc.problems)

    try:
        check_identity(cfg, required=identity_required, skip=skip)
    except ConfigError as exc:
        keep(exc)
    if "model.threads" not in skip:
        try:
            resolve_threads(cfg.model.threads)
        except ValueError as exc:
            problems.append(f"{cfg.where('model.threads')}: model.threads: {exc}")
    if "model.backend" not in skip:
        try:
            check_backend(cfg)
        except ConfigError as exc:
            keep(exc)
    if "model.name" not in skip:
        try:
            resolved = resolve_model(cfg.model.name, verify=verify_model)
            if models is not None:
                models.append(resolved)
        except ModelError as exc:
            problems.append(f"{cfg.where('model.name')}: model.name: {exc}")
    if not any(k.startswith("mqtt.") for k in skip):
        problems += broker_problems(cfg)
    if cfg.prometheus.enabled and not {"prometheus.listen", "prometheus.enabled"} & skip:
        from agent.prometheus import parse_listen

        try:
            parse_listen(cfg.prometheus.listen)
        except ConfigError as exc:
            problems.append(f"{cfg.where('prometheus.listen')}: {exc}")
    return problems


def checked_config(explicit: str | None, flags: Mapping[str, Any], env: Mapping[str, str],
                   *, identity_required: bool, verify_model: bool = True,
                   models: list[ResolvedModel] | None = None) -> AgentConfig:
    """Load the configuration and run every check on it, raising all problems at once.

    ``models`` receives the model resolved while checking (see :func:`service_problems`).

    Raises:
        ConfigError: Listing every problem: refused values first, then what ``run`` would
            refuse among the keys that were fine.
    """
    try:
        cfg = load_from(explicit, flags, env)
    except ConfigError as exc:
        if not isinstance(exc.partial, AgentConfig):
            raise
        raise ConfigError.of(exc.problems + service_problems(
            exc.partial, identity_required=identity_required, skip=exc.bad_keys,
            verify_model=False)) from None
    problems = service_problems(cfg, identity_required=identity_required,
                                verify_model=verify_model, models=models)
    if problems:
        raise ConfigError.of(problems)
    return cfg


def broker_config_of(cfg: AgentConfig) -> Any:
    """The :class:`agent.mqtt.BrokerConfig` for ``cfg`` (reads ``mqtt.password_file``).

    Raises:
        ConfigError: Inconsistent TLS settings or an unreadable password file.
    """
    from agent.mqtt import parse_broker_url

    m = cfg.mqtt
    problems = broker_problems(cfg)
    if problems:
        raise ConfigError.of(problems)
    base = parse_broker_url(m.broker)
    password = m.password
    if m.password_file:
        try:
            password = Path(m.password_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:  # changed since broker_problems read it
            raise ConfigError(f"{cfg.where('mqtt.password_file')}: mqtt.password_file: "
                              f"{exc}") from None
    return dataclasses.replace(
        base, protocol=m.protocol, keepalive_s=m.keepalive_s,
        username=m.username if m.username is not None else base.username,
        password=password if password is not None else base.password,
        ca_file=m.ca_file, cert_file=m.cert_file, key_file=m.key_file,
        reconnect_min_s=m.reconnect_min_s, reconnect_max_s=m.reconnect_max_s,
        connect_timeout_s=m.connect_timeout_s, max_packet_bytes=m.max_packet_bytes,
    )


def daemon_config_from(explicit: str | None, flags: Mapping[str, Any],
                       env: Mapping[str, str]) -> DaemonConfig:
    """Everything ``agentctl run`` needs, from file, environment and flags.

    Raises:
        ConfigError: Every problem, each naming the file/flag/variable and key (a model that
            cannot be resolved or fails verification included).
    """
    from agent.daemon import DaemonConfig, default_state_dir
    from agent.outbox import OutboxConfig
    from backends.base import resolve_threads

    models: list[ResolvedModel] = []  # resolved (and hashed) once, by the check
    cfg = checked_config(explicit, flags, env, identity_required=True, models=models)
    assert cfg.agent.fleet and cfg.agent.device and models  # checked just above
    resolved = models[0]
    try:
        n_threads, how = resolve_threads(cfg.model.threads)
    except ValueError as exc:  # checked just above; a CPU set can change meanwhile
        raise ConfigError(f"{cfg.where('model.threads')}: model.threads: {exc}") from None
    a, o = cfg.admission, cfg.outbox
    return DaemonConfig(
        broker=broker_config_of(cfg), fleet=cfg.agent.fleet, device=cfg.agent.device,
        state_dir=Path(cfg.agent.state_dir) if cfg.agent.state_dir else default_state_dir(),
        backend=cfg.model.backend, model=resolved, threads=n_threads, threads_how=how,
        context_tokens=cfg.model.context_tokens,
        stream_batch_ms=cfg.model.stream_batch_ms, worker_nice=cfg.model.worker_nice,
        telemetry_interval_s=cfg.telemetry.interval_s, probe_root=cfg.telemetry.probe_root,
        probe_names=cfg.telemetry.probes or None,
        admission=a,
        outbox=OutboxConfig(max_bytes=o.max_bytes, ttl_s=o.ttl_s, drop_policy=o.drop_policy,
                            replay_rate_per_s=o.replay_rate_per_s,
                            inflight_window=o.inflight_window, synchronous=o.synchronous),
        telemetry_via_outbox=o.telemetry,
        fast_interval_s=cfg.telemetry.fast_interval_s,
        energy_min_coverage=cfg.energy.min_coverage,
        baseline_window_s=cfg.energy.baseline_window_s,
        baseline_every_s=cfg.energy.baseline_every_s,
        log_content=cfg.agent.log_content,
        log_level=cfg.agent.log_level,
        prometheus_listen=cfg.prometheus.listen if cfg.prometheus.enabled else None,
    )


def daemon_config_loader(explicit: str | None, flags: Mapping[str, Any]
                         ) -> Callable[[], DaemonConfig]:
    """What ``cmd/reload`` and SIGHUP call: the same file and flags, the environment now.

    The flags are copied: a reload re-applies exactly what the daemon was started with, so a
    ``--broker`` given on the command line still wins over the file after a reload.
    """
    saved = dict(flags)

    def load() -> DaemonConfig:
        return daemon_config_from(explicit, saved, os.environ)

    return load


@main.group("config")
def config_group() -> None:
    """Check the agent's configuration."""


@config_group.command("check")
@click.option("--config", "config_path", type=click.Path(), default=None,
              help="TOML config (default: $EDGELM_CONFIG or /etc/edgelm/agent.toml).")
@click.option("--json", "as_json", is_flag=True, help="Print the merged config as JSON.")
def config_check(config_path: str | None, as_json: bool) -> None:
    """Validate the file and EDGELM_* variables; print the merged result (secrets hidden).

    Exits 78 listing every problem found, each naming the file (or variable, or flag) and key.
    """
    from agent.config import ignored_env

    env = dict(os.environ)
    for name in ignored_env(env):  # a typo in the section part configures nothing
        click.echo(f"agentctl: warning: {name} is ignored: no configuration key has that name "
                   "(EDGELM_<SECTION>_<KEY>, e.g. EDGELM_MODEL_THREADS)", err=True)
    try:
        # fleet and device may come from `run`'s flags, so only their values are checked;
        # a known model is found, not hashed (run verifies it)
        cfg = checked_config(config_path, {}, env, identity_required=False,
                             verify_model=False)
    except ConfigError as exc:
        _fail(str(exc), EXIT_CONFIG)
    if as_json:
        click.echo(json.dumps(cfg.redacted(), indent=2))
        return
    path, _ = config_path_of(config_path, env)
    click.echo(f"config OK ({cfg.source or f'{path} not present; defaults and environment'})")
    for section, values in cfg.redacted().items():
        if section == "source":
            continue
        for key, value in values.items():
            click.echo(f"  {section}.{key} = {json.dumps(value)}")


@main.group("outbox")
def outbox_group() -> None:
    """Inspect the daemon's outbox (results waiting for the broker)."""


@outbox_group.command("stats")
@click.option("--state-dir", type=click.Path(file_okay=False), default=None,
              help="State directory (default: as agentctl run).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of a table.")
def outbox_stats(state_dir: str | None, as_json: bool) -> None:
    """Print how many messages wait in the outbox, by kind, with the oldest one's age."""
    import sqlite3

    from agent.daemon import default_state_dir

    path = Path(state_dir or default_state_dir()) / "outbox.sqlite3"
    if not path.exists():
        _fail(f"no outbox at {path}")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT kind, COUNT(*), SUM(size), MIN(created_unix_ms) FROM outbox "
                          "GROUP BY kind ORDER BY kind").fetchall()
    except sqlite3.Error as exc:
        _fail(f"{path}: {exc}")
    finally:
        db.close()
    if as_json:
        click.echo(json.dumps({"path": str(path), "kinds": [
            {"kind": k, "depth": n, "bytes": b, "oldest_unix_ms": t} for k, n, b, t in rows]}))
        return
    import time

    click.echo(f"outbox {path}")
    if not rows:
        click.echo("  empty: everything has been delivered to the broker")
        return
    click.echo(f"  {'kind':<12} {'waiting':>8} {'bytes':>12} {'oldest':>12}")
    now_ms = time.time() * 1000
    for kind, n, size, oldest in rows:
        click.echo(f"  {kind:<12} {n:>8,} {int(size or 0):>12,} "
                   f"{max(0.0, (now_ms - oldest) / 1000):>10.1f} s")
