"""The MQTT link: one paho-mqtt 2.x client, our own network thread, and its last will.

Protocol rules embodied here (DESIGN.md §4, issue 5):

- **One concurrency model**: a single network thread (``edgelm-mqtt``) owned by this module
  runs the client as paho's "external event loop" (``select`` on the socket and a wake-up
  pipe, then ``loop_read``/``loop_write``/``loop_misc``); paho callbacks run on it and must not
  block, so they only parse and enqueue. ``publish`` is safe from any thread and never waits:
  it appends to paho's queue and then, if the network thread is not using the socket at that
  moment (a non-blocking try of the I/O lock), writes the queued packets itself on the
  non-blocking socket; otherwise (or if the socket is full) it wakes the network thread to
  write them. Writing from the publishing thread takes a thread wake-up off every streamed
  chunk: on a loaded 2-core board each wake-up waits for a time slice (and the GIL), which
  was the largest part of the latency the daemon adds. The I/O lock also keeps a TLS
  connection's reads and writes from overlapping (an OpenSSL object is not safe for that).
- **Reconnect with capped exponential backoff and jitter.** paho's own reconnect delay has no
  jitter, so a fleet that lost its broker would reconnect in lockstep; this thread drives
  reconnects itself with :class:`ReconnectBackoff` ("full jitter" between the floor and the
  capped exponential, AWS architecture blog, 2015). A broker that is down at boot is normal:
  nothing here raises or exits for it.
- **CONNACK timeout**: a broker that accepts TCP but never answers (frozen with SIGSTOP, a
  half-open NAT) is abandoned after ``connect_timeout_s`` and retried with backoff.
- **Re-subscribe on every connect** (clean start: the broker keeps nothing for us) and
  re-announce through the ``on_connect`` hook.
- **MQTT v5 Maximum Packet Size** is advertised in CONNECT, so the broker drops oversized
  packets before they reach (and fill) the agent's memory.
"""

from __future__ import annotations

import contextlib
import logging
import random
import select
import socket
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
        reconnect_min_s / reconnect_max_s: Reconnect backoff bounds (jittered).
        connect_timeout_s: Longest wait for TCP/TLS connect and then for CONNACK.
        max_packet_bytes: MQTT v5 Maximum Packet Size advertised to the broker (0: none).
        max_queued_messages: Most messages paho holds unsent (bounds its memory).
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
    connect_timeout_s: float = 10.0
    max_packet_bytes: int = 16 * 1024 * 1024
    max_queued_messages: int = 10_000


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


class ReconnectBackoff:
    """Capped exponential backoff with full jitter.

    The n-th consecutive failure waits ``uniform(floor, min(cap, floor * 2**n))`` seconds, so
    the wait never exceeds ``cap``: a broker that comes back is found within one ``cap``.

    Args:
        floor_s: Smallest delay, s.
        cap_s: Largest delay, s.
        rand: ``uniform(a, b)`` (injectable for tests).
    """

    def __init__(self, floor_s: float, cap_s: float,
                 rand: Callable[[float, float], float] = random.uniform) -> None:
        if floor_s <= 0 or cap_s < floor_s:
            raise ValueError("need 0 < floor_s <= cap_s")
        self.floor_s = floor_s
        self.cap_s = cap_s
        self._rand = rand
        self.failures = 0

    def next_delay(self) -> float:
        """Delay before the next attempt; counts one more failure."""
        ceiling = min(self.cap_s, self.floor_s * (2.0 ** min(self.failures, 30)))
        self.failures += 1
        return min(self.cap_s, max(self.floor_s, self._rand(self.floor_s, ceiling)))

    def reset(self) -> None:
        """A connection succeeded: start again from the floor."""
        self.failures = 0


class MqttLink:
    """A resilient MQTT connection with a retained last will.

    Args:
        config: Broker settings.
        client_id: MQTT client id (unique per device).
        will: ``(topic, payload)`` published retained with QoS 1 by the broker if the agent
            dies without disconnecting.
        subscriptions: ``(topic filter, qos)`` pairs subscribed on every connect.
        on_message: Called on the network thread for every message; must not block.
        on_connect: Called on the network thread after each successful (re)connect and
            subscribe; must not block.
        on_publish: Called on the network thread when a QoS 1 publish is acknowledged.
        session_expiry_s: 0 (default): a clean session each connect, which is right for a
            device (it re-subscribes and its own outbox holds what it sends). Above 0: a
            persistent session (MQTT v5 ``Clean Start = 0`` with ``Session Expiry Interval``,
            3.1.1 ``Clean Session = 0``; the broker then keeps the subscriptions and queues
            QoS 1 messages for this client id while it is away, for that many seconds — 3.1.1
            has no expiry, the broker keeps it until ``persistent_client_expiration``). Needs
            a client id that stays the same across restarts.
    """

    def __init__(
        self,
        config: BrokerConfig,
        client_id: str,
        will: tuple[str, bytes],
        subscriptions: Sequence[tuple[str, int]],
        on_message: MessageHandler,
        on_connect: Callable[[], None] | None = None,
        on_publish: Callable[[], None] | None = None,
        session_expiry_s: int = 0,
    ) -> None:
        self.config = config
        self.session_expiry_s = session_expiry_s
        self.session_present: bool | None = None
        self._subs = list(subscriptions)
        self._on_message_cb = on_message
        self._on_connect_cb = on_connect
        self._on_publish_cb = on_publish
        self._connected = threading.Event()
        self._subscribed = threading.Event()  # every SUBACK of the current connection is in
        self._pending_subs: set[int] = set()
        self._stop = threading.Event()
        self._closing = threading.Event()
        # Held around every paho call that touches the socket (read, write, misc, connect).
        self._io_lock = threading.Lock()
        # Wakes the network thread's select() when packets wait to be written.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        # Set while a publishing thread is about to write its own packet: paho's
        # register-write callback then skips the wake-up (the thread sends one if it cannot).
        self._direct = threading.local()
        self._thread: threading.Thread | None = None
        self._backoff = ReconnectBackoff(config.reconnect_min_s, config.reconnect_max_s)
        self.connects = 0
        self.connect_failures = 0
        self.publish_denied = 0
        self.subscribe_denied = 0
        self.last_error: str | None = None
        protocol = MQTTProtocolVersion.MQTTv5 if config.protocol == 5 else (
            MQTTProtocolVersion.MQTTv311)
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
            reconnect_on_failure=False,
            # 3.1.1 only: paho refuses it for v5, where connect's clean_start says it
            clean_session=None if config.protocol == 5 else session_expiry_s <= 0,
        )
        client.enable_logger(logging.getLogger("paho"))
        if config.username is not None:
            client.username_pw_set(config.username, config.password)
        if config.tls:
            try:
                ctx = ssl.create_default_context(cafile=config.ca_file)
                if config.cert_file:
                    ctx.load_cert_chain(config.cert_file, config.key_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"TLS files for broker {config.host}: {exc}") from exc
            client.tls_set_context(ctx)
        client.will_set(will[0], will[1], qos=1, retain=True)
        client.connect_timeout = config.connect_timeout_s
        client.max_queued_messages_set(config.max_queued_messages)
        # The outbox drainer bounds what is in flight; paho's own cap would only make its
        # network thread re-send queued messages under its lock.
        client.max_inflight_messages_set(0)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        client.on_subscribe = self._handle_subscribe
        # Tell paho an external loop exists (ours): a publish then only queues the packet and
        # calls this, and the socket is written only under our I/O lock.
        client.on_socket_register_write = self._want_write
        client.on_socket_unregister_write = lambda *_: None
        client.on_socket_open = _no_delay
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

    def wait_subscribed(self, timeout_s: float) -> bool:
        """Block until the broker has acknowledged every subscription of this connection.

        Until then a message published by someone else may not reach this client.
        """
        return self._subscribed.wait(timeout_s)

    def start(self) -> None:
        """Begin connecting in the background; never raises for an unreachable broker."""
        props = None
        if self.config.protocol == 5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = max(0, self.session_expiry_s)
            if self.config.max_packet_bytes > 0:
                props.MaximumPacketSize = self.config.max_packet_bytes
        try:
            self._client.connect_async(
                self.config.host, self.config.port, keepalive=self.config.keepalive_s,
                # v5 only (3.1.1 takes clean_session in the constructor)
                clean_start=self.session_expiry_s <= 0, properties=props,
            )
        except (OSError, ValueError) as exc:
            raise ConfigError(f"broker {self.config.host}:{self.config.port}: {exc}") from exc
        self._thread = threading.Thread(target=self._run, name="edgelm-mqtt", daemon=True)
        self._thread.start()

    # -- the network thread ------------------------------------------------------------------

    def _want_write(self, *_: Any) -> None:
        """Called by paho when packets wait: wake the network thread unless this one writes."""
        if not getattr(self._direct, "active", False):
            self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):  # full: a wake-up is pending
            self._wake_w.send(b"\0")

    def _io_once(self, timeout_s: float) -> int:
        """One turn of the external loop: wait for the socket or a wake-up, then read/write."""
        client = self._client
        sock = client.socket()
        if sock is None:
            return int(paho.MQTT_ERR_NO_CONN)
        pending = getattr(sock, "pending", None)  # TLS: decrypted bytes select() cannot see
        if pending is not None:
            with self._io_lock:  # the TLS object is shared with writing threads
                if pending() > 0:
                    timeout_s = 0.0
        wlist = [sock] if client.want_write() else []
        try:
            readable, _, _ = select.select([sock, self._wake_r], wlist, [], timeout_s)
        except (OSError, ValueError, TypeError):  # the socket was closed under us
            return int(paho.MQTT_ERR_CONN_LOST)
        if self._wake_r in readable:
            with contextlib.suppress(BlockingIOError, OSError):
                self._wake_r.recv(4096)
        with self._io_lock:
            rc = paho.MQTT_ERR_SUCCESS
            if sock in readable or (pending is not None and pending() > 0):
                rc = client.loop_read()
            if rc == paho.MQTT_ERR_SUCCESS and client.socket() is not None and (
                    client.want_write()):
                rc = client.loop_write()
            if rc == paho.MQTT_ERR_SUCCESS and client.socket() is not None:
                rc = client.loop_misc()
        return int(rc)

    def _run(self) -> None:
        client = self._client
        socket_open = False
        connect_started = 0.0
        while not self._stop.is_set():
            if self._closing.is_set():
                # Flush our DISCONNECT, then leave.
                end = time.monotonic() + 1.0
                while (time.monotonic() < end and client.socket() is not None
                       and self._io_once(0.05) == paho.MQTT_ERR_SUCCESS):
                    pass
                return
            if not socket_open:
                try:
                    with self._io_lock:
                        client.reconnect()
                except (OSError, ssl.SSLError, ValueError) as exc:
                    self._failed(f"connect to {self.config.host}:{self.config.port}: {exc}")
                    continue
                socket_open = True
                connect_started = time.monotonic()
            if client.socket() is None:  # paho closed it (keepalive/CONNACK wait expired)
                socket_open = False
                self._connected.clear()
                if not self._closing.is_set():
                    self._failed("connection closed before CONNACK or by keepalive")
                continue
            try:
                rc = self._io_once(0.1)
            except Exception as exc:  # paho internals must not end the network thread
                logger.exception("MQTT loop failed")
                rc = paho.MQTT_ERR_UNKNOWN
                self.last_error = f"{type(exc).__name__}: {exc}"
            if rc != paho.MQTT_ERR_SUCCESS:
                socket_open = False
                self._connected.clear()
                if not self._closing.is_set():
                    self._failed(f"connection lost: {paho.error_string(rc)}")
                continue
            if (not self._connected.is_set() and not self._closing.is_set()
                    and time.monotonic() - connect_started > self.config.connect_timeout_s):
                socket_open = False  # the next reconnect() closes this socket
                self._failed(f"no CONNACK within {self.config.connect_timeout_s:.0f} s")

    def _failed(self, why: str) -> None:
        self.connect_failures += 1
        delay = self._backoff.next_delay()
        if why != self.last_error or self._backoff.failures <= 1:
            logger.warning("MQTT: %s; retrying in %.1f s", why, delay)
        else:
            logger.debug("MQTT: %s; retrying in %.1f s", why, delay)
        self.last_error = why
        self._stop.wait(delay)

    def _handle_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        if reason_code.is_failure:
            self.last_error = f"broker refused the connection: {reason_code}"
            logger.error("%s", self.last_error)
            return
        self.connects += 1
        self._backoff.reset()
        self.session_present = bool(getattr(flags, "session_present", False))
        self._subscribed.clear()
        self._pending_subs.clear()
        for topic, qos in self._subs:
            _rc, mid = client.subscribe(topic, qos=qos)
            if mid is not None:
                self._pending_subs.add(mid)
        if not self._pending_subs:
            self._subscribed.set()
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
        self._subscribed.clear()
        if was and not self._closing.is_set():
            logger.warning("disconnected from broker: %s; reconnecting", reason_code)

    def _handle_message(self, client: paho.Client, userdata: Any, msg: Message) -> None:
        try:
            self._on_message_cb(msg)
        except Exception:  # a handler bug must never kill the network thread
            logger.exception("message handler failed for topic %s", msg.topic)

    def _handle_publish(self, client: paho.Client, userdata: Any, mid: int, reason_code: Any,
                        properties: Any) -> None:
        if getattr(reason_code, "is_failure", False):
            # MQTT v5 makes ACL denials visible (PUBACK 135); 3.1.1 acknowledges silently.
            self.publish_denied += 1
            logger.warning("broker refused publish mid %d: %s", mid, reason_code)
        if self._on_publish_cb is not None:
            self._on_publish_cb()

    def _handle_subscribe(self, client: paho.Client, userdata: Any, mid: int,
                          reason_codes: Any, properties: Any) -> None:
        for rc in reason_codes or ():
            if getattr(rc, "is_failure", False):
                self.subscribe_denied += 1
                logger.error("broker refused a subscription: %s", rc)
        self._pending_subs.discard(mid)
        if not self._pending_subs:
            self._subscribed.set()  # answered, granted or refused (counted above)

    # -- publishing (any thread) ---------------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        properties: Properties | None = None,
        write_now: bool = True,
    ) -> paho.MQTTMessageInfo:
        """Queue a publish (thread-safe, never blocks). QoS 1 messages survive a reconnect.

        Args:
            topic: MQTT topic.
            payload: Encoded message.
            qos: 0 or 1.
            retain: MQTT retain flag.
            properties: MQTT v5 PUBLISH properties (correlation data), if any.
            write_now: Write it from this thread if the socket is free (see the module
                docstring). False leaves it to the network thread: a bulk sender (the outbox
                replay) is faster when one thread writes whole batches than when two
                threads take turns on the socket per message.

        Raises:
            PublishError: The client rejected the message (queue full, payload too large).
        """
        direct = write_now and threading.current_thread() is not self._thread
        self._direct.active = direct
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=retain,
                                        properties=properties)
        except (ValueError, RuntimeError) as exc:
            raise PublishError(f"publish to {topic} failed: {exc}") from exc
        finally:
            self._direct.active = False
        if direct:
            self._write_now()
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            raise PublishError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        return info

    def _write_now(self) -> None:
        """Write queued packets from this thread if the socket is free, else wake the loop.

        Never blocks: the lock is only tried, and the socket is non-blocking (paho keeps what
        does not fit and the network thread writes it once the socket drains).
        """
        client = self._client
        if not client.want_write():
            return
        if self._io_lock.acquire(blocking=False):
            try:
                if client.socket() is not None:
                    client.loop_write()  # a lost connection is handled by the network thread
            except Exception:  # never let paho internals reach a publishing thread
                logger.debug("direct MQTT write failed; the network thread retries",
                             exc_info=True)
            finally:
                self._io_lock.release()
        if client.want_write():
            self._wake()

    def publish_entry(self, entry: Any) -> paho.MQTTMessageInfo:
        """Publish an :class:`agent.outbox.OutboxEntry` (used by the outbox drainer)."""
        return self.publish(entry.topic, entry.payload, qos=entry.qos, retain=entry.retain,
                            properties=reply_properties(entry.correlation)
                            if self.config.protocol == 5 else None, write_now=False)

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
        self._closing.set()
        if not self.is_connected():
            self._stop.set()  # nothing to flush: end a backoff wait now
        try:
            if self.is_connected():
                self._client.disconnect()
        finally:
            thread = self._thread
            if thread is not None:
                thread.join(max(0.2, min(1.5, end - time.monotonic() + 1.0)))
            self._stop.set()
            if thread is not None:
                thread.join(0.5)
            self._connected.clear()
            self._wake_r.close()  # a late publish's wake-up then fails quietly
            self._wake_w.close()


def _no_delay(client: Any, userdata: Any, sock: Any) -> None:
    """Disable Nagle: a chunk or PUBACK must not wait ~40 ms for the peer's delayed ACK."""
    with contextlib.suppress(OSError, AttributeError):  # not TCP (unix socket, websockets)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def reply_properties(correlation_data: bytes | None) -> Properties | None:
    """MQTT v5 PUBLISH properties carrying a request's correlation data."""
    if correlation_data is None:
        return None
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.CorrelationData = correlation_data
    return props
