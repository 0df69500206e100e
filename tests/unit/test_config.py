"""Config: TOML, EDGELM_* overrides, flags; unknown keys and bad values name file and key."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.cli import main
from agent.config import load_config, parse_toml
from agent.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent.parent
EXAMPLE = REPO / "systemd" / "agent.toml.example"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(text)
    return p


def test_defaults_without_file() -> None:
    cfg = load_config(None)
    assert cfg.mqtt.broker == "mqtt://127.0.0.1:1883"
    assert cfg.admission.concurrency == 1
    assert cfg.prometheus.enabled is False and cfg.prometheus.listen.startswith("127.0.0.1:")
    assert cfg.agent.log_content is False


def test_file_env_flag_precedence(tmp_path: Path) -> None:
    p = write(tmp_path, '[agent]\nfleet = "f-file"\ndevice = "d-file"\n'
                        '[mqtt]\nkeepalive_s = 20\n[outbox]\ntelemetry = true\n'
                        '[telemetry]\nprobes = ["cpu", "memory"]\n')
    env = {"EDGELM_MQTT_KEEPALIVE_S": "40", "EDGELM_FLEET": "f-env",
           "EDGELM_LLAMA_CMAKE_ARGS": "-DX=1", "PATH": "/bin"}
    cfg = load_config(p, env, {"agent.fleet": "f-flag", "model.threads": None})
    assert cfg.agent.fleet == "f-flag"
    assert cfg.agent.device == "d-file"
    assert cfg.mqtt.keepalive_s == 40
    assert cfg.outbox.telemetry is True
    assert cfg.telemetry.probes == ("cpu", "memory")
    assert cfg.source == str(p)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[mqtt]\nbrokr = 'x'\n", "unknown key mqtt.brokr"),
        ("[mqttt]\nbroker = 'x'\n", "unknown section [mqttt]"),
        ("[mqtt]\nkeepalive_s = 'ten'\n", "mqtt.keepalive_s: expected an integer"),
        ("[mqtt]\nprotocol = 4\n", "mqtt.protocol must be one of 3, 5"),
        ("[outbox]\ndrop_policy = 'yolo'\n", "outbox.drop_policy must be one of"),
        ("[outbox]\nmax_bytes = -1\n", "outbox.max_bytes must be in"),
        ("[admission]\nconcurrency = 0\n", "admission.concurrency must be in"),
        ("[prometheus]\nenabled = 'yes'\n", "prometheus.enabled: expected true or false"),
        ("[model]\nthreads = 'lots'\n", "model.threads must be 'auto'"),
        ("[telemetry]\nprobes = [1, 2]\n", "telemetry.probes: expected a list of strings"),
        ("fleet = 'x'\n", "must be a [section]"),
        ("[agent\n", "not valid TOML"),
        ("[mqtt]\nreconnect_min_s = 10.0\nreconnect_max_s = 1.0\n", "reconnect_max_s"),
        ("[agent]\nlog_level = 'loud'\n", "agent.log_level must be one of debug"),
        ("[model]\nworker_nice = 20\n", "model.worker_nice must be in"),
        ("[model]\nstream_batch_ms = -1\n", "model.stream_batch_ms must be in"),
    ],
)
def test_errors_name_file_and_key(tmp_path: Path, text: str, needle: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert needle in str(exc.value)
    assert str(p) in str(exc.value)


def test_env_errors_name_the_variable() -> None:
    with pytest.raises(ConfigError, match="environment EDGELM_MQTT_KEEPALIVE: unknown key"):
        load_config(None, {"EDGELM_MQTT_KEEPALIVE": "3"})
    with pytest.raises(ConfigError, match=r"EDGELM_OUTBOX_TELEMETRY: outbox\.telemetry"):
        load_config(None, {"EDGELM_OUTBOX_TELEMETRY": "maybe"})
    cfg = load_config(None, {"EDGELM_OUTBOX_TELEMETRY": "yes", "EDGELM_MQTT_USERNAME": ""})
    assert cfg.outbox.telemetry is True and cfg.mqtt.username is None


def test_missing_file_only_fails_when_named(tmp_path: Path) -> None:
    assert load_config(tmp_path / "nope.toml").source is None
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml", required=True)


def test_shipped_example_is_valid() -> None:
    values = parse_toml(EXAMPLE.read_text(), str(EXAMPLE))
    assert "mqtt" in values and "outbox" in values


def test_redacted_hides_secrets(tmp_path: Path) -> None:
    p = write(tmp_path, "[mqtt]\nbroker = 'mqtts://dev:s3cret@broker:8883'\npassword = 'pw'\n")
    red = load_config(p).redacted()
    assert "s3cret" not in json.dumps(red) and "pw" not in red["mqtt"]["password"]


def test_cli_config_check_ok_and_error(tmp_path: Path) -> None:
    runner = CliRunner()
    good = write(tmp_path, "[agent]\nfleet = 'f'\ndevice = 'd'\n")
    res = runner.invoke(main, ["config", "check", "--config", str(good)], env={})
    assert res.exit_code == 0, res.output
    assert "config OK" in res.output and "agent.fleet" in res.output
    res = runner.invoke(main, ["config", "check", "--config", str(good), "--json"], env={})
    assert json.loads(res.output)["agent"]["device"] == "d"
    bad = tmp_path / "bad.toml"
    bad.write_text("[outbox]\nttl = 5\n")
    res = runner.invoke(main, ["config", "check", "--config", str(bad)], env={})
    assert res.exit_code == 78
    assert "unknown key outbox.ttl" in res.output and str(bad) in res.output
    res = runner.invoke(main, ["config", "check", "--config", str(tmp_path / "missing.toml")])
    assert res.exit_code == 78


def test_cli_run_bad_config_exits_78(tmp_path: Path) -> None:
    bad = write(tmp_path, "[admission]\nqueue = 3\n")
    res = CliRunner().invoke(main, ["run", "--config", str(bad)], env={})
    assert res.exit_code == 78 and "admission.queue" in res.output
    res = CliRunner().invoke(main, ["run", "--fleet", "f"], env={"EDGELM_CONFIG": ""})
    assert res.exit_code == 78 and "agent.device is required" in res.output


def test_daemon_config_carries_log_level_and_reloads_with_the_start_flags(
    tmp_path: Path,
) -> None:
    from agent.cli_ops import daemon_config_loader

    p = write(tmp_path, '[agent]\nfleet = "f"\nlog_level = "debug"\n'
                        '[admission]\nrate_limit = 5\n')
    load = daemon_config_loader(str(p), {"device": "dev-1", "broker": "mqtt://flag:1884",
                                         "threads": "1"})
    first = load()
    assert first.log_level == "debug" and first.admission.rate_limit == 5
    assert (first.broker.host, first.broker.port) == ("flag", 1884)
    p.write_text('[agent]\nfleet = "f"\n[admission]\nrate_limit = 7\n'
                 '[mqtt]\nbroker = "mqtt://file:1885"\n')
    second = load()  # the file again, under the same flags: the flag still wins for broker
    assert second.log_level is None and second.admission.rate_limit == 7
    assert (second.broker.host, second.broker.port) == ("flag", 1884)
    assert second.device == "dev-1" and second.threads == 1
    p.write_text('[admission]\nrate_limit = "many"\n')
    with pytest.raises(ConfigError, match=r"admission.rate_limit"):
        load()


def test_errors_name_where_the_bad_value_came_from(tmp_path: Path) -> None:
    """A value from a variable or a flag was blamed on the file (a new user's trial)."""
    runner = CliRunner()
    cfg = write(tmp_path, "[agent]\nfleet = 'f'\ndevice = 'd'\n[model]\nbackend = 'llamacpp'\n")
    res = runner.invoke(main, ["config", "check", "--config", str(cfg)],
                        env={"EDGELM_MODEL_BACKEND": "foo"})
    assert res.exit_code == 78
    assert "environment EDGELM_MODEL_BACKEND: model.backend: unknown backend 'foo'" in res.output
    # config check refuses an identity that run would refuse, naming the variable
    res = runner.invoke(main, ["config", "check", "--config", str(cfg)],
                        env={"EDGELM_FLEET": "a/b"})
    assert res.exit_code == 78 and "environment EDGELM_FLEET" in res.output, res.output
    res = runner.invoke(main, ["config", "check", "--config", str(cfg)],
                        env={"EDGELM_MQTT_CA_FILE": "/x"})
    assert res.exit_code == 78
    assert "environment EDGELM_MQTT_CA_FILE: mqtt.ca_file needs an mqtts://" in res.output
    res = runner.invoke(main, ["run", "--config", str(cfg), "--fleet", "a/b"], env={})
    assert res.exit_code == 78 and "flag for agent.fleet" in res.output, res.output
    assert str(cfg) not in res.output
    # the file is still named for what it set
    bad = write(tmp_path, "[agent]\nfleet = 'x/y'\n")
    res = runner.invoke(main, ["config", "check", "--config", str(bad)], env={})
    assert res.exit_code == 78 and f"{bad}: agent.fleet" in res.output, res.output


def test_every_problem_is_reported_in_one_run(tmp_path: Path) -> None:
    """One run per mistake was the old behaviour: a user with three typos ran check three times."""
    p = write(tmp_path, "[outbox]\nttl = 5\nmax_bytes = -1\n[agent]\nlog_level = 'loud'\n"
                        "[nope]\nx = 1\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p, {"EDGELM_MQTT_KEEPALIVE_S": "soon"}, {"model.threads": "lots"})
    problems = exc.value.problems
    assert len(problems) == 6, problems
    text = str(exc.value)
    assert text.startswith("6 configuration problems:")
    for needle in ("unknown key outbox.ttl", "outbox.max_bytes must be in",
                   "agent.log_level must be one of", "unknown section [nope]",
                   "environment EDGELM_MQTT_KEEPALIVE_S: mqtt.keepalive_s: expected an integer",
                   "flag for model.threads: model.threads must be 'auto'"):
        assert sum(needle in line for line in problems) == 1, (needle, problems)
        assert needle in text
    # a single problem keeps its plain one-line message
    with pytest.raises(ConfigError) as one:
        load_config(write(tmp_path, "[outbox]\nttl = 5\n"))
    assert one.value.problems == [str(one.value)] and "\n" not in str(one.value)


def test_cli_config_check_lists_value_and_consistency_problems_together(
    tmp_path: Path,
) -> None:
    cfg = write(tmp_path, "[agent]\nfleet = 'a/b'\ndevice = 'd+'\n[model]\nbackend = 'foo'\n"
                          "[mqtt]\nca_file = '/etc/ca.pem'\n")
    res = CliRunner().invoke(main, ["config", "check", "--config", str(cfg)], env={})
    assert res.exit_code == 78
    assert "4 configuration problems" in res.output, res.output
    for needle in ("unknown backend 'foo'", "agent.fleet", "agent.device",
                   "mqtt.ca_file needs an mqtts:// broker URL"):
        assert needle in res.output, (needle, res.output)


def _check(runner: CliRunner, args: list[str], env: dict[str, str]) -> list[str]:
    """Run a command that must refuse its configuration; the problem lines it printed."""
    res = runner.invoke(main, args, env={"EDGELM_CONFIG": "", **env})
    assert res.exit_code == 78, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output
    lines = res.output.strip().splitlines()
    return [ln[4:] for ln in lines[1:]] if "configuration problems" in lines[0] else [
        lines[0].removeprefix("agentctl: error: ")]


def test_run_and_check_list_problems_from_every_stage_together(tmp_path: Path) -> None:
    """Found by a breaking pass: a bad value hid the identity, backend, model and listen
    problems behind it, and `run` stopped at its first failing stage (four runs for four
    mistakes)."""
    runner = CliRunner()
    st = write(tmp_path, '[agent]\ndevice = "a/b"\n[model]\nbackend = "nope"\nname = "nosuch"\n'
                         '[prometheus]\nenabled = true\nlisten = "x"\n')
    for args in (["run", "--config", str(st), "--fleet", "f", "--broker", "mqtt://127.0.0.1:1"],
                 ["config", "check", "--config", str(st)]):
        problems = _check(runner, args, {})
        assert len(problems) == 4, problems
        for needle in ("agent.device 'a/b'", "unknown backend 'nope'", "unknown model 'nosuch'",
                       "prometheus.listen 'x'"):
            assert sum(needle in p for p in problems) == 1, (needle, problems)
        assert all(p.startswith(f"{st}: ") for p in problems), problems
    # a refused value, and the checks that do not depend on it, in one run
    x = write(tmp_path, '[agent]\nfleet = "a/b"\n[model]\nthreads = "lots"\n')
    problems = _check(runner, ["config", "check", "--config", str(x)], {"EDGELM_DEVICE": "d#"})
    assert len(problems) == 3 and "environment EDGELM_DEVICE: agent.device" in problems[2]
    problems = _check(runner, ["run", "--threads", "lots", "--backend", "nope", "--fleet",
                               "a/b", "--device", "c#"], {})
    assert [p.split(":")[0] for p in problems] == [
        "flag for model.threads", "flag for agent.fleet", "flag for agent.device",
        "flag for model.backend"], problems
    # a file that is not TOML still lets the environment be checked
    bad = tmp_path / "s.toml"
    bad.write_text("[model\n")
    problems = _check(runner, ["config", "check", "--config", str(bad)],
                      {"EDGELM_MODEL_WORKER_NICE": "99"})
    assert "not valid TOML" in problems[0] and "EDGELM_MODEL_WORKER_NICE" in problems[1]


def test_config_check_refuses_what_run_refuses(tmp_path: Path) -> None:
    """systemd/README says: config check, then reload. Each of these passed check and
    failed run."""
    runner = CliRunner()
    for env, needle in (
        ({"EDGELM_BROKER": "http://x"}, "environment EDGELM_BROKER: mqtt.broker: broker URL"),
        ({"EDGELM_MODEL_NAME": "nosuch"}, "environment EDGELM_MODEL_NAME: model.name: unknown"),
        ({"EDGELM_BROKER": "mqtts://h", "EDGELM_MQTT_KEY_FILE": "/x"},
         "environment EDGELM_MQTT_KEY_FILE: mqtt.key_file needs mqtt.cert_file"),
        ({"EDGELM_MQTT_PASSWORD_FILE": str(tmp_path / "none")},
         "environment EDGELM_MQTT_PASSWORD_FILE: mqtt.password_file:"),
        ({"EDGELM_PROMETHEUS_ENABLED": "1", "EDGELM_PROMETHEUS_LISTEN": "h:99999"},
         "environment EDGELM_PROMETHEUS_LISTEN: prometheus.listen 'h:99999'"),
    ):
        problems = _check(runner, ["config", "check"], env)
        assert problems == [p for p in problems if needle in p] and len(problems) == 1, (
            env, problems)
    # the TLS message names the key that was set and says the broker is the default
    problems = _check(runner, ["config", "check"], {"EDGELM_MQTT_KEY_FILE": "/x"})
    assert problems[0].startswith("environment EDGELM_MQTT_KEY_FILE: mqtt.key_file needs an "
                                  "mqtts:// broker URL"), problems
    assert "the default" in problems[0]


def test_odd_values_are_config_errors_not_tracebacks(tmp_path: Path) -> None:
    runner = CliRunner()
    for env, needle in (
        ({"EDGELM_MODEL_THREADS": "²"}, "model.threads must be 'auto'"),  # isdigit() is true
        ({"EDGELM_MODEL_THREADS": "٣"}, "model.threads must be 'auto'"),
        ({"EDGELM_PROMETHEUS_ENABLED": "1", "EDGELM_PROMETHEUS_LISTEN": "h:²"},
         "prometheus.listen"),
        ({"EDGELM_MODEL_NAME": "y" * 300}, "File name too long"),
        ({"EDGELM_DEVICE": "d\n"}, "agent.device"),  # `$` matched before a trailing newline
        ({"EDGELM_DEVICE": "d" * 100_000}, "(100002 characters)"),  # long values are cut
    ):
        problems = _check(runner, ["config", "check"], env)
        assert len(problems) == 1 and needle in problems[0], (env, problems)
        assert len(problems[0]) < 400
    folder = tmp_path / "adir"
    folder.mkdir()
    assert _check(runner, ["config", "check", "--config", str(folder)], {}) == [
        f"{folder}: is a directory, not a config file"]
    assert "is a directory" in _check(runner, ["config", "check"],
                                      {"EDGELM_CONFIG": str(folder)})[0]
    # an unknown section is one problem, not one per key in it; TOML booleans read as TOML
    many = write(tmp_path, "[bogus]\nx = 1\ny = 2\nz = 3\n[prometheus]\nlisten = true\n")
    problems = _check(runner, ["config", "check", "--config", str(many)], {})
    assert len(problems) == 2 and "unknown section [bogus]" in problems[0], problems
    assert problems[1].endswith("got true"), problems
    # a byte-order mark is not a syntax error
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf[agent]\nfleet = 'f'\n")
    assert load_config(bom).agent.fleet == "f"


def test_numbers_must_be_finite_ascii_and_typos_in_variable_names_are_named(
    tmp_path: Path,
) -> None:
    for env, needle in (({"EDGELM_OUTBOX_TTL_S": "inf"}, "expected a finite number"),
                        ({"EDGELM_TELEMETRY_INTERVAL_S": "nan"}, "expected a finite number"),
                        ({"EDGELM_ADMISSION_QUEUE_SIZE": "٥٠"}, "expected an integer")):
        with pytest.raises(ConfigError, match=needle):
            load_config(None, env)
    with pytest.raises(ConfigError, match=r"outbox\.ttl_s: expected a finite number, got inf"):
        load_config(write(tmp_path, "[outbox]\nttl_s = inf\n"))
    assert load_config(None, {"EDGELM_OUTBOX_TTL_S": " 60 "}).outbox.ttl_s == 60.0
    res = CliRunner().invoke(main, ["config", "check"], env={
        "EDGELM_CONFIG": "", "EDGELM_MODLE_THREADS": "1", "EDGELM_HOME": "/x",
        "EDGELM_MODEL_THREADS": "1"})
    assert res.exit_code == 0, res.output
    assert "warning: EDGELM_MODLE_THREADS is ignored" in res.stderr
    assert "EDGELM_HOME" not in res.stderr and "EDGELM_MODEL_THREADS is" not in res.stderr


def test_cli_outbox_stats_table_and_json(tmp_path: Path) -> None:
    from agent.outbox import OutboxQueue

    q = OutboxQueue(tmp_path / "outbox.sqlite3", clock=lambda: time.time() - 30)
    q.put("t/a", b"x" * 100, kind="result")
    q.put("t/b", b"y" * 50, kind="result")
    q.put("t/c", b"{}", kind="bench")
    q.close()
    res = CliRunner().invoke(main, ["outbox", "stats", "--state-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0] == f"outbox {tmp_path / 'outbox.sqlite3'}"
    bench, result = lines[2].split(), lines[3].split()
    assert (bench[0], bench[1], result[0], result[1]) == ("bench", "1", "result", "2")
    assert 29.0 <= float(result[3]) < 3600  # queued 30 s ago, by the injected clock
    res = CliRunner().invoke(main, ["outbox", "stats", "--state-dir", str(tmp_path), "--json"])
    kinds = {k["kind"]: k["depth"] for k in json.loads(res.output)["kinds"]}
    assert kinds == {"bench": 1, "result": 2}
