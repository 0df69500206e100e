"""Board power from a smart plug that publishes over MQTT (Tasmota, Shelly Gen2).

A metered plug between the wall and the board's power supply is a common way to meter a Pi
fleet. It measures **everything behind the socket**: the board, the PSU's conversion losses
(typically 10-20 % of a few-watt load), USB peripherals, fans, an SSD. So it is published as
coverage ``board_input`` and reads *more* than the SoC rails a PMIC or INA3221 reports; it is
the right figure for "what does a response cost at the wall", not for "what does the SoC use".

Payloads understood (units as the devices publish them; converted to mW / mJ here):

- **Tasmota**, ``tele/<topic>/SENSOR`` every ``TelePeriod`` seconds (10-3600, default 300)::

      {"Time": "2022-01-11T21:57:38",
       "ENERGY": {"TotalStartTime": "2020-10-21T22:15:00", "Total": 3.705,
                  "Yesterday": 0.028, "Today": 0.026, "Power": 5, "Voltage": 233, ...}}

  ``Power`` is W (a list on multi-channel devices, summed here), ``Total`` is kWh. The same
  ``ENERGY`` object nested in ``StatusSNS`` (``stat/<topic>/STATUS10``) is accepted too.
  Sources: Tasmota MQTT and command docs (https://tasmota.github.io/docs/MQTT/ for the
  ``tele/`` prefix, https://tasmota.github.io/docs/Commands/ for ``TelePeriod``); example
  payload from https://blog.mylocalbytes.com/kb/2022-01-10/LB-PM-Power-Monitoring.
- **Shelly Gen2/Gen3**, ``<topic_prefix>/status/switch:<id>`` (the whole component status,
  published when it changes, with the MQTT ``status_ntf`` option on)::

      {"id": 0, "source": "init", "output": true, "apower": 4.2, "voltage": 229.9,
       "current": 0.03, "aenergy": {"total": 1234.567, "by_minute": [...], "minute_ts": ...},
       "temperature": {"tC": 41.2, "tF": 106.2}}

  ``apower`` is W, ``aenergy.total`` is Wh. Sources:
  https://shelly-api-docs.shelly.cloud/gen2/ComponentsAndServices/Mqtt (status topic) and
  https://shelly-api-docs.shelly.cloud/gen2/ComponentsAndServices/Switch (status fields).

The sampler never touches the network: whoever subscribes (the agent's MQTT client, or this
probe's own paho client when ``broker`` is given) calls :meth:`MqttPowerProbe.feed` with each
message; :meth:`~MqttPowerProbe.sample` only reads the latest value under a lock. A value older
than ``max_age_s`` is stale and becomes ``None`` with the reason, never the last known watts.

A plug refreshes its reading every few seconds at best, so inside a sub-second request the
power is sample-and-hold: fine for the mean power of a bench run, coarse for one short request.
The plug's lifetime energy counter (1 Wh resolution on Tasmota) is reported but not used for
energy windows: it is far too coarse, so only ``power_mw`` is handed to the energy integrator.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from probes.base import Availability, PowerCoverage, PowerReading, Probe

logger = logging.getLogger(__name__)

MJ_PER_KWH = 3.6e9
MJ_PER_WH = 3.6e6
DEFAULT_MAX_AGE_S = 30.0


class MalformedPayloadError(ValueError):
    """A message on the plug's topic that carries no usable power value."""


@dataclass(frozen=True)
class PlugMessage:
    """One decoded plug message.

    Attributes:
        format: ``"tasmota"`` or ``"shelly_gen2"``.
        power_mw: Active power, mW.
        energy_total_mj: The plug's lifetime energy counter, mJ; None when not sent.
    """

    format: str
    power_mw: float
    energy_total_mj: float | None


@dataclass(frozen=True)
class MqttPowerReadings:
    """The plug's latest value, as the sampler sees it.

    Attributes:
        power_mw: Latest active power, mW; None when nothing fresh has arrived (see ``reason``).
        age_ms: Time since that value arrived, ms; None before the first message.
        energy_total_mj: The plug's lifetime energy counter, mJ (coarse; not integrated).
        format: Payload format of the latest good message (``tasmota`` / ``shelly_gen2``).
        topic: Topic of the latest good message.
        messages: Good messages received so far.
        malformed: Messages rejected so far.
        last_error: Why the most recent rejected message was rejected.
        reason: Why ``power_mw`` is None; None when it is not.
    """

    power_mw: float | None
    age_ms: float | None
    energy_total_mj: float | None
    format: str | None
    topic: str | None
    messages: int
    malformed: int
    last_error: str | None
    reason: str | None


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MalformedPayloadError(f"{what} is not a number: {value!r}")
    f = float(value)
    if not math.isfinite(f):
        raise MalformedPayloadError(f"{what} is not finite: {value!r}")
    return f


def _watts(value: Any, what: str) -> float:
    if isinstance(value, list):
        if not value:
            raise MalformedPayloadError(f"{what} is an empty list")
        # Multi-channel Tasmota devices send one value per relay; the plug's total is the sum.
        watts = sum(_number(v, what) for v in value)
    else:
        watts = _number(value, what)
    if watts < 0:
        raise MalformedPayloadError(f"{what} is negative ({watts} W)")
    return watts


def parse_plug_payload(payload: bytes | str) -> PlugMessage:
    """Decode a Tasmota ``SENSOR``/``STATUS10`` or Shelly Gen2 ``switch`` status payload.

    Raises:
        MalformedPayloadError: Not JSON, or no power value in a known place, or a value that
            is not a finite, non-negative number.
    """
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedPayloadError(f"not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise MalformedPayloadError(f"expected a JSON object, got {type(obj).__name__}")
    energy = obj.get("ENERGY")
    if energy is None and isinstance(obj.get("StatusSNS"), dict):
        energy = obj["StatusSNS"].get("ENERGY")
    if energy is not None:
        if not isinstance(energy, dict) or "Power" not in energy:
            raise MalformedPayloadError("Tasmota ENERGY object without Power")
        watts = _watts(energy["Power"], "ENERGY.Power")
        total = energy.get("Total")
        total_mj = _number(total, "ENERGY.Total") * MJ_PER_KWH if total is not None else None
        return PlugMessage("tasmota", watts * 1000.0, total_mj)
    if "apower" in obj:
        watts = _watts(obj["apower"], "apower")
        aenergy = obj.get("aenergy")
        total_mj = None
        if isinstance(aenergy, dict) and aenergy.get("total") is not None:
            total_mj = _number(aenergy["total"], "aenergy.total") * MJ_PER_WH
        return PlugMessage("shelly_gen2", watts * 1000.0, total_mj)
    raise MalformedPayloadError(
        "no power value: expected Tasmota {'ENERGY': {'Power': W}} or Shelly {'apower': W}"
    )


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT topic-filter matching (``+`` one level, ``#`` the rest), as a broker does it."""
    pat, top = pattern.split("/"), topic.split("/")
    for i, p in enumerate(pat):
        if p == "#":
            return True
        if i >= len(top) or (p != "+" and p != top[i]):
            return False
    return len(pat) == len(top)


class MqttPowerProbe(Probe):
    """Board-input power from a Tasmota or Shelly Gen2 smart plug (source ``mqtt_plug:<topic>``).

    Args:
        root: Filesystem root (unused: the plug is read over MQTT; kept for the probe contract).
        topic: Topic (or filter) the plug publishes on, e.g. ``tele/pi-07-plug/SENSOR`` or
            ``shellyplugsg3-a1b2c3/status/switch:0``. Messages on other topics are ignored.
        broker: Optional ``mqtt://host[:port]`` URL: the probe then runs its own paho client
            (started by the first :meth:`check`) and subscribes to ``topic``. Without it, the
            caller feeds messages through :meth:`feed`.
        max_age_s: A value older than this is stale: ``power_mw`` becomes None with a reason.
            Set it above the plug's reporting interval (Tasmota: ``TelePeriod 10``).
        username: Broker user name, when the broker needs one.
        password_env: Name of the environment variable that holds the broker password.
        clock: Monotonic clock, s (tests inject one).
    """

    name = "mqtt_power"

    def __init__(
        self,
        root: str | os.PathLike[str] = "/",
        *,
        topic: str | None = None,
        broker: str | None = None,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        username: str | None = None,
        password_env: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(root)
        if max_age_s <= 0:
            raise ValueError("max_age_s must be > 0")
        self.topic = topic
        self.broker = broker
        self.max_age_s = float(max_age_s)
        self._username = username
        self._password_env = password_env
        self._clock = clock
        self._lock = threading.Lock()
        self._latest: PlugMessage | None = None
        self._latest_topic: str | None = None
        self._latest_at: float | None = None
        self._messages = 0
        self._malformed = 0
        self._last_error: str | None = None
        self._client: Any = None
        self._client_error: str | None = None

    @property
    def source(self) -> str:
        """The power source id this probe reports."""
        return f"mqtt_plug:{self.topic or 'fed'}"

    # -- input (called by an MQTT subscriber's thread) -------------------------------------

    def feed(self, topic: str, payload: bytes | str) -> bool:
        """Hand over one MQTT message; thread-safe and never blocks on I/O.

        Args:
            topic: The message's topic.
            payload: The raw payload bytes.

        Returns:
            True when the message carried a power value and became the latest reading; False
            when it was for another topic or malformed (malformed ones are counted).
        """
        if self.topic is not None and not topic_matches(self.topic, topic):
            return False
        try:
            msg = parse_plug_payload(payload)
        except MalformedPayloadError as exc:
            with self._lock:
                self._malformed += 1
                self._last_error = f"{topic}: {exc}"
            logger.debug("smart plug message rejected on %s: %s", topic, exc)
            return False
        now = self._clock()
        with self._lock:
            self._latest, self._latest_topic, self._latest_at = msg, topic, now
            self._messages += 1
        return True

    # -- probe contract --------------------------------------------------------------------

    def check(self) -> Availability:
        """Configured, connected (when it owns a client) and fresh; starts its client once."""
        if self.topic is None:
            return Availability(
                False,
                "no smart plug configured: set the mqtt_power probe's topic (e.g. "
                "tele/<plug>/SENSOR for Tasmota, <id>/status/switch:0 for Shelly Gen2)",
            )
        if self.broker is not None and self._client is None and self._client_error is None:
            self._connect()
        if self._client_error is not None:
            return Availability(False, self._client_error)
        r = self.sample()
        if r.power_mw is None:
            return Availability(True, r.reason or "", degraded=True)
        return Availability(True, "plug measures the whole board at the wall, PSU losses included")

    def sample(self) -> MqttPowerReadings:
        """The latest plug value and its age; None with a reason when none is fresh."""
        with self._lock:
            latest, topic, at = self._latest, self._latest_topic, self._latest_at
            messages, malformed, last_error = self._messages, self._malformed, self._last_error
        age_s = self._clock() - at if at is not None else None
        power: float | None = None
        reason: str | None = None
        if latest is None:
            reason = f"no power message received yet on {self.topic or 'the fed topic'}"
            if last_error:
                reason += f" ({malformed} malformed; last: {last_error})"
        elif age_s is not None and age_s > self.max_age_s:
            reason = (f"stale: last plug message {age_s:.1f} s ago > max_age_s "
                      f"{self.max_age_s:g} (plug offline, or its report interval is longer)")
        else:
            power = latest.power_mw
        return MqttPowerReadings(
            power_mw=power,
            age_ms=age_s * 1000.0 if age_s is not None else None,
            energy_total_mj=latest.energy_total_mj if latest else None,
            format=latest.format if latest else None,
            topic=topic,
            messages=messages,
            malformed=malformed,
            last_error=last_error,
            reason=reason,
        )

    def power(self, readings: MqttPowerReadings) -> list[PowerReading]:
        """The plug's power as a ``board_input`` rail (None while stale or before a message)."""
        if self.topic is None:
            return []
        return [PowerReading(self.source, PowerCoverage.BOARD_INPUT, readings.power_mw)]

    def close(self) -> None:
        """Stop this probe's own MQTT client, if it started one."""
        client, self._client = self._client, None
        if client is not None:
            try:
                client.disconnect()
                client.loop_stop()
            except Exception as exc:  # closing must not raise into the sampler's shutdown
                logger.warning("smart plug MQTT client did not close cleanly: %s", exc)

    # -- optional own client ---------------------------------------------------------------

    def _connect(self) -> None:
        """Start a paho client in the background (connect_async: nothing here blocks)."""
        assert self.broker is not None and self.topic is not None
        parts = urlsplit(self.broker if "://" in self.broker else f"mqtt://{self.broker}")
        if parts.scheme not in ("mqtt", "tcp") or not parts.hostname:
            self._client_error = (f"mqtt_power broker {self.broker!r}: expected "
                                  "mqtt://host[:port] (TLS is not supported by this probe)")
            return
        try:
            import paho.mqtt.client as paho
            from paho.mqtt.enums import CallbackAPIVersion
        except ImportError as exc:
            self._client_error = f"paho-mqtt is not installed: {exc}"
            return
        topic = self.topic
        client = paho.Client(CallbackAPIVersion.VERSION2,
                             client_id=f"edgelm-plug-{os.getpid()}-{id(self):x}")
        if self._username:
            password = os.environ.get(self._password_env) if self._password_env else None
            client.username_pw_set(self._username, password)

        def on_connect(c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            if not getattr(reason, "is_failure", False):
                c.subscribe(topic, qos=0)  # (re)subscribe on every connect
            else:
                logger.warning("smart plug broker refused the connection: %s", reason)

        def on_message(_c: Any, _u: Any, msg: Any) -> None:
            self.feed(msg.topic, bytes(msg.payload))

        client.on_connect = on_connect
        client.on_message = on_message
        client.reconnect_delay_set(1, 30)
        try:
            client.connect_async(parts.hostname, parts.port or 1883, keepalive=30)
            client.loop_start()
        except Exception as exc:  # paho raises ValueError/OSError for a bad host
            self._client_error = f"cannot start the smart plug MQTT client: {exc}"
            return
        self._client = client
