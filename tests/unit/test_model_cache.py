"""Model cache keys, manifests and `agentctl models` without running a conversion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent import model_cache as mc
from agent.cli import main
from agent.errors import ModelError

SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def test_key_depends_on_source_format_and_tools() -> None:
    a = mc.conversion_key(SHA, "onnx")
    assert a == mc.conversion_key(SHA, "onnx") and len(a) == 16
    assert a != mc.conversion_key(SHA, "tflite")
    assert a != mc.conversion_key("0" * 64, "onnx")


def test_home_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EDGELM_HOME", str(tmp_path))
    assert mc.models_home() == tmp_path


def _fake_build(home: Path, fmt: str, source: str = SHA) -> Path:
    folder = home / "smollm2-135m" / f"{fmt}-{mc.conversion_key(source, fmt)}"
    folder.mkdir(parents=True)
    (folder / "model.tflite").write_bytes(b"x")
    (folder / "manifest.json").write_text(json.dumps({
        "complete": True, "source_sha256": source, "model_format": "tflite",
        "sha256": "ab" * 32, "size_bytes": 1, "quantization": "dynamic_int8"}))
    return folder


def test_find_and_resolve_prepared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGELM_HOME", str(tmp_path))
    assert mc.find_prepared("smollm2-135m", "tflite") is None
    with pytest.raises(ModelError) as err:
        mc.resolve_for_backend("smollm2-135m", "tflite")
    assert "agentctl models prepare smollm2-135m --format tflite" in str(err.value)
    folder = _fake_build(tmp_path, "tflite")
    resolved = mc.resolve_for_backend("smollm2-135m", "tflite")
    assert resolved.path == folder / "model.tflite" and resolved.format == "tflite"


def test_stale_source_is_not_trusted(tmp_path: Path) -> None:
    folder = tmp_path / "smollm2-135m" / f"tflite-{mc.conversion_key(SHA, 'tflite')}"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"complete": True,
                                                      "source_sha256": "0" * 64}))
    assert mc.find_prepared("smollm2-135m", "tflite", home=tmp_path) is None


def test_incomplete_build_is_ignored(tmp_path: Path) -> None:
    folder = _fake_build(tmp_path, "onnx")
    (folder / "manifest.json").write_text(json.dumps({"source_sha256": SHA}))
    assert mc.find_prepared("smollm2-135m", "onnx", home=tmp_path) is None


def test_missing_tools_say_how_to_install(monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    monkeypatch.setenv("EDGELM_TOOLS_PYTHON", str(tmp_path / "nope"))
    monkeypatch.setattr(mc, "_HERE", tmp_path / "agent")
    with pytest.raises(ModelError) as err:
        mc.tools_python()
    assert "./install.sh --tools" in str(err.value)


def test_models_list_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGELM_HOME", str(tmp_path))
    _fake_build(tmp_path, "tflite")
    result = CliRunner().invoke(main, ["models", "list", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["format"]: r for r in json.loads(result.stdout)["models"]}
    assert rows["tflite"]["prepared"] and rows["tflite"]["backends"] == ["tflite"]
    assert not rows["onnx"]["prepared"]
    assert rows["onnx"]["prepare"].startswith("agentctl models prepare smollm2-135m --format onnx")


def test_models_prepare_unknown_model_is_config_error() -> None:
    result = CliRunner().invoke(main, ["models", "prepare", "nope", "--format", "onnx"])
    assert result.exit_code == 78
