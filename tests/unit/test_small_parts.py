from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from agent.errors import ConfigError, ModelError
from agent.models import resolve_model
from agent.mqtt import parse_broker_url
from agent.sequence import SequenceCounter


def test_sequence_survives_restart_and_threads(tmp_path: Path) -> None:
    path = tmp_path / "seq"
    c = SequenceCounter(path, block=10)
    first = [c.next() for _ in range(25)]
    assert first == list(range(first[0], first[0] + 25))  # consecutive within one life
    c2 = SequenceCounter(path, block=10)  # a restart never reuses a number
    assert c2.next() > first[-1]
    out: list[int] = []
    lock = threading.Lock()

    def take() -> None:
        vals = [c2.next() for _ in range(500)]
        with lock:
            out.extend(vals)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(out)) == 2000


def test_sequence_with_corrupt_file_starts_from_the_clock(tmp_path: Path) -> None:
    """Not at 1: receivers would drop the new messages as duplicates of an earlier life's."""
    path = tmp_path / "seq"
    path.write_text("garbage")
    before_us = time.time_ns() // 1000
    assert SequenceCounter(path).next() > before_us
    assert int(path.read_text()) > before_us  # the file is usable again


def test_broker_urls() -> None:
    c = parse_broker_url("mqtt://user:p%40ss@broker.local:1884")
    assert (c.host, c.port, c.username, c.password, c.tls) == (
        "broker.local",
        1884,
        "user",
        "p@ss",
        False,
    )
    assert parse_broker_url("mqtts://h").port == 8883
    assert parse_broker_url("127.0.0.1:1999").port == 1999
    for bad in ("http://h", "mqtt://", "mqtt://h:notaport"):
        with pytest.raises(ConfigError):
            parse_broker_url(bad)


def test_model_path_resolution(tmp_path: Path) -> None:
    f = tmp_path / "tiny.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 60)
    m = resolve_model(str(f))
    assert (m.format, m.size_bytes, m.name) == ("gguf", 64, "tiny")
    assert len(m.sha256) == 64
    with pytest.raises(ModelError, match="unknown model"):
        resolve_model("definitely-not-a-model")
    bad = tmp_path / "x.bin"
    bad.write_bytes(b"1")
    with pytest.raises(ModelError, match="format"):
        resolve_model(str(bad))


def test_bundled_model_is_verified() -> None:
    m = resolve_model("smollm2-135m")
    assert m.size_bytes == 98_362_432
    assert m.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
