"""Model cache keys, manifests and `agentctl models` without running a conversion."""

from __future__ import annotations

import json
import os
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


def _fake_optimum_build(home: Path) -> Path:
    folder = home / "smollm2-135m" / f"onnx-optimum-{mc.conversion_key(SHA, 'onnx-optimum')}"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"x")
    (folder / "manifest.json").write_text(json.dumps({
        "complete": True, "source_sha256": SHA, "model_format": "onnx",
        "sha256": "cd" * 32, "size_bytes": 1, "quantization": "none (fp32)"}))
    return folder


def test_optimum_key_covers_both_tool_environments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    onnx, optimum = mc.conversion_key(SHA, "onnx"), mc.conversion_key(SHA, "onnx-optimum")
    assert optimum != onnx
    # new optimum pins re-export; the genai/tflite builds (other env) stay valid
    pins = tmp_path / "tools-requirements-optimum.txt"
    pins.write_text("optimum-onnx==9.9\n")
    monkeypatch.setattr(mc, "TOOLS_REQUIREMENTS_OPTIMUM", pins)
    assert mc.conversion_key(SHA, "onnx-optimum") != optimum
    assert mc.conversion_key(SHA, "onnx") == onnx
    # the HF folder it is exported from comes from .venv-tools: those pins count too
    main_pins = tmp_path / "tools-requirements.txt"
    main_pins.write_text("transformers==9.9\n")
    before = mc.conversion_key(SHA, "onnx-optimum")
    monkeypatch.setattr(mc, "TOOLS_REQUIREMENTS", main_pins)
    assert mc.conversion_key(SHA, "onnx-optimum") != before


def test_backend_default_format_unchanged_and_optimum_on_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGELM_HOME", str(tmp_path))
    with pytest.raises(ModelError) as err:
        mc.resolve_for_backend("smollm2-135m", "onnxruntime", fmt="onnx-optimum")
    assert "agentctl models prepare smollm2-135m --format onnx-optimum" in str(err.value)
    folder = _fake_optimum_build(tmp_path)
    with pytest.raises(ModelError) as err:  # the default is still the genai folder
        mc.resolve_for_backend("smollm2-135m", "onnxruntime")
    assert "--format onnx " in str(err.value) + " "
    resolved = mc.resolve_for_backend("smollm2-135m", "onnxruntime", fmt="onnx-optimum")
    assert resolved.path == folder / "model.onnx" and resolved.format == "onnx"
    for backend in ("tflite", "openai"):
        with pytest.raises(ModelError) as err:
            mc.resolve_for_backend("smollm2-135m", backend, fmt="onnx-optimum")
        assert "cannot load prepared format 'onnx-optimum'" in str(err.value)


def test_missing_optimum_tools_say_how_to_install(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    monkeypatch.setenv("EDGELM_TOOLS_OPTIMUM_PYTHON", str(tmp_path / "nope"))
    monkeypatch.setattr(mc, "_HERE", tmp_path / "agent")
    with pytest.raises(ModelError) as err:
        mc.tools_python("optimum")
    assert "./install.sh --tools" in str(err.value) and ".venv-tools-optimum" in str(err.value)
    with pytest.raises(ModelError) as err:
        mc.prepare("smollm2-135m", "onnx-optimum", home=tmp_path)
    assert ".venv-tools-optimum" in str(err.value)


def test_models_list_shows_optimum_for_onnxruntime(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGELM_HOME", str(tmp_path))
    _fake_optimum_build(tmp_path)
    result = CliRunner().invoke(main, ["models", "list", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["format"]: r for r in json.loads(result.stdout)["models"]}
    assert rows["onnx-optimum"]["prepared"] and rows["onnx-optimum"]["backends"] == ["onnxruntime"]
    assert rows["onnx"]["backends"] == ["onnxruntime"] and not rows["onnx"]["prepared"]


def test_legacy_config_spells_rope_theta_for_transformers_4() -> None:
    from agent.model_convert_optimum import legacy_config

    v5 = {"model_type": "llama", "dtype": "float32",
          "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}
    cfg = legacy_config(v5)
    assert cfg["rope_theta"] == 100000.0 and cfg["torch_dtype"] == "float32"
    assert "rope_scaling" not in cfg and cfg["rope_parameters"] == v5["rope_parameters"]
    scaled = legacy_config({"rope_parameters": {"rope_theta": 5e5, "rope_type": "linear",
                                                "factor": 2.0}})
    assert scaled["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert legacy_config({"rope_theta": 10.0}) == {"rope_theta": 10.0}


def test_models_home_creates_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`models list` as root left an empty /var/lib/edgelm/models behind (a new user's trial)."""
    monkeypatch.delenv("EDGELM_HOME", raising=False)
    system = tmp_path / "var" / "lib" / "edgelm" / "models"
    monkeypatch.setattr(mc, "DEFAULT_HOME", system)
    assert mc.models_home() == system  # its closest existing parent is writable
    assert not (tmp_path / "var").exists()
    (tmp_path / "ro").mkdir(mode=0o500)
    monkeypatch.setattr(mc, "DEFAULT_HOME", tmp_path / "ro" / "models")
    if os.geteuid() != 0:  # root may write anywhere
        assert mc.models_home() == mc.FALLBACK_HOME.expanduser()
