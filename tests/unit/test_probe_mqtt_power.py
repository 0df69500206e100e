from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from agent.energy import integrate
from agent.sampler import Sampler
from probes.base import PowerCoverage
from probes.mqtt_power import (
    MalformedPayloadError,
    MqttPowerProbe,
    parse_plug_payload,
    topic_matches,
)
from probes.registry import create_probes
from tests.support import Mosquitto, TestClient

# Tasmota tele/<topic>/SENSOR as published by a power-monitoring plug (Tasmota docs; see the
# module docstring), and a Shelly Gen2 <id>/status/switch:0 status (Switch component docs).
TASMOTA = {
    "Time": "2022-01-11T21:57:38",
    "ENERGY": {"TotalStartTime": "2020-10-21T22:15:00", "Total": 3.705, "Yesterday": 0.028,
               "Today": 0.026, "Period": 1, "Power": 5, "ApparentPower": 5,
               "ReactivePower": 0, "Factor": 1.00, "Voltage": 233, "Current": 0.021},
}
SHELLY = {
    "id": 0, "source": "init", "output": True, "apower": 4.2, "voltage": 229.9,
    "current": 0.031, "aenergy": {"total": 1234.567, "by_minute": [70.1, 71.3, 69.9],
                                  "minute_ts": 1700000000},
    "temperature": {"tC": 41.2, "tF": 106.2},
}


class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def b(obj: Any) -> bytes:
    return json.dumps(obj).encode()


# -- payload decoding --------------------------------------------------------------------


def test_tasmota_sensor_payload_exact_units() -> None:
    msg = parse_plug_payload(b(TASMOTA))
    assert msg.format == "tasmota"
    assert msg.power_mw == 5000.0
    assert msg.energy_total_mj == pytest.approx(3.705 * 3.6e9)  # kWh → mJ


def test_tasmota_status10_and_multichannel() -> None:
    nested = {"StatusSNS": {"Time": "x", "ENERGY": {"Total": 0.5, "Power": [12.5, 0, 3]}}}
    msg = parse_plug_payload(b(nested))
    assert msg.power_mw == 15500.0  # channels summed
    assert msg.energy_total_mj == pytest.approx(0.5 * 3.6e9)


def test_shelly_gen2_switch_status_exact_units() -> None:
    msg = parse_plug_payload(b(SHELLY))
    assert msg.format == "shelly_gen2"
    assert msg.power_mw == pytest.approx(4200.0)
    assert msg.energy_total_mj == pytest.approx(1234.567 * 3.6e6)  # Wh → mJ


@pytest.mark.parametrize("payload", [
    b"not json",
    b"[1, 2]",
    b'{"ENERGY": {"Total": 1.0}}',
    b'{"ENERGY": {"Power": "5"}}',
    b'{"ENERGY": {"Power": -3}}',
    b'{"ENERGY": {"Power": []}}',
    b'{"ENERGY": {"Power": true}}',
    b'{"apower": NaN}',
    b'{"apower": 1, "aenergy": {"total": "x"}}',
    b'{"Time": "2022-01-11T21:57:38", "DS18B20": {"Temperature": 21.0}}',
    b"\xff\xfe",
])
def test_malformed_payloads_are_rejected(payload: bytes) -> None:
    with pytest.raises(MalformedPayloadError):
        parse_plug_payload(payload)


def test_topic_filter_matching() -> None:
    assert topic_matches("tele/+/SENSOR", "tele/plug1/SENSOR")
    assert topic_matches("shelly/#", "shelly/status/switch:0")
    assert not topic_matches("tele/plug1/SENSOR", "tele/plug2/SENSOR")
    assert not topic_matches("tele/+", "tele/plug1/SENSOR")


# -- the probe, fed directly ----------------------------------------------------------------


def test_unconfigured_is_unavailable_with_reason() -> None:
    probe = MqttPowerProbe()
    avail = probe.check()
    assert not avail.ok and "topic" in avail.reason
    assert probe.power(probe.sample()) == []


def test_first_sample_before_any_message_is_none_with_reason() -> None:
    probe = MqttPowerProbe(topic="tele/p/SENSOR", clock=FakeClock())
    r = probe.sample()
    assert r.power_mw is None and r.age_ms is None and "no power message" in (r.reason or "")
    avail = probe.check()
    assert avail.ok and avail.degraded and "no power message" in avail.reason
    (pw,) = probe.power(r)
    assert pw.power_mw is None and pw.covers == PowerCoverage.BOARD_INPUT


def test_feed_sample_age_and_staleness() -> None:
    clock = FakeClock(100.0)
    probe = MqttPowerProbe(topic="tele/p/SENSOR", max_age_s=30.0, clock=clock)
    assert probe.feed("tele/p/SENSOR", b(TASMOTA))
    clock.t = 112.5
    r = probe.sample()
    assert r.power_mw == 5000.0 and r.age_ms == pytest.approx(12_500.0)
    assert r.format == "tasmota" and r.messages == 1 and r.reason is None
    (pw,) = probe.power(r)
    assert pw.source == "mqtt_plug:tele/p/SENSOR" and pw.covers == PowerCoverage.BOARD_INPUT
    assert pw.power_mw == 5000.0 and pw.energy_mj is None  # a rail, never a counter
    assert probe.check().ok and not probe.check().degraded
    clock.t = 130.5  # 30.5 s old
    stale = probe.sample()
    assert stale.power_mw is None and "stale" in (stale.reason or "")
    assert stale.energy_total_mj == pytest.approx(3.705 * 3.6e9)  # still reported, labelled
    avail = probe.check()
    assert avail.ok and avail.degraded and "stale" in avail.reason
    probe.feed("tele/p/SENSOR", b({"ENERGY": {"Power": 7.25}}))
    assert probe.sample().power_mw == 7250.0


def test_malformed_message_is_counted_and_keeps_the_last_good_value() -> None:
    clock = FakeClock()
    probe = MqttPowerProbe(topic="s/status/switch:0", clock=clock)
    assert probe.feed("s/status/switch:0", b(SHELLY))
    assert not probe.feed("s/status/switch:0", b"garbage")
    assert not probe.feed("other/topic", b(SHELLY))  # not ours: ignored, not counted
    r = probe.sample()
    assert r.power_mw == pytest.approx(4200.0)
    assert r.malformed == 1 and r.messages == 1 and "not JSON" in (r.last_error or "")


def test_only_malformed_messages_say_so() -> None:
    probe = MqttPowerProbe(topic="t", clock=FakeClock())
    probe.feed("t", b'{"ENERGY": {}}')
    r = probe.sample()
    assert r.power_mw is None and "1 malformed" in (r.reason or "")


def test_feed_is_thread_safe() -> None:
    probe = MqttPowerProbe(topic="t")

    def feeder(watts: float) -> None:
        for _ in range(500):
            probe.feed("t", b({"apower": watts}))

    threads = [threading.Thread(target=feeder, args=(w,)) for w in (1.0, 2.0, 3.0, 4.0)]
    for t in threads:
        t.start()
    for _ in range(200):
        probe.sample()  # concurrent reads see a consistent value
    for t in threads:
        t.join()
    r = probe.sample()
    assert r.messages == 2000 and r.power_mw in (1000.0, 2000.0, 3000.0, 4000.0)


def test_bad_max_age_is_refused() -> None:
    with pytest.raises(ValueError):
        MqttPowerProbe(topic="t", max_age_s=0)


def test_registered_entry_point_with_options() -> None:
    (probe,) = create_probes(["mqtt_power"], options={"mqtt_power": {"topic": "tele/x/SENSOR"}})
    assert isinstance(probe, MqttPowerProbe) and probe.topic == "tele/x/SENSOR"


def test_bad_broker_url_is_unavailable_with_reason() -> None:
    probe = MqttPowerProbe(topic="t", broker="https://example.invalid")
    avail = probe.check()
    assert not avail.ok and "mqtt://host" in avail.reason


def test_energy_from_the_plug_is_board_input_and_exact() -> None:
    """Held plug power integrates like any rail: 6 W for 2 s at 10 Hz = 12 J, board input."""
    clock = FakeClock(0.0)
    probe = MqttPowerProbe(topic="tele/p/SENSOR", clock=clock)
    sampler = Sampler([probe], interval_s=0.1, clock=clock, wall_clock=lambda: 0.0)
    probe.feed("tele/p/SENSOR", b({"ENERGY": {"Power": 6}}))
    for i in range(31):
        clock.t = i * 0.1
        sampler.sample_once()
    res = integrate(sampler.history(), 0.5, 2.5, tokens=10)
    assert res.method == "board_input" and res.sources == ("mqtt_plug:tele/p/SENSOR",)
    assert res.gross_energy_mj == pytest.approx(12_000.0)
    assert not res.estimated


# -- with a real broker -------------------------------------------------------------------


def wait_for(pred: Callable[[], bool], timeout_s: float = 10.0) -> None:
    end = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > end:
            raise TimeoutError("condition not met")
        time.sleep(0.02)


def publish_retained(client: TestClient, topic: str, payload: bytes) -> None:
    client.client.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)


@pytest.mark.broker
def test_own_client_reads_tasmota_then_shelly_from_a_real_broker(
        broker: Mosquitto, mqtt_client: TestClient) -> None:
    plug = f"plug-{uuid.uuid4().hex[:6]}"
    tasmota_topic = f"tele/{plug}/SENSOR"
    # retained, so it arrives whenever the probe's subscription is in place
    publish_retained(mqtt_client, tasmota_topic, b(TASMOTA))
    probe = MqttPowerProbe(topic=tasmota_topic, broker=broker.url)
    try:
        assert probe.check().ok
        wait_for(lambda: probe.sample().power_mw is not None)
        r = probe.sample()
        assert r.power_mw == 5000.0 and r.format == "tasmota" and r.topic == tasmota_topic
        mqtt_client.publish(tasmota_topic, b"{broken")
        wait_for(lambda: probe.sample().malformed == 1)
        assert probe.sample().power_mw == 5000.0
        mqtt_client.publish(tasmota_topic, b({"ENERGY": {"Power": 3.5, "Total": 1.0}}))
        wait_for(lambda: probe.sample().power_mw == 3500.0)
    finally:
        probe.close()
        publish_retained(mqtt_client, tasmota_topic, b"")  # clear the retained message

    shelly_topic = f"shellyplugsg3-{uuid.uuid4().hex[:6]}/status/switch:0"
    publish_retained(mqtt_client, shelly_topic, b(SHELLY))
    probe = MqttPowerProbe(topic=shelly_topic, broker=broker.url)
    try:
        assert probe.check().ok
        wait_for(lambda: probe.sample().power_mw is not None)
        r = probe.sample()
        assert r.power_mw == pytest.approx(4200.0) and r.format == "shelly_gen2"
        assert r.energy_total_mj == pytest.approx(1234.567 * 3.6e6)
    finally:
        probe.close()
        publish_retained(mqtt_client, shelly_topic, b"")


@pytest.mark.broker
def test_external_subscriber_feeds_the_probe_and_staleness_applies(
        broker: Mosquitto, mqtt_client: TestClient) -> None:
    """The agent's own subscriber calls feed() from paho's thread; sample() never networks."""
    topic = f"tele/plug-{uuid.uuid4().hex[:6]}/SENSOR"
    clock = FakeClock(50.0)
    probe = MqttPowerProbe(topic=topic, max_age_s=20.0, clock=clock)
    subscriber = TestClient(broker.port)
    try:
        subscriber.client.on_message = lambda _c, _u, m: probe.feed(m.topic, m.payload)
        subscriber.subscribe(topic)
        mqtt_client.publish(topic, b({"ENERGY": {"Power": 11.25}}))
        wait_for(lambda: probe.sample().messages == 1)
        assert probe.sample().power_mw == 11250.0
        clock.t += 20.5
        r = probe.sample()
        assert r.power_mw is None and "stale" in (r.reason or "")
        mqtt_client.publish(topic, b({"ENERGY": {"Power": [1, 2]}}))
        wait_for(lambda: probe.sample().messages == 2)
        assert probe.sample().power_mw == 3000.0
    finally:
        subscriber.close()
