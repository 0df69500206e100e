"""Breaking the daemon's operations as an operator and a hostile client would: reloads to
configurations that cannot serve, an id reused for another request, a damaged idempotency
store. `agentctl run` as a subprocess, a real mosquitto, the real SmolLM2-135M model.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from agent.admission import ResultStore
from tests.integration.test_daemon_reload import (
    Daemon,
    command,
    daemons,  # noqa: F401  (the fixture)
    request,
    short,
    wait_online,
)
from tests.support import Mosquitto, TestClient

pytestmark = [pytest.mark.broker, pytest.mark.model]


def test_reload_to_a_model_that_does_not_load_keeps_serving_the_previous_one(
    broker: Mosquitto, tmp_path: Path, daemons: list[Daemon]  # noqa: F811
) -> None:
    # A truncated download put where the model should be: the file resolves (it exists), the
    # backend cannot load it. Before, the reload answered "ok" with loaded: false and every
    # later request failed: the device served nothing until someone noticed.
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 4096)
    base = f'[mqtt]\nbroker = "{broker.url}"\n'
    d = Daemon(tmp_path, base)
    daemons.append(d)
    client = TestClient(broker.port)
    client.subscribe(f"{d.prefix}/status")
    wait_online(client, d)
    d.config.write_text(base + f'[model]\nname = "{bad}"\n')
    res = command(client, d, "reload", {"id": "to-broken"})
    assert res["status"] == "error", res
    assert res["error"]["code"] == "load_failed"
    assert "still serving on the previous one" in res["error"]["message"]
    final, _ = request(client, d, short("after-broken"))
    assert final["status"] == "ok", final
    assert final["served_by"]["model"] == "smollm2-135m"
    watch = TestClient(broker.port)  # the retained status: the latest the agent published
    watch.subscribe(f"{d.prefix}/status")
    status = json.loads(watch.get(10, topic=f"{d.prefix}/status").payload)
    watch.close()
    assert status["models"][0]["loaded"] is True, status["models"]
    assert status["models"][0]["name"] == "smollm2-135m"
    # and a good file afterwards reloads as usual
    d.config.write_text(base)
    res = command(client, d, "reload", {"id": "back"})
    assert res["status"] == "ok" and res["details"]["loaded"] is True, res
    assert res["details"]["changed"] == []
    client.close()
    assert d.stop() == 0


def test_reload_to_an_unknown_backend_is_a_config_error(
    broker: Mosquitto, tmp_path: Path, daemons: list[Daemon]  # noqa: F811
) -> None:
    # Before: accepted, the worker failed to load, and requests were answered with
    # error.code "unknown_backend", which is not in the result schema.
    base = f'[mqtt]\nbroker = "{broker.url}"\n'
    d = Daemon(tmp_path, base)
    daemons.append(d)
    client = TestClient(broker.port)
    client.subscribe(f"{d.prefix}/status")
    wait_online(client, d)
    d.config.write_text(base + '[model]\nbackend = "llamacpp-typo"\n')
    res = command(client, d, "reload", {"id": "typo"})
    assert res["status"] == "error", res
    assert res["error"]["code"] == "config_error"
    assert "model.backend" in res["error"]["message"]
    assert "llamacpp-typo" in res["error"]["message"]
    assert str(d.config) in res["error"]["message"]
    assert request(client, d, short("after-typo"))[0]["status"] == "ok"  # validated there
    client.close()
    assert d.stop() == 0


def test_an_id_reused_for_another_request_is_refused_also_after_kill9(
    broker: Mosquitto, tmp_path: Path, daemons: list[Daemon]  # noqa: F811
) -> None:
    d = Daemon(tmp_path, f'[mqtt]\nbroker = "{broker.url}"\n')
    daemons.append(d)
    client = TestClient(broker.port)
    client.subscribe(f"{d.prefix}/status")
    wait_online(client, d)
    body = {"id": "same", "prompt": "One, two,", "max_tokens": 3, "ignore_eos": True}
    first, _ = request(client, d, body)
    assert first["status"] == "ok"
    # a retry (streaming now, another deadline) is the same request: the stored answer
    assert request(client, d, {**body, "stream": True, "deadline_ms": 60000})[0] == first
    # the same id with another prompt is not: before, it got the first prompt's text
    other, raw = request(client, d, {**body, "prompt": "Tell me a story"})
    assert other["status"] == "error", other
    assert other["error"]["code"] == "bad_request"
    assert other["error"]["details"]["reason"] == "id_reused"
    assert len(raw) == 1
    d.wait_remembered("same")  # the id's disk write follows the result's outbox commit
    d.kill()
    d.restart()
    wait_online(client, d)
    again, _ = request(client, d, {**body, "max_tokens": 4})
    assert again["error"]["details"]["reason"] == "id_reused", again
    assert request(client, d, body)[0] == first  # the id still answers its own request
    client.close()
    assert d.stop() == 0


def test_a_damaged_idempotency_store_does_not_stop_the_agent_or_its_answers(
    broker: Mosquitto, tmp_path: Path, daemons: list[Daemon]  # noqa: F811
) -> None:
    # Pages of idempotency.sqlite3 overwritten (an SD card's bad block): the header and
    # schema still open, the table's pages do not read. Before, the lookup raised on the MQTT
    # thread and a request with a remembered id was never answered (or the start died).
    state = tmp_path / "state"
    path = state / "idempotency.sqlite3"
    path.parent.mkdir(parents=True)
    store = ResultStore(path, ttl_s=3600)
    for i in range(200):
        store.put(f"old{i}", b"x" * 500)
    store.close()
    data = bytearray(path.read_bytes())
    data[4096:12288] = b"\x5a" * 8192
    path.write_bytes(bytes(data))
    d = Daemon(tmp_path, f'[mqtt]\nbroker = "{broker.url}"\n', state_dir=state)
    daemons.append(d)
    client = TestClient(broker.port)
    client.subscribe(f"{d.prefix}/status")
    wait_online(client, d)
    final, _ = request(client, d, short("old5"), timeout_s=60)
    assert final["status"] == "ok", final  # not remembered any more: run again, answered
    assert request(client, d, short("fresh"), timeout_s=60)[0]["status"] == "ok"
    assert "idempotency store" in d.log.read_text()  # the reason is logged
    assert d.alive()
    client.close()
    assert d.stop() == 0


def _catches(pid: int, sig: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
    return False


def _signal_while_starting(d: Daemon, sig: int) -> None:
    """Send ``sig`` as soon as the agent catches it, and check that was before it was built."""
    end = time.monotonic() + 30
    while not _catches(d.proc.pid, sig):
        assert d.alive() and time.monotonic() < end, d.tail()
        time.sleep(0.002)
    built = (d.state_dir / "idempotency.sqlite3").exists()
    d.proc.send_signal(sig)
    assert not built, f"{signal.Signals(sig).name} is caught only once the daemon is built"


def test_sigterm_while_the_agent_starts_exits_cleanly(
    broker: Mosquitto, tmp_path: Path, daemons: list[Daemon]  # noqa: F811
) -> None:
    # Found by CI: a stop sent while the agent was still being built (config read, model
    # hashed) ended it by the signal (exit -15) instead of a clean stop.
    d = Daemon(tmp_path, f'[mqtt]\nbroker = "{broker.url}"\n')
    daemons.append(d)
    _signal_while_starting(d, signal.SIGTERM)
    assert d.proc.wait(30) == 0, d.tail()
    assert "stop requested during start-up" in d.log.read_text()


def test_sighup_while_the_agent_starts_is_a_reload_not_a_silent_death(
    broker: Mosquitto, tmp_path: Path, daemons: list[Daemon]  # noqa: F811
) -> None:
    # Before, SIGHUP was caught only from run_forever on, after the config was read, the model
    # hashed and the daemon built (~2 s here): a SIGHUP then ended the process, which systemd
    # counts as a clean exit, so Restart=on-failure left the device down.
    d = Daemon(tmp_path, f'[mqtt]\nbroker = "{broker.url}"\n')
    daemons.append(d)
    _signal_while_starting(d, signal.SIGHUP)
    client = TestClient(broker.port)
    client.subscribe(f"{d.prefix}/status")
    wait_online(client, d)
    d.wait_log("SIGHUP reload done")
    assert request(client, d, short("after-early-hup"))[0]["status"] == "ok"
    client.close()
    assert d.stop() == 0


def test_sigterm_during_a_long_bench_stops_within_the_promised_5_s(
    broker: Mosquitto, tmp_path: Path, daemons: list[Daemon]  # noqa: F811
) -> None:
    # Before, shutdown waited for the worker's lock, which the bench held to its end (up to
    # 20 runs x 512 tokens): systemd's TimeoutStopSec=15 then SIGKILLed the agent.
    d = Daemon(tmp_path, f'[mqtt]\nbroker = "{broker.url}"\n')
    daemons.append(d)
    client = TestClient(broker.port)
    client.subscribe(f"{d.prefix}/status")
    wait_online(client, d)
    client.subscribe(f"{d.prefix}/cmd/bench/result")
    client.publish(f"{d.prefix}/cmd/bench",
                   json.dumps({"id": "long", "runs": 20, "warmup": 1, "max_tokens": 256}))
    d.wait_log("operator command bench")
    time.sleep(4.0)  # past the 2 s idle baseline: generating
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    rc = d.proc.wait(30)
    stopped_s = time.monotonic() - t0
    assert rc == 0, d.tail()
    assert stopped_s < 5.0, (stopped_s, d.tail())
    assert "bench cancelled" in d.log.read_text()
    # the operator hears why, once the agent is back (the answer waited in the outbox)
    d.restart()
    res = json.loads(client.get(90, topic=f"{d.prefix}/cmd/bench/result").payload)
    assert res["id"] == "long" and res["status"] == "error", res
    assert "shutting down" in res["error"]["message"]
    client.close()
    # The answer may have left before the first agent exited; stop the new one only once it
    # runs (a SIGTERM while Python is still importing ends it by the signal, before any
    # handler of ours exists; systemd counts that as a clean stop anyway).
    end = time.monotonic() + 90
    while d.log.read_text(errors="replace").count("ready: ") < 2:
        assert d.alive() and time.monotonic() < end, d.tail()
        time.sleep(0.1)
    assert d.stop() == 0
