"""Test support: a real mosquitto, MQTT test clients, schema validation."""

from __future__ import annotations

import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SCHEMAS = REPO / "agent" / "schemas"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout_s: float = 10.0) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


class Mosquitto:
    """A real mosquitto on a free loopback port, never 1883."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(exe).exists():
            pytest.fail("mosquitto is not installed: run the README's test command")
        self.exe = exe
        self.port = port or free_port()
        assert self.port != 1883
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        self.conf.write_text(
            "per_listener_settings false\n"
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            + ("user root\n" if os.geteuid() == 0 else "")
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Mosquitto:
        self.proc = subprocess.Popen(
            [self.exe, "-c", str(self.conf)],
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
        )
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"


def load_schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / name).read_text())


def validate(payload: dict[str, Any], schema_file: str) -> None:
    import jsonschema

    jsonschema.validate(payload, load_schema(schema_file),
                        format_checker=jsonschema.FormatChecker())


class TestClient:
    """A paho client that collects messages into a queue, for assertions."""

    __test__ = False

    def __init__(self, port: int, protocol: int = 5) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

        self.messages: queue.Queue[Any] = queue.Queue()
        proto = MQTTProtocolVersion.MQTTv5 if protocol == 5 else MQTTProtocolVersion.MQTTv311
        self.client = paho.Client(CallbackAPIVersion.VERSION2,
                                  client_id=f"test-{uuid.uuid4().hex[:8]}", protocol=proto)
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        end = time.monotonic() + 5
        while not self.client.is_connected() and time.monotonic() < end:
            time.sleep(0.01)
        assert self.client.is_connected()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        import paho.mqtt.client as paho

        result, _mid = self.client.subscribe(topic, qos)
        assert result == paho.MQTT_ERR_SUCCESS
        time.sleep(0.1)  # SUBACK before publishing what we subscribe to

    def publish(self, topic: str, payload: bytes | str, properties: Any = None) -> None:
        info = self.client.publish(topic, payload, qos=1, properties=properties)
        info.wait_for_publish(5)

    def get(self, timeout_s: float = 10.0, topic: str | None = None) -> Any:
        end = time.monotonic() + timeout_s
        while True:
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no message on {topic or 'any topic'} within {timeout_s} s")
            msg = self.messages.get(timeout=remaining)
            if topic is None or msg.topic == topic:
                return msg

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def agent_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent", *args]
