"""The MQTT link: one paho-mqtt 2.x client, its reconnect loop and its last will.

Concurrency model (one for the whole daemon): paho's network loop runs in its own thread
(``loop_start``); callbacks run on it and must not block, so they only parse and enqueue.
``publish`` is safe from any thread. A broker that is down at start is normal: paho keeps
retrying with the configured backoff, and every (re)connect re-subscribes and re-announces.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.errors import ConfigError, PublishError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BrokerConfig:
    """Where and how to connect.

    Attributes:
        host / port: Broker address.
        tls: Use TLS (``mqtts://``); ``ca_file``/``cert_file``/``key_file`` as needed.
        username / password: MQTT credentials (from the URL or config).
        protocol: 5 (default; ACL denials and response topics are visible) or 3 (3.1.1).
        keepalive_s: MQTT keepalive; the LWT fires about 1.5× this after a silent death.
        reconnect_min_s / reconnect_max_s: Reconnect backoff bounds.
    """

    host: str
    port: int = 1883
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password: str | None = None
    protocol: int = 5
    keepalive_s: int = 30
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 30.0


def parse_broker_url(url: str) -> BrokerConfig:
    """Parse ``mqtt://[user:pass@]host[:port]`` or ``mqtts://…`` (TLS, default port 8883).

    Raises:
        ConfigError: Naming what is wrong with the URL.
    """
    parsed = urllib.parse.urlsplit(url if "://" in url else f"mqtt://{url}")
    if parsed.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ConfigError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
    if not parsed.hostname:
        raise ConfigError(f"broker URL {url!r} has no host")
    tls = parsed.scheme in ("mqtts", "ssl")
    try:
        port = parsed.port or (8883 if tls else 1883)
    except ValueError:
        raise ConfigError(f"broker URL {url!r} has an invalid port") from None
    return BrokerConfig(
        host=parsed.hostname, port=port, tls=tls,
        username=urllib.parse.unquote(parsed.username) if parsed.username else None,
        password=urllib.parse.unquote(parsed.password) if parsed.password else None,
    )


Message = Any  # paho.mqtt.client.MQTTMessage
MessageHandler = Callable[[Message], None]


class MqttLink:
    """A resilient MQTT connection with a retained last will.

    Args:
        config: Broker settings.
        client_id: MQTT client id (unique per device).
        will: ``(topic, payload)`` published retained with QoS 1 by the broker if the agent
            dies without disconnecting.
        subscriptions: ``(topic filter, qos)`` pairs subscribed on every connect.
        on_message: Called on paho's thread for every message; must not block.
        on_connect: Called on paho's thread after each successful (re)connect and subscribe.
    """

    def __init__(
        self,
        config: BrokerConfig,
        client_id: str,
        will: tuple[str, bytes],
        subscriptions: Sequence[tuple[str, int]],
        on_message: MessageHandler,
        on_connect: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self._subs = list(subscriptions)
        self._on_message_cb = on_message
        self._on_connect_cb = on_connect
        self._connected = threading.Event()
        self.connects = 0
        protocol = MQTTProtocolVersion.MQTTv5 if config.protocol == 5 else (
            MQTTProtocolVersion.MQTTv311)
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
            reconnect_on_failure=True,
        )
        client.enable_logger(logging.getLogger("paho"))
        if config.username is not None:
            client.username_pw_set(config.username, config.password)
        if config.tls:
            ctx = ssl.create_default_context(cafile=config.ca_file)
            if config.cert_file:
                ctx.load_cert_chain(config.cert_file, config.key_file)
            client.tls_set_context(ctx)
        client.will_set(will[0], will[1], qos=1, retain=True)
        client.reconnect_delay_set(
            min_delay=max(1, int(config.reconnect_min_s)),
            max_delay=max(1, int(config.reconnect_max_s)),
        )
        client.max_queued_messages_set(10_000)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        self._client = client

    @property
    def protocol(self) -> int:
        """MQTT protocol major version in use (5 or 3)."""
        return self.config.protocol

    def is_connected(self) -> bool:
        """True while a CONNACK-accepted session is up."""
        return self._connected.is_set()

    def wait_connected(self, timeout_s: float) -> bool:
        """Block until connected or the timeout passes."""
        return self._connected.wait(timeout_s)

    def start(self) -> None:
        """Begin connecting in the background; never raises for an unreachable broker."""
        props = None
        if self.config.protocol == 5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 0
        try:
            self._client.connect_async(
                self.config.host, self.config.port, keepalive=self.config.keepalive_s,
                clean_start=True, properties=props,
            )
        except (OSError, ValueError) as exc:
            raise ConfigError(f"broker {self.config.host}:{self.config.port}: {exc}") from exc
        self._client.loop_start()

    def _handle_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        if reason_code.is_failure:
            logger.error("broker refused the connection: %s", reason_code)
            return
        self.connects += 1
        for topic, qos in self._subs:
            client.subscribe(topic, qos=qos)
        self._connected.set()
        logger.info("connected to %s:%d (connect #%d)", self.config.host, self.config.port,
                    self.connects)
        if self._on_connect_cb is not None:
            try:
                self._on_connect_cb()
            except Exception:
                logger.exception("on_connect handler failed")

    def _handle_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if was:
            logger.warning("disconnected from broker: %s; reconnecting", reason_code)

    def _handle_message(self, client: paho.Client, userdata: Any, msg: Message) -> None:
        try:
            self._on_message_cb(msg)
        except Exception:  # a handler bug must never kill paho's network thread
            logger.exception("message handler failed for topic %s", msg.topic)

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> paho.MQTTMessageInfo:
        """Queue a publish (thread-safe). QoS 1/2 messages are kept while disconnected.

        Raises:
            PublishError: The client rejected the message (queue full, payload too large).
        """
        info = self._client.publish(topic, payload, qos=qos, retain=retain,
                                    properties=properties)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            raise PublishError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        return info

    def stop(self, timeout_s: float = 2.0, pending: Sequence[paho.MQTTMessageInfo] = ()) -> None:
        """Wait (bounded) for ``pending`` publishes, then disconnect cleanly."""
        end = time.monotonic() + timeout_s
        for info in pending:
            remaining = end - time.monotonic()
            if remaining <= 0 or not self.is_connected():
                break
            try:
                info.wait_for_publish(timeout=remaining)
            except (RuntimeError, ValueError):
                break
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()
            self._connected.clear()


def reply_properties(correlation_data: bytes | None) -> Properties | None:
    """MQTT v5 PUBLISH properties carrying a request's correlation data."""
    if correlation_data is None:
        return None
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.CorrelationData = correlation_data
    return props
