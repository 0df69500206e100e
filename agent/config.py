"""The agent's configuration: one TOML file, ``EDGELM_*`` overrides, CLI flags (DESIGN.md §7).

Rules embodied here:

- precedence: built-in defaults < ``/etc/edgelm/agent.toml`` (or ``--config``) <
  environment ``EDGELM_<SECTION>_<KEY>`` (plus the short aliases ``EDGELM_BROKER``,
  ``EDGELM_FLEET``, ``EDGELM_DEVICE``) < command-line flags;
- parsing is **pure**: it reads the one file it is given and the mapping of environment
  variables it is passed, and touches no hardware, network or other file (a password file is
  named here and read by the CLI when the daemon starts);
- an unknown section or key, or a value of the wrong type or range, is a
  :class:`agent.errors.ConfigError` naming the file (or variable, or flag) and the key;
  the CLI exits 78 (EX_CONFIG), which the systemd unit lists in ``RestartPreventExitStatus``.

See ``systemd/agent.toml.example`` for every key with its default and meaning.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.admission import AdmissionConfig as AdmissionSection  # one definition: [admission]
from agent.errors import ConfigError, short_repr

DEFAULT_PATH = Path("/etc/edgelm/agent.toml")
ENV_PREFIX = "EDGELM_"
ENV_ALIASES = {"EDGELM_BROKER": "mqtt.broker", "EDGELM_FLEET": "agent.fleet",
               "EDGELM_DEVICE": "agent.device"}
# EDGELM_* variables that are not configuration keys: read by install.sh, the model cache,
# the tests or a backend. Any other EDGELM_ name that maps to no section is likely a typo.
OTHER_ENV = frozenset({
    "EDGELM_CONFIG", "EDGELM_HOME", "EDGELM_LLAMA_CMAKE_ARGS", "EDGELM_TOOLS_PYTHON",
    "EDGELM_TOOLS_OPTIMUM_PYTHON", "EDGELM_TORCH_WHEEL_DIR", "EDGELM_TEST_MODELS",
    "EDGELM_OPENAI_BASE_URL",
})


@dataclass(frozen=True)
class AgentSection:
    """``[agent]``: identity and state."""

    fleet: str | None = None
    device: str | None = None
    state_dir: str | None = None
    log_content: bool = False
    log_level: str | None = None


@dataclass(frozen=True)
class MqttSection:
    """``[mqtt]``: the broker connection."""

    broker: str = "mqtt://127.0.0.1:1883"
    protocol: int = 5
    keepalive_s: int = 30
    username: str | None = None
    password: str | None = None
    password_file: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 30.0
    connect_timeout_s: float = 10.0
    max_packet_bytes: int = 16 * 1024 * 1024


@dataclass(frozen=True)
class ModelSection:
    """``[model]``: what to serve."""

    backend: str = "llamacpp"
    name: str = "smollm2-135m"
    threads: str = "auto"
    context_tokens: int = 2048
    stream_batch_ms: int = 50
    worker_nice: int = 0


@dataclass(frozen=True)
class OutboxSection:
    """``[outbox]``: the durable result queue (see :mod:`agent.outbox`)."""

    max_bytes: int = 64 * 1024 * 1024
    ttl_s: float = 7 * 24 * 3600.0
    drop_policy: str = "drop_oldest"
    replay_rate_per_s: float = 2000.0
    inflight_window: int = 64
    synchronous: str = "normal"
    telemetry: bool = False


@dataclass(frozen=True)
class TelemetrySection:
    """``[telemetry]``: probes and sampling."""

    interval_s: float = 1.0
    probe_root: str = "/"
    probes: tuple[str, ...] = ()
    fast_interval_s: float = 0.1


@dataclass(frozen=True)
class EnergySection:
    """``[energy]``: per-request energy accounting."""

    min_coverage: float = 0.9
    baseline_window_s: float = 10.0
    baseline_every_s: float = 600.0


@dataclass(frozen=True)
class PrometheusSection:
    """``[prometheus]``: the text endpoint (off by default; loopback by default)."""

    enabled: bool = False
    listen: str = "127.0.0.1:9464"


@dataclass(frozen=True)
class AgentConfig:
    """The whole configuration, and where it came from."""

    agent: AgentSection = field(default_factory=AgentSection)
    mqtt: MqttSection = field(default_factory=MqttSection)
    model: ModelSection = field(default_factory=ModelSection)
    admission: AdmissionSection = field(default_factory=AdmissionSection)
    outbox: OutboxSection = field(default_factory=OutboxSection)
    telemetry: TelemetrySection = field(default_factory=TelemetrySection)
    energy: EnergySection = field(default_factory=EnergySection)
    prometheus: PrometheusSection = field(default_factory=PrometheusSection)
    source: str | None = None
    # "section.key" -> where its value came from (file path, "environment EDGELM_…",
    # "flag for section.key"); keys left at their defaults are absent
    origins: Mapping[str, str] = field(default_factory=dict, compare=False)

    def where(self, *keys: str) -> str:
        """Where the first of ``keys`` that was set came from, for an error message."""
        for key in keys:
            if key in self.origins:
                return self.origins[key]
        return self.source or "config"

    def redacted(self) -> dict[str, Any]:
        """The configuration as a dict with secrets replaced (for ``agentctl config check``)."""
        out: dict[str, Any] = {}
        for name in _SECTIONS:
            sec = dataclasses.asdict(getattr(self, name))
            if name == "mqtt" and sec.get("password"):
                sec["password"] = "***"
            if name == "mqtt" and "@" in sec["broker"]:
                scheme, _, rest = sec["broker"].partition("://")
                sec["broker"] = f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
            out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in sec.items()}
        out["source"] = self.source
        return out


_SECTIONS: dict[str, type[Any]] = {
    "agent": AgentSection, "mqtt": MqttSection, "model": ModelSection,
    "admission": AdmissionSection, "outbox": OutboxSection, "telemetry": TelemetrySection,
    "energy": EnergySection, "prometheus": PrometheusSection,
}


def _positive(v: float) -> str | None:
    return None if v > 0 else "must be > 0"


def _non_negative(v: float) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _one_of(*allowed: Any) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in allowed else f"must be one of {', '.join(map(str, allowed))}"
    return check


def _between(lo: float, hi: float) -> Callable[[float], str | None]:
    def check(v: float) -> str | None:
        return None if lo <= v <= hi else f"must be in [{lo}, {hi}]"
    return check


def _threads(v: str) -> str | None:
    # isascii: str.isdigit() is true for '²' and '٣', which int() then refuses or reads
    if v == "auto" or (v.isascii() and v.isdigit() and int(v) >= 1):
        return None
    return "must be 'auto' or a positive integer"


# Extra range checks beyond the type (section.key -> check returning an error or None).
_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "mqtt.protocol": _one_of(3, 5),
    "mqtt.keepalive_s": _between(1, 65535),
    "mqtt.reconnect_min_s": _positive,
    "mqtt.reconnect_max_s": _positive,
    "mqtt.connect_timeout_s": _positive,
    "mqtt.max_packet_bytes": _non_negative,
    "agent.log_level": _one_of("debug", "info", "warning", "error"),
    "model.threads": _threads,
    "model.context_tokens": _between(16, 1 << 20),
    "model.stream_batch_ms": _between(0, 1000),
    "model.worker_nice": _between(0, 19),
    "admission.queue_size": _non_negative,
    "admission.concurrency": _between(1, 64),
    "admission.max_payload_bytes": _between(256, 256 * 1024 * 1024),
    "admission.rate_limit": _non_negative,
    "admission.rate_window_s": _positive,
    "admission.default_deadline_ms": _non_negative,
    "admission.idempotency_ttl_s": _positive,
    "admission.idempotency_max_entries": _between(1, 10_000_000),
    "outbox.max_bytes": _between(1024, 1 << 40),
    "outbox.ttl_s": _positive,
    "outbox.drop_policy": _one_of("drop_oldest", "reject_new"),
    "outbox.replay_rate_per_s": _positive,
    "outbox.inflight_window": _between(1, 65535),
    "outbox.synchronous": _one_of("normal", "full"),
    "telemetry.interval_s": _between(0.05, 3600),
    "telemetry.fast_interval_s": _between(0.01, 60),
    "energy.min_coverage": _between(0.0, 1.0),
    "energy.baseline_window_s": _positive,
    "energy.baseline_every_s": _positive,
}


def _field_types(cls: type[Any]) -> dict[str, str]:
    return {f.name: str(f.type) for f in dataclasses.fields(cls)}


def _coerce(where: str, key: str, ftype: str, value: Any, from_text: bool) -> Any:
    """Check (and, for env strings, convert) one value against its declared type."""
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{where}: {key}: expected {expected}, got {_shown(value)}")

    optional = "None" in ftype
    if from_text and optional and value == "":
        return None
    if value is None and optional:
        return None
    base = ftype.replace(" | None", "")
    if base == "bool":
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str) and value.lower() in (
                "1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise bad("true or false")
    if base == "int":
        if from_text and isinstance(value, str):
            if not value.strip().isascii():  # int() reads '٥٠' as 50
                raise bad("an integer")
            try:
                return int(value)
            except ValueError:
                raise bad("an integer") from None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad("an integer")
    if base == "float":
        number: float | None = None
        if from_text and isinstance(value, str) and value.strip().isascii():
            try:
                number = float(value)
            except ValueError:
                number = None
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        # TOML and float() both read inf and nan; no setting means "forever" that way
        if number is None or not math.isfinite(number):
            raise bad("a finite number")
        return number
    if base == "str":
        if key.endswith(".threads") and isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, str):
            return value
        raise bad("a string")
    if base == "tuple[str, ...]":
        if from_text and isinstance(value, str):
            return tuple(p.strip() for p in value.split(",") if p.strip())
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise bad("a list of strings")
    raise ConfigError(f"{where}: {key}: unsupported type {ftype}")  # pragma: no cover


def _apply(
    values: dict[str, dict[str, Any]], where: str, section: str, key: str, value: Any,
    from_text: bool,
) -> None:
    cls = _SECTIONS.get(section)
    if cls is None:
        raise ConfigError(f"{where}: unknown section [{section}] "
                          f"(known: {', '.join(_SECTIONS)})")
    types = _field_types(cls)
    if key not in types:
        raise ConfigError(f"{where}: unknown key {section}.{key} "
                          f"(known in [{section}]: {', '.join(types)})")
    full = f"{section}.{key}"
    coerced = _coerce(where, full, types[key], value, from_text)
    check = _CHECKS.get(full)
    if coerced is not None and check is not None:
        problem = check(coerced)
        if problem:
            raise ConfigError(f"{where}: {full} {problem}, got {_shown(value)}")
    values.setdefault(section, {})[key] = coerced


def _shown(value: Any) -> str:
    """``value`` as the user wrote it (TOML spelling for booleans), cut for a message."""
    return ("true" if value else "false") if isinstance(value, bool) else short_repr(value)


def _collect(problems: list[str] | None, exc: ConfigError) -> None:
    """Record ``exc`` in ``problems``, or raise it when the caller collects nothing."""
    if problems is None:
        raise exc
    problems.extend(exc.problems)


def parse_toml(text: str, where: str, problems: list[str] | None = None,
               bad_keys: set[str] | None = None) -> dict[str, dict[str, Any]]:
    """Validate TOML text into ``{section: {key: value}}`` (no defaults filled in).

    ``problems``, when given, receives every bad key (and the bad keys are left out) instead
    of the first one being raised; ``bad_keys`` receives their ``section.key`` names.

    Raises:
        ConfigError: Naming ``where`` and the offending key (TOML syntax errors always raise:
            nothing after them can be read).
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    values: dict[str, dict[str, Any]] = {}
    for section, body in doc.items():
        if not isinstance(body, dict):
            _collect(problems, ConfigError(
                f"{where}: top-level key {section!r} must be a [section]"))
            continue
        if section not in _SECTIONS:  # once per section, not once per key in it
            _collect(problems, ConfigError(f"{where}: unknown section [{section}] "
                                           f"(known: {', '.join(_SECTIONS)})"))
            continue
        for key, value in body.items():
            try:
                if isinstance(value, dict):
                    raise ConfigError(f"{where}: {section}.{key}: nested tables are not allowed")
                _apply(values, where, section, key, value, from_text=False)
            except ConfigError as exc:
                _collect(problems, exc)
                if bad_keys is not None:
                    bad_keys.add(f"{section}.{key}")
    return values


def ignored_env(env: Mapping[str, str]) -> list[str]:
    """``EDGELM_*`` names that configure nothing (e.g. ``EDGELM_MODLE_THREADS``), sorted."""
    out = []
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or name in ENV_ALIASES or name in OTHER_ENV:
            continue
        section, _, key = name[len(ENV_PREFIX):].lower().partition("_")
        if section not in _SECTIONS or not key:
            out.append(name)
    return out


def env_values(env: Mapping[str, str], origins: dict[str, str] | None = None,
               problems: list[str] | None = None, bad_keys: set[str] | None = None
               ) -> dict[str, dict[str, Any]]:
    """``EDGELM_<SECTION>_<KEY>`` overrides; variables of unknown sections are ignored.

    ``origins``, when given, receives ``"section.key" -> "environment NAME"``; ``problems``,
    when given, receives every bad variable instead of the first one being raised.

    Raises:
        ConfigError: A variable names a known section but an unknown key, or a bad value.
    """
    values: dict[str, dict[str, Any]] = {}
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX):
            continue
        where = f"environment {name}"
        if name in ENV_ALIASES:
            section, key = ENV_ALIASES[name].split(".")
        else:
            rest = name[len(ENV_PREFIX):].lower()
            section, _, key = rest.partition("_")
            if section not in _SECTIONS or not key:
                continue  # e.g. EDGELM_LLAMA_CMAKE_ARGS (install.sh), EDGELM_CONFIG
        try:
            _apply(values, where, section, key, env[name], from_text=True)
        except ConfigError as exc:
            _collect(problems, exc)
            if bad_keys is not None:
                bad_keys.add(f"{section}.{key}")
            continue
        if origins is not None:
            origins[f"{section}.{key}"] = where
    return values


def load_config(
    path: Path | None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    required: bool = False,
) -> AgentConfig:
    """Build the configuration from a file, the environment and flag overrides.

    Args:
        path: The TOML file; a missing file is an error only when ``required``.
        env: Environment variables (pass ``os.environ``); None for none.
        overrides: ``{"section.key": value}`` from command-line flags (None values skipped).
        required: The file was named explicitly (``--config``), so it must exist.

    Raises:
        ConfigError: Naming the file, variable or flag and the key; every problem found in
            one pass (``problems`` lists them), so one run shows all the mistakes.
    """
    problems: list[str] = []
    bad_keys: set[str] = set()
    file_read = True  # False: the file's values are unknown, so no partial configuration
    layers: list[tuple[dict[str, dict[str, Any]], Mapping[str, str] | str]] = []
    source = None
    if path is not None:
        text: str | None = None
        try:
            # utf-8-sig: a byte-order mark (Windows editors) is not a TOML error
            text = path.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            if required:
                problems.append(f"{path}: config file not found")
                file_read = False
        except IsADirectoryError:
            problems.append(f"{path}: is a directory, not a config file")
            file_read = False
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{path}: cannot read: {exc}")
            file_read = False
        if text is not None:
            try:
                layers.append((parse_toml(text, str(path), problems, bad_keys), str(path)))
                source = str(path)
            except ConfigError as exc:  # not TOML at all: the environment is still checked
                problems.extend(exc.problems)
                file_read = False
    env_origins: dict[str, str] = {}
    layers.append((env_values(env or {}, env_origins, problems, bad_keys), env_origins))
    flag_values: dict[str, dict[str, Any]] = {}
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        try:
            _apply(flag_values, f"flag for {dotted}", section, key, value, from_text=False)
        except ConfigError as exc:
            problems.append(str(exc))
            bad_keys.add(dotted)
    layers.append((flag_values, {f"{sec}.{k}": f"flag for {sec}.{k}"
                                 for sec, kv in flag_values.items() for k in kv}))
    merged: dict[str, dict[str, Any]] = {}
    origins: dict[str, str] = {}
    for layer, origin in layers:
        for section, kv in layer.items():
            merged.setdefault(section, {}).update(kv)
            for key in kv:
                dotted = f"{section}.{key}"
                origins[dotted] = origin if isinstance(origin, str) else origin[dotted]
    sections = {name: cls(**merged.get(name, {})) for name, cls in _SECTIONS.items()}
    cfg = AgentConfig(**sections, source=source, origins=origins)
    # Cross-key checks, each only when its keys' values were accepted (a default standing in
    # for a refused value would be judged instead).
    m = cfg.mqtt
    if ({"mqtt.reconnect_min_s", "mqtt.reconnect_max_s"}.isdisjoint(bad_keys)
            and m.reconnect_max_s < m.reconnect_min_s):
        problems.append(f"{cfg.where('mqtt.reconnect_max_s', 'mqtt.reconnect_min_s')}: "
                        f"mqtt.reconnect_max_s ({m.reconnect_max_s:g}) must be >= "
                        f"mqtt.reconnect_min_s ({m.reconnect_min_s:g})")
    if m.password is not None and m.password_file is not None:
        problems.append(f"{cfg.where('mqtt.password_file', 'mqtt.password')}: set "
                        "mqtt.password or mqtt.password_file, not both")
    if problems:
        raise ConfigError.of(problems, partial=cfg if file_read else None,
                             bad_keys=frozenset(bad_keys))
    return cfg
