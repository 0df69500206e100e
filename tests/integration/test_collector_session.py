"""A collector that is down or restarting loses no results: its broker session persists.

The agents' outboxes guarantee delivery to the broker, not to a collector; a result published
while no collector is subscribed would otherwise be dropped by the broker. With a stable
client id and a session expiry (``agentctl collect`` defaults: one day), the real mosquitto
keeps the collector's subscriptions — shared ones included — and queues the QoS 1 messages
for it; the restarted collector stores them. The control: a clean session loses them.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent.fleet.collector import FleetCollector
from agent.fleet.store import FleetStore
from agent.mqtt import BrokerConfig, parse_broker_url
from tests.fleet_support import wait_for
from tests.support import Mosquitto

pytestmark = [pytest.mark.broker]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path / "mosq").start()
    yield b
    b.stop()


def _result(device: str, seq: int) -> bytes:
    return json.dumps({
        "schema": "edgelm.infer.result/1", "device": device, "fleet": "sf", "seq": seq,
        "ts_unix_ms": int(time.time() * 1000), "id": f"r{seq}", "status": "ok",
        "usage": {"prompt_tokens": 5, "completion_tokens": 3},
        "timings": {"ttft_ms": 10.0, "decode_tok_s": 50.0, "e2e_ms": 70.0},
    }).encode()


class _Device:
    """Publishes results as an agent's outbox does: QoS 1, waiting for each PUBACK."""

    def __init__(self, cfg: BrokerConfig) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"dev-{uuid.uuid4()}",
                                  protocol=MQTTProtocolVersion.MQTTv5)
        self.client.connect(cfg.host, cfg.port)
        self.client.loop_start()

    def publish(self, seq: int) -> None:
        info = self.client.publish("edgelm/v1/sf/d1/infer/response/x", _result("d1", seq), qos=1)
        info.wait_for_publish(10)
        assert info.is_published()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _stored(store: FleetStore) -> list[int]:
    return [int(r[0]) for r in store.query("SELECT seq FROM results ORDER BY seq")]


def _collector(store: FleetStore, cfg: BrokerConfig, client_id: str, expiry_s: int
               ) -> FleetCollector:
    col = FleetCollector(store, cfg, "sf", client_id=client_id, session_expiry_s=expiry_s)
    col.start()
    assert col.wait_connected(10)
    return col


@pytest.mark.parametrize("protocol", [5, 3])
@pytest.mark.parametrize("expiry_s", [3600, 0])
def test_results_sent_while_the_collector_restarts(
    tmp_path: Path, broker: Mosquitto, protocol: int, expiry_s: int
) -> None:
    cfg: BrokerConfig = parse_broker_url(broker.url)
    cfg = BrokerConfig(**{**cfg.__dict__, "protocol": protocol})
    store = FleetStore(f"sqlite:///{tmp_path / 'fleet.db'}")
    device = _Device(cfg)
    client_id = f"collector-{protocol}"
    col = _collector(store, cfg, client_id, expiry_s)
    try:
        # the subscription is live once a result published now is stored
        device.publish(1)
        wait_for(lambda: _stored(store) == [1], "the first result", 10)
        col.stop()
        for seq in (2, 3, 4):  # while no collector is connected
            device.publish(seq)
        col = _collector(store, cfg, client_id, expiry_s)
        device.publish(5)
        wait_for(lambda: 5 in _stored(store), "the result sent after the restart", 10)
        if expiry_s:
            assert col._link.session_present is True
            wait_for(lambda: _stored(store) == [1, 2, 3, 4, 5], "the queued results", 10)
        else:
            # the control: a clean session is a new subscriber; the broker dropped 2-4
            assert col._link.session_present is False
            time.sleep(0.5)
            assert _stored(store) == [1, 5]
    finally:
        col.stop()
        device.close()
        store.close()


def test_collect_refuses_a_client_id_with_topic_wildcards(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from agent.cli import main

    res = CliRunner().invoke(main, ["collect", "--fleet", "sf", "--db",
                                    f"sqlite:///{tmp_path / 'f.db'}", "--client-id", "a/#"])
    assert res.exit_code == 78, res.output
    assert "--client-id" in res.output
    assert not (tmp_path / "f.db").exists()
