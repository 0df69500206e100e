"""`agentctl models` and `agentctl bench --backend onnxruntime|tflite --model smollm2-135m`
on the prepared builds in the test model cache (issue 4, "done means")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.cli import main
from tests.integration import backend_contract as c

pytestmark = pytest.mark.model


@pytest.fixture(autouse=True)
def _test_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    for fmt in ("onnx", "tflite", "onnx-optimum"):
        c.prepared(fmt)  # converts once if needed, or fails loudly
    monkeypatch.setenv("EDGELM_HOME", str(c.TEST_MODELS))


def test_models_list_shows_prepared_builds() -> None:
    result = CliRunner().invoke(main, ["models", "list", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["format"]: r for r in json.loads(result.stdout)["models"]}
    assert rows["onnx"]["prepared"] and rows["tflite"]["prepared"]
    assert rows["onnx-optimum"]["prepared"]
    assert rows["onnx-optimum"]["path"].endswith("/model.onnx")


def test_prepare_is_idempotent_and_writes_a_manifest() -> None:
    result = CliRunner().invoke(main, ["models", "prepare", "smollm2-135m", "--format", "onnx"])
    assert result.exit_code == 0, result.output
    from agent.model_cache import find_prepared

    found = find_prepared("smollm2-135m", "onnx")
    assert found is not None
    m = found.manifest
    assert m["source_sha256"] == (
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
    assert m["tools"]["onnxruntime-genai"] and m["tools"]["transformers"].startswith("5.")
    assert m["model_format"] == "onnx-genai" and "int4" in m["quantization"]


@pytest.mark.parametrize("backend", ["onnxruntime", "tflite"])
def test_bench_finds_the_prepared_format(backend: str) -> None:
    result = CliRunner().invoke(main, [
        "bench", "--backend", backend, "--model", "smollm2-135m", "--max-tokens", "24",
        "--ignore-eos", "--runs", "1", "--warmup", "0", "--threads", "2", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    run = record["runs"][0]
    assert run["completion_tokens"] == 24 and run["prompt_tokens"] == 43
    assert len(run["text"].split()) >= 10
    assert record["provenance"]["threads"] == 2


def test_bench_without_a_build_says_how_to_prepare(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: object) -> None:
    monkeypatch.setenv("EDGELM_HOME", str(tmp_path))
    result = CliRunner().invoke(main, [
        "bench", "--backend", "tflite", "--model", "smollm2-135m", "--runs", "1",
        "--warmup", "0", "--max-tokens", "4"])
    assert result.exit_code != 0
    assert "agentctl models prepare smollm2-135m --format tflite" in result.output


def test_prepare_optimum_is_idempotent_and_writes_a_manifest() -> None:
    result = CliRunner().invoke(main, ["models", "prepare", "smollm2-135m",
                                       "--format", "onnx-optimum"])
    assert result.exit_code == 0, result.output
    assert "already prepared" in result.output
    from agent.model_cache import find_prepared

    found = find_prepared("smollm2-135m", "onnx-optimum")
    assert found is not None and found.entry.name == "model.onnx"
    m = found.manifest
    assert m["model_format"] == "onnx" and "fp32" in m["quantization"]
    assert m["tools"]["transformers"].startswith("4.57") and m["tools"]["optimum-onnx"]
    assert set(m["tool_requirements"]) == {"tools-requirements.txt",
                                           "tools-requirements-optimum.txt"}
    # exported from the dequantised HF folder in the cache (the one the genai build uses)
    hf = Path(m["intermediate_hf"])
    assert hf.parent == found.folder.parent and hf.name.startswith("hf-")
    assert (hf / "model.safetensors").is_file()
    assert m["intermediate_tools"]["transformers"].startswith("5.")
    assert m["weights_file"] == "model.onnx.data"  # external data, see backends/onnxruntime.py


def test_bench_finds_the_optimum_export_when_asked() -> None:
    from agent.model_cache import find_prepared

    result = CliRunner().invoke(main, [
        "bench", "--backend", "onnxruntime", "--model", "smollm2-135m", "--max-tokens", "24",
        "--ignore-eos", "--runs", "1", "--warmup", "0", "--threads", "2", "--json",
        "--backend-opt", "model_format=onnx-optimum"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    found = find_prepared("smollm2-135m", "onnx-optimum")
    assert found is not None
    assert record["model"]["format"] == "onnx"
    assert record["model"]["prepared_as"] == "onnx-optimum"  # the record names the build
    assert record["model"]["sha256"] == found.manifest["sha256"]
    run = record["runs"][0]
    assert run["completion_tokens"] == 24 and run["prompt_tokens"] == 43
    assert len(run["text"].split()) >= 10


def test_bench_refuses_a_format_the_backend_cannot_load() -> None:
    result = CliRunner().invoke(main, [
        "bench", "--backend", "tflite", "--model", "smollm2-135m", "--runs", "1",
        "--warmup", "0", "--max-tokens", "4", "--backend-opt", "model_format=onnx-optimum"])
    assert result.exit_code == 78
    assert "cannot load prepared format 'onnx-optimum'" in result.output


def test_a_prepared_gguf_names_its_build_in_bench_records() -> None:
    """`models prepare --format gguf` copies the GGUF into the cache with a manifest; a bench
    of that file says so (a breaking pass found null there)."""
    from agent.model_cache import find_prepared

    found = find_prepared("smollm2-135m", "gguf")
    assert found is not None  # install.sh --test prepares every format
    result = CliRunner().invoke(main, [
        "bench", "--model", str(found.entry), "--max-tokens", "4", "--runs", "1",
        "--warmup", "0", "--threads", "2", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["model"]["format"] == "gguf"
    assert record["model"]["prepared_as"] == "gguf"
    assert record["model"]["sha256"] == found.manifest["sha256"]
