"""Pure parts of the daemon contract: request fuzzing, commands, energy fields, Prometheus,
what a configuration reload may apply."""

from __future__ import annotations

import dataclasses
import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.admission import AdmissionConfig
from agent.daemon import DaemonConfig, applicable, config_changes, energy_fields
from agent.energy import integrate
from agent.errors import RequestError
from agent.models import ResolvedModel
from agent.mqtt import BrokerConfig
from agent.outbox import OutboxConfig
from agent.prometheus import Histogram, PrometheusServer, flatten_numeric, render_gauges
from agent.protocol import parse_command, parse_request, peek_request_id
from agent.sampler import Snapshot
from probes.base import PowerReading
from tests.support import validate

CODES = {"bad_request", "too_large"}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children,
                                                                       max_size=4),
    max_leaves=12,
)
request_like = st.fixed_dictionaries(
    {},
    optional={"id": st.one_of(st.text(max_size=140), st.integers()),
              "prompt": json_values, "messages": json_values,
              "max_tokens": st.one_of(st.integers(), st.text(), st.floats()),
              "temperature": json_values, "top_p": json_values, "top_k": json_values,
              "seed": json_values, "stop": json_values, "stream": json_values,
              "deadline_ms": json_values, "model": json_values, "client_id": json_values,
              "junk": json_values},
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(request_like.map(lambda d: json.dumps(d).encode()), st.binary(max_size=300)))
def test_fuzz_parse_request_never_raises_anything_else(payload: bytes) -> None:
    try:
        req = parse_request(payload, 4096)
    except RequestError as exc:
        assert exc.code in CODES
        assert exc.message
        return
    assert req.id and req.max_tokens >= 1
    assert (req.prompt is None) != (req.messages is None)


def test_deeply_nested_json_is_a_bad_request() -> None:
    with pytest.raises(RequestError, match="nested"):
        parse_request(b"[" * 100_000 + b"]" * 100_000, 1 << 20)


def test_peek_id_of_huge_payload_does_not_parse_it() -> None:
    big = b'{"id": "huge-1", "prompt": "' + b"x" * (10 * 1024 * 1024) + b'"}'
    assert peek_request_id(big, 256 * 1024) == "huge-1"
    with pytest.raises(RequestError) as exc:
        parse_request(big, 256 * 1024)
    assert exc.value.code == "too_large"
    assert peek_request_id(b'{"id": "a/b"}' + b" " * 300_000, 1024) is None


def test_parse_command() -> None:
    assert parse_command("drain", b"") == {}
    assert parse_command("bench", b'{"id":"c1","runs":2,"ignore_eos":true}')["runs"] == 2
    for name, body, needle in [("shutdown", b"{}", "unknown command"),
                               ("bench", b'{"runs": 999}', "runs"),
                               ("bench", b'{"rm": 1}', "unknown option"),
                               ("drain", b'{"resume": "yes"}', "boolean"),
                               ("reload", b"[1]", "object")]:
        with pytest.raises(RequestError, match=needle):
            parse_command(name, body)


def _result_with(energy: dict[str, object]) -> dict[str, object]:
    return {"schema": "edgelm.infer.result/1", "device": "d", "ts_unix_ms": 1, "seq": 1,
            "id": "x", "status": "ok", "text": "hi", "finish_reason": "stop",
            "usage": {"prompt_tokens": 3, "completion_tokens": 2},
            "timings": {"ttft_ms": 1.0, "e2e_ms": 2.0}, "energy": energy,
            "served_by": {"device": "d", "backend": "b", "model": "m"}, "error": None}


def test_energy_without_power_source_is_null_with_reason() -> None:
    snaps = [Snapshot(0, t, {}, (), {}, 0.1) for t in (0.0, 0.1, 0.2, 0.3)]
    e = energy_fields(integrate(snaps, 0.05, 0.25, tokens=4))
    assert e["gross_mj"] is None and e["mj_per_token"] is None and e["coverage"] is None
    assert e["reason"] and "no power source" in str(e["reason"])
    validate(_result_with(e), "infer_result.json")


def test_energy_with_a_rail_is_labelled() -> None:
    snaps = [Snapshot(0, t / 10, {}, (PowerReading("ina:VDD_IN", "board_input", 5000.0),),
                      {}, 0.1) for t in range(0, 11)]
    e = energy_fields(integrate(snaps, 0.1, 0.9, tokens=8))
    assert e["gross_mj"] == pytest.approx(4000.0)
    assert e["mj_per_token"] == pytest.approx(500.0)
    assert e["source"] == "ina:VDD_IN" and e["method"] == "board_input"
    assert e["net_mj"] is None and "baseline" in str(e["reason"])
    validate(_result_with(e), "infer_result.json")


def test_schema_rejects_zero_energy_without_reason() -> None:
    import jsonschema

    bad = energy_fields(integrate([], 0.0, 1.0))
    bad["reason"] = None
    with pytest.raises(jsonschema.ValidationError):
        validate(_result_with(bad), "infer_result.json")


def test_histogram_and_gauges_render() -> None:
    h = Histogram("edgelm_ttft_ms", "TTFT", (10, 100))
    for v in (5, 50, 500, None):
        h.observe(v)
    text = "\n".join(h.render())
    assert 'edgelm_ttft_ms_bucket{le="10"} 1' in text
    assert 'edgelm_ttft_ms_bucket{le="100"} 2' in text
    assert 'edgelm_ttft_ms_bucket{le="+Inf"} 3' in text
    assert "edgelm_ttft_ms_count 3" in text and "edgelm_ttft_ms_sum 555" in text
    lines = render_gauges(flatten_numeric("edgelm", {
        "cpu": {"util_pct": 12.5, "per_cpu": {"cpu0": 3}, "governor": "ondemand",
                "temp_c": None, "throttled": True}}))
    assert "edgelm_cpu_util_pct 12.5" in lines
    assert 'edgelm_cpu_per_cpu{key="cpu0"} 3' in lines
    assert "edgelm_cpu_throttled 1" in lines
    assert not any("governor" in line or "temp_c" in line for line in lines)


def test_prometheus_server_serves_on_loopback() -> None:
    server = PrometheusServer("127.0.0.1:0", lambda: "edgelm_up 1\n")
    server.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as r:
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            assert r.read() == b"edgelm_up 1\n"
    finally:
        server.stop()


def _daemon_config(**changes: Any) -> DaemonConfig:
    base = DaemonConfig(
        broker=BrokerConfig("127.0.0.1", 1883), fleet="f", device="d",
        state_dir=Path("/tmp/state"), backend="llamacpp",
        model=ResolvedModel("m", Path("/m.gguf"), "gguf", "ab" * 32, 10), threads=2)
    return dataclasses.replace(base, **changes)


def test_reload_names_changed_keys_and_those_needing_a_restart() -> None:
    old = _daemon_config()
    assert config_changes(old, old) == ([], [])
    new = _daemon_config(
        broker=BrokerConfig("10.0.0.9", 1883, keepalive_s=10), telemetry_interval_s=0.5,
        admission=AdmissionConfig(rate_limit=3, concurrency=2, max_payload_bytes=4096),
        outbox=OutboxConfig(ttl_s=60.0, inflight_window=8), threads=1, log_level="debug",
        probe_root="/elsewhere")
    changed, restart = config_changes(old, new)
    assert changed == sorted([
        "mqtt.broker", "mqtt.keepalive_s", "telemetry.interval_s", "admission.rate_limit",
        "admission.concurrency", "admission.max_payload_bytes", "outbox.ttl_s",
        "outbox.inflight_window", "model.threads", "agent.log_level", "telemetry.probe_root"])
    assert restart == ["admission.concurrency", "mqtt.broker", "mqtt.keepalive_s",
                       "outbox.inflight_window", "telemetry.probe_root"]
    applied = applicable(old, new)
    # what needs a restart keeps its running value; everything else is the new one
    assert applied.broker == old.broker and applied.probe_root == "/"
    assert applied.admission == dataclasses.replace(new.admission, concurrency=1)
    assert applied.outbox.inflight_window == 64 and applied.outbox.ttl_s == 60.0
    assert (applied.telemetry_interval_s, applied.threads, applied.log_level) == (
        0.5, 1, "debug")
    assert config_changes(old, applied)[1] == []


def test_exclusive_work_waits_for_running_requests_and_holds_new_ones(tmp_path: Path) -> None:
    """The executor gate: a bench (exclusive) never overlaps a request (shared)."""
    import threading

    from agent.daemon import AgentDaemon

    daemon = AgentDaemon(_daemon_config(state_dir=tmp_path, probe_names=("memory",)))
    events: list[str] = []
    in_request = threading.Event()
    finish_request = threading.Event()

    def request(name: str) -> None:
        with daemon._shared():
            events.append(f"{name} start")
            in_request.set()
            finish_request.wait(5)
            events.append(f"{name} end")

    def bench() -> None:
        with daemon._exclusive():
            events.append("bench start")
            events.append("bench end")

    first = threading.Thread(target=request, args=("r1",))
    first.start()
    assert in_request.wait(5)
    excl = threading.Thread(target=bench)
    excl.start()
    while not daemon._exclusive_waiting:  # the bench waits for r1
        threading.Event().wait(0.001)
    in_request.clear()
    second = threading.Thread(target=request, args=("r2",))
    second.start()  # queued behind the waiting bench, not admitted next to r1
    assert not in_request.wait(0.2)
    finish_request.set()
    for t in (first, excl, second):
        t.join(5)
    assert events == ["r1 start", "r1 end", "bench start", "bench end", "r2 start", "r2 end"]
    daemon.outbox.close()
    daemon._results.close()
