"""Shared fixtures: a real mosquitto per test session, the real model, an MQTT test client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Mosquitto, TestClient


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    m = Mosquitto(tmp_path_factory.mktemp("mosquitto")).start()
    yield m
    m.stop()


@pytest.fixture(scope="session")
def model_path() -> Path:
    from agent.models import resolve_model

    try:
        return resolve_model("smollm2-135m").path
    except Exception as exc:  # the suite needs the real model: say how to get it
        pytest.fail(f"the bundled model is missing ({exc}); run the README's test command")


@pytest.fixture
def mqtt_client(broker: Mosquitto) -> Iterator[TestClient]:
    c = TestClient(broker.port)
    yield c
    c.close()
