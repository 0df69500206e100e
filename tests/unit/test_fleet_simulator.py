from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.cli import main
from agent.fleet.simulator import (
    PRESETS,
    SimConfig,
    parse_mix,
    profile_from_bench,
    render,
    run,
    simulate,
)


def small(pattern: str = "bursty", seed: int = 5, requests: int = 4000) -> SimConfig:
    return SimConfig(devices=tuple(parse_mix("jetson-agx-orin:1,jetson-orin-nano:2,rpi5:4")),
                     requests=requests, pattern=pattern, seed=seed)


def test_deterministic_for_a_seed() -> None:
    for policy in ("random", "weighted", "load_aware"):
        a = simulate(small(), policy)
        b = simulate(small(), policy)
        a.wall_s = b.wall_s = 0.0
        assert a == b
    c = simulate(small(seed=6), "random")
    assert c.cloud_tokens != simulate(small(), "random").cloud_tokens


def test_every_request_is_served_once() -> None:
    r = simulate(small(), "load_aware")
    assert r.edge_requests + r.cloud_requests == r.requests
    assert sum(r.requests_per_device.values()) == r.edge_requests
    assert r.total_cost_usd == pytest.approx(r.cloud_cost_usd + r.edge_energy_cost_usd)
    assert all(0.0 <= u <= 1.0 for u in r.utilisation.values())
    assert 0 < r.jain_utilisation <= 1.0
    assert r.latency_s["p50"] <= r.latency_s["p90"] <= r.latency_s["p99"]


def test_reproduces_paper_finding_under_bursty_load() -> None:
    report = run(small(requests=8000), ["random", "load_aware"])
    verdict = report["paper_finding"]
    assert verdict["checked"] is True
    assert verdict["reproduced"] is True, verdict
    assert "REPRODUCED" in render(report)


def test_light_steady_load_stays_on_the_edge() -> None:
    cfg = SimConfig(devices=tuple(parse_mix("jetson-agx-orin:2")), requests=2000,
                    pattern="steady", load=0.2, seed=1)
    r = simulate(cfg, "load_aware")
    assert r.cloud_requests < 0.02 * r.requests


def test_profile_from_bench_record() -> None:
    record = {"summary": {"decode_tok_s": {"mean": 42.0}, "prefill_tok_s": {"mean": 300.0},
                          "power_mw": {"mean": 6000.0}},
              "config": {"context_tokens": 1024},
              "provenance": {"hardware": {"model": "Raspberry Pi 5"}}}
    p = profile_from_bench(record, "pi.json")
    assert (p.decode_tok_s, p.prefill_tok_s, p.power_w, p.context_tokens) == (42.0, 300.0, 6.0,
                                                                                1024)
    assert p.kind == "Raspberry Pi 5" and "pi.json" in p.source
    with pytest.raises(ValueError):
        profile_from_bench({"summary": {}}, "x")


def test_presets_are_labelled() -> None:
    assert set(PRESETS) == {"jetson-agx-orin", "jetson-orin-nano", "rpi5"}
    assert all("preset" in p.source for p in PRESETS.values())
    with pytest.raises(ValueError):
        parse_mix("cray:1")


def test_cli_simulate_json() -> None:
    res = CliRunner().invoke(main, ["simulate", "--requests", "1500", "--devices", "rpi5:3",
                                    "--policy", "random", "--policy", "load_aware", "--json",
                                    "--seed", "2"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert [r["policy"] for r in report["results"]] == ["random", "load_aware"]
    assert report["config"]["device_sources"][0].startswith("preset")


def test_cli_simulate_table_and_bad_mix() -> None:
    res = CliRunner().invoke(main, ["simulate", "--requests", "500", "--devices", "rpi5:2"])
    assert res.exit_code == 0, res.output
    assert "paper finding" in res.output and "load_aware" in res.output
    bad = CliRunner().invoke(main, ["simulate", "--devices", "vax:2"])
    assert bad.exit_code == 78


def test_cli_simulate_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "sim.png"
    res = CliRunner().invoke(main, ["simulate", "--requests", "500", "--devices", "rpi5:2",
                                    "--plot", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_simulate_from_bench_records(tmp_path: Path) -> None:
    record = {"summary": {"decode_tok_s": {"mean": 55.0}, "prefill_tok_s": {"mean": 600.0}},
              "config": {"context_tokens": 2048}, "provenance": {"hardware": {"model": "box"}}}
    f = tmp_path / "box.json"
    f.write_text(json.dumps(record))
    res = CliRunner().invoke(main, ["simulate", "--devices", "", "--bench", f"{f}:3",
                                    "--requests", "300", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["config"]["devices"] == {"box": 3}
    assert "bench record box.json" in report["config"]["device_sources"][0]
    # --bench alone means the measured devices alone (it used to add the 16 presets)
    res = CliRunner().invoke(main, ["simulate", "--bench", f"{f}:2", "--requests", "300",
                                    "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["config"]["devices"] == {"box": 2}
    res = CliRunner().invoke(main, ["simulate", "--devices", "rpi5:1", "--bench", str(f),
                                    "--requests", "300", "--json"])
    assert json.loads(res.output)["config"]["devices"] == {"box": 1, "rpi5": 1}
    bad = CliRunner().invoke(main, ["simulate", "--bench", str(tmp_path / "missing.json")])
    assert bad.exit_code == 78
