"""`agentctl bench` and `agentctl infer` on the real model."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.cli import main
from tests.support import agent_cmd, validate

pytestmark = pytest.mark.model


def test_bench_json_shape_and_ignore_eos(model_path: Path) -> None:
    result = CliRunner().invoke(main, [
        "bench", "--backend", "llamacpp", "--model", "smollm2-135m", "--max-tokens", "16",
        "--ignore-eos", "--runs", "2", "--warmup", "1", "--threads", "2", "--json",
    ])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    validate(record, "bench.json")
    assert record["schema"] == "edgelm.bench/1"
    assert record["backend"] == "llamacpp"
    assert record["model"]["sha256"] == (
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
    assert record["model"]["format"] == "gguf"
    assert record["model"]["path"] == str(model_path)
    assert len(record["runs"]) == 2
    for run in record["runs"]:
        assert run["completion_tokens"] == 16
        assert run["finish_reason"] == "length"
        assert run["ttft_ms"] > 0 and run["decode_tok_s"] > 0 and run["prefill_tok_s"] > 0
        assert run["e2e_ms"] >= run["ttft_ms"]
        # llama.cpp's own counters agree with ours: n_eval = generated - 1
        assert run["engine"]["n_eval"] == 15
        assert run["engine"]["n_p_eval"] == run["prompt_tokens"]
    for metric in ("ttft_ms", "prefill_tok_s", "decode_tok_s", "itl_ms", "e2e_ms",
                   "completion_tokens"):
        s = record["summary"][metric]
        assert s["min"] <= s["p50"] <= s["p90"] <= s["max"]
        assert s["min"] <= s["mean"] <= s["max"]
        assert len(s["samples"]) == 2
    assert record["summary"]["completion_tokens"]["mean"] == 16
    assert record["peak_rss_bytes"] > 50_000_000  # the 98 MB model is mapped and touched
    prov = record["provenance"]
    assert prov["threads"] == 2 and prov["engine_version"].startswith("0.3.")
    assert prov["model_sha256"] == record["model"]["sha256"]
    assert "AVX2 = 1" in prov["build_flags"]
    assert record["cold"] is not None and record["cold"]["ttft_ms"] > 0


def test_bench_table_is_readable() -> None:
    result = CliRunner().invoke(main, ["bench", "--max-tokens", "8", "--runs", "1",
                                       "--warmup", "0", "--threads", "2"])
    assert result.exit_code == 0, result.output
    for label in ("TTFT", "prefill", "decode", "ITL", "e2e latency", "completion tokens",
                  "peak RSS", "worker CPU"):
        assert label in result.output


def test_bench_unknown_model_is_a_config_error() -> None:
    result = CliRunner().invoke(main, ["bench", "--model", "no-such-model", "--runs", "1"])
    assert result.exit_code == 78
    assert "unknown model" in result.output


def test_infer_streams_to_stdout() -> None:
    proc = subprocess.run(
        agent_cmd("infer", "What is 2 + 2? Answer with one number.", "--max-tokens", "16",
                  "--threads", "2", "--stats"),
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert "completion tokens" in proc.stderr and "TTFT" in proc.stderr
