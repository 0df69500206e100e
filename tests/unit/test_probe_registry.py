from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from probes.base import ProbeError
from probes.cpu import CpuProbe
from probes.memory import MemoryProbe
from probes.registry import available_probe_classes, create_probes


class FakeEntryPoint:
    def __init__(self, name: str, obj: Any = None, error: Exception | None = None) -> None:
        self.name = name
        self._obj = obj
        self._error = error

    def load(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._obj


EPS = [
    FakeEntryPoint("memory", MemoryProbe),
    FakeEntryPoint("cpu", CpuProbe),
    FakeEntryPoint("broken", error=ImportError("No module named 'vendorlib'")),
    FakeEntryPoint("notaprobe", obj=dict),
]


def test_broken_plugin_is_reported_not_fatal() -> None:
    classes, errors = available_probe_classes(EPS)
    assert classes == {"cpu": CpuProbe, "memory": MemoryProbe}
    assert "vendorlib" in errors["broken"]
    assert "not a Probe" in errors["notaprobe"]


def test_create_all_and_named(tmp_path: Path) -> None:
    probes = create_probes(None, tmp_path, eps=EPS)
    assert [p.name for p in probes] == ["cpu", "memory"]
    probes = create_probes(["memory"], tmp_path, eps=EPS)
    assert [type(p) for p in probes] == [MemoryProbe]
    assert probes[0].fs.root == tmp_path


def test_create_unknown_or_broken_raises(tmp_path: Path) -> None:
    with pytest.raises(ProbeError, match="unknown probe"):
        create_probes(["nope"], tmp_path, eps=EPS)
    with pytest.raises(ProbeError, match="vendorlib"):
        create_probes(["broken"], tmp_path, eps=EPS)


def test_bad_options_raise_for_named_probe(tmp_path: Path) -> None:
    with pytest.raises(ProbeError, match="could not be created"):
        create_probes(["cpu"], tmp_path, options={"cpu": {"bogus": 1}}, eps=EPS)


def test_installed_group_loads_without_error() -> None:
    _classes, errors = available_probe_classes()
    # Whatever is installed must load; built-ins never fail to import.
    assert all(not name.startswith(("cpu", "memory", "process")) for name in errors)
