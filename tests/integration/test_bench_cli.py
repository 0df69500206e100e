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
    assert record["model"]["prepared_as"] is None  # served as shipped, no conversion
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
    # no warm-up: the table says why there is no cold TTFT instead of a bare dash
    assert ("cold TTFT not separate (--warmup 0: the first measured run was the cold one"
            in result.output)


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


def test_bench_quality_estimate_energy_and_paper_metrics(tmp_path: Path) -> None:
    out = tmp_path / "rec.json"
    result = CliRunner().invoke(main, [
        "bench", "--max-tokens", "8", "--runs", "2", "--warmup", "0", "--threads", "2",
        "--quality", "gsm8k", "--limit", "2", "--quality-max-tokens", "48",
        "--power-idle-mw", "3000", "--power-max-mw", "9000", "--baseline-s", "0.5",
        "--json", "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    validate(record, "bench.json")
    assert json.loads(out.read_text()) == record
    q = record["quality"]
    assert q["task"] == "gsm8k" and q["n"] == 2 and len(q["items"]) == 2
    assert q["pass_at_1"] == q["correct"] / 2
    from agent.quality import select_items

    assert [it["index"] for it in q["items"]] == [i.index for i in select_items(limit=2)]
    for run in record["runs"]:
        total = run["energy"]["total"]
        assert total["estimated"] is True and total["sources"] == ["estimate:cpu_util"]
        assert run["energy_mj"] is not None and run["energy_mj"] > 0
        # an estimate between idle and max power, over the request window
        assert 3000 <= run["power_mw"] <= 9000
        assert run["mj_per_token"] == pytest.approx(run["energy_mj"] / run["completion_tokens"])
    p = record["paper"]
    assert p["q"] == q["pass_at_1"]
    assert 0 < p["r"] <= 1 and p["u"] == pytest.approx(0.5 * p["q"] + 0.5 * p["r"])
    assert p["cpr_cents"] == pytest.approx(p["energy_per_response_mj"] / 3.6e9 * 0.25 * 100)
    assert p["pcr"] == pytest.approx(p["u"] / p["cpr_cents"])
    assert p["energy_sources"] == ["estimate:cpu_util"]


def test_bench_without_power_source_says_why() -> None:
    result = CliRunner().invoke(main, ["bench", "--max-tokens", "4", "--runs", "1",
                                       "--warmup", "0", "--threads", "2", "--baseline-s", "0",
                                       "--probe-root", "tests/fixtures/sysfs/empty", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    run = record["runs"][0]
    assert run["energy_mj"] is None  # never 0
    assert "no power source" in run["energy"]["total"]["reason"]
    assert record["paper"]["cpr_cents"] is None and record["paper"]["pcr"] is None
    assert any("energy not measured" in r for r in record["paper"]["reasons"])


def test_bench_csv_jsonl_and_synthetic_prompt() -> None:
    res = CliRunner().invoke(main, ["bench", "--prompt-tokens", "40", "--max-tokens", "4",
                                    "--ignore-eos", "--runs", "2", "--warmup", "0",
                                    "--threads", "2", "--baseline-s", "0", "--csv"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith("backend,model,run,valid")
    assert len(lines) == 3
    assert all(",40,4," in line for line in lines[1:])  # prompt_tokens, completion_tokens
    res = CliRunner().invoke(main, ["bench", "--max-tokens", "4", "--runs", "2", "--warmup",
                                    "0", "--threads", "2", "--baseline-s", "0", "--jsonl"])
    rows = [json.loads(x) for x in res.stdout.strip().splitlines()]
    assert [r["run"] for r in rows] == [0, 1]
    assert all(r["schema"] == "edgelm.bench.run/1" for r in rows)


def test_bench_compare_prints_table_one() -> None:
    res = CliRunner().invoke(main, [
        "bench", "--max-tokens", "4", "--runs", "1", "--warmup", "0", "--threads", "1",
        "--baseline-s", "0", "--power-idle-mw", "2000", "--power-max-mw", "6000",
        "compare", "--config", "llamacpp:smollm2-135m", "--config", "nosuch:smollm2-135m",
    ])
    assert res.exit_code == 0, res.output
    assert "CPR ¢" in res.output and "PCR" in res.output
    assert "llamacpp:smollm2-135m" in res.output
    assert "nosuch:smollm2-135m: FAILED unknown_backend" in res.output
