from __future__ import annotations

import copy
import html
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from agent.cli import main
from agent.report import (
    Missing,
    ReportSection,
    build_rows,
    fmt_value,
    load_inputs,
    render_report,
)

pytest.importorskip("matplotlib")

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "bench"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = ("pcr_table.png", "accuracy_vs_size.png", "performance.png", "latency.png")


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / f"synthetic-{name}.json").read_text())
    return data


def page_text(path: Path) -> str:
    """The page with entities decoded, so assertions read like what a person sees."""
    return html.unescape(path.read_text(encoding="utf-8"))


def test_cli_renders_every_figure_and_the_page_from_a_directory(tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["report", str(FIXTURES), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "5 record(s)" in result.output
    for name in FIGURES:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC), name
    page = page_text(out / "report.html")
    # three figures embedded (the table is HTML on the page), so the file stands alone
    assert page.count("data:image/png;base64,") == 3
    # Table I values from the fixtures
    assert "gpt-4o-mini" in page and "0.950" in page and "212" in page  # cloud U and PCR
    assert "0.00449" in page  # cloud CPR ¢: (43 × 0.15 + 64 × 0.60) / 1e6 × 100
    assert "0.300" in page and "8,042" in page  # Orin Q and PCR
    assert "1 (reference)" in page and "× cheaper" in page
    # missing values: the reason, never a zero
    assert "not measured — Q needs --quality gsm8k" in page
    assert ("not measured — RAPL energy_uj is readable only by root (CVE-2020-8694)"
            in page)
    # estimated energy is labelled; synthetic records are labelled
    assert "(estimated)" in page and "ESTIMATED" in page
    assert "[synthetic]" in page and "SYNTHETIC test records" in page


def test_missing_energy_is_not_zero_anywhere(tmp_path: Path) -> None:
    rows = build_rows([fixture("nuc-onnx-smollm2-noenergy")])
    (row,) = rows
    for value in (row.energy_per_response_mj, row.energy_run_mj, row.power_mw, row.cpr_cents,
                  row.pcr):
        assert isinstance(value, Missing)
    assert fmt_value(row.energy_per_response_mj).startswith("not measured — RAPL")
    written = render_report([fixture("nuc-onnx-smollm2-noenergy")], tmp_path, ["html"])
    assert written == [tmp_path / "report.html"]
    page = page_text(tmp_path / "report.html")
    row_html = next(line for line in page.splitlines() if line.startswith("<tr><td") and
                    "nuc-synth" in line)
    cells = row_html.split("<td")
    e_resp = cells[7]  # configuration, Q, R, U, TTFT, TGS, E/resp
    assert "not measured" in e_resp and ">0<" not in e_resp and "0.0" not in e_resp


def test_cost_ratio_and_derived_values_match_the_record_arithmetic() -> None:
    cloud, pi5 = fixture("cloud-openai-gpt4omini"), fixture("rpi5-llamacpp-smollm2")
    rows = build_rows([pi5, cloud])
    pi_row, cloud_row = rows
    assert cloud_row.cloud and not pi_row.cloud
    assert cloud_row.cost_ratio == 1.0
    assert pi_row.cost_ratio == pytest.approx(pi5["paper"]["cpr_cents"]
                                              / cloud["paper"]["cpr_cents"])
    assert pi_row.q == pytest.approx(0.05) and pi_row.q_n == 20
    assert isinstance(cloud_row.energy_per_response_mj, Missing)
    assert cloud_row.energy_per_response_mj.short == "n/a: cloud"


def test_cloud_cpr_is_derived_from_engine_cost_when_the_record_has_none() -> None:
    cloud = fixture("cloud-openai-gpt4omini")
    stripped = copy.deepcopy(cloud)
    del stripped["paper"]["cpr_basis"]
    stripped["paper"]["cpr_cents"] = None
    stripped["paper"]["pcr"] = None
    (row,) = build_rows([stripped])
    assert row.cloud  # openai backend with token prices
    assert row.cpr_cents == pytest.approx(cloud["paper"]["cpr_cents"])
    assert row.pcr == pytest.approx(cloud["paper"]["pcr"])


def test_no_cloud_row_means_no_ratio_column(tmp_path: Path) -> None:
    render_report([fixture("rpi5-llamacpp-smollm2")], tmp_path, ["html"])
    assert "CPR ÷ cloud" not in page_text(tmp_path / "report.html")


def test_formats_png_only_and_html_only(tmp_path: Path) -> None:
    runner = CliRunner()
    png_dir, html_dir = tmp_path / "png", tmp_path / "html"
    r1 = runner.invoke(main, ["report", str(FIXTURES / "synthetic-rpi5-llamacpp-smollm2.json"),
                              "--out", str(png_dir), "--format", "png"])
    assert r1.exit_code == 0, r1.output
    assert sorted(p.name for p in png_dir.iterdir()) == sorted(FIGURES)
    r2 = runner.invoke(main, ["report", str(FIXTURES / "synthetic-rpi5-llamacpp-smollm2.json"),
                              "--out", str(html_dir), "--format", "html"])
    assert r2.exit_code == 0, r2.output
    assert [p.name for p in html_dir.iterdir()] == ["report.html"]


def test_compare_file_jsonl_and_failed_rows(tmp_path: Path) -> None:
    pi5, orin = fixture("rpi5-llamacpp-smollm2"), fixture("orin-nano-llamacpp-qwen05b")
    compare = {"schema": "edgelm.bench.compare/1",
               "rows": [{"label": "onnxruntime:smollm2-135m",
                         "error": "backend_failed: onnxruntime-genai not installed"}],
               "records": [pi5]}
    (tmp_path / "compare.json").write_text(json.dumps(compare))
    (tmp_path / "runs.jsonl").write_text(json.dumps(orin) + "\n\n" + json.dumps(pi5) + "\n")
    loaded = load_inputs([tmp_path / "compare.json", tmp_path / "runs.jsonl"])
    assert len(loaded.records) == 3 and len(loaded.failures) == 1
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["report", str(tmp_path / "compare.json"),
                                       str(tmp_path / "runs.jsonl"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    page = page_text(out / "report.html")
    assert "FAILED — backend_failed: onnxruntime-genai not installed" in page
    # the same configuration twice gets told apart, not merged
    labels = [r.label for r in build_rows(loaded.records)]
    assert len(set(labels)) == 3


def test_per_run_rows_and_foreign_json_are_skipped_with_a_note(tmp_path: Path) -> None:
    (tmp_path / "rows.jsonl").write_text(json.dumps({"schema": "edgelm.bench.run/1"}) + "\n")
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    (tmp_path / "rec.json").write_text(json.dumps(fixture("rpi5-llamacpp-smollm2")))
    loaded = load_inputs([tmp_path])
    assert len(loaded.records) == 1
    assert any("bench --out" in s for s in loaded.skipped)
    assert any("is not edgelm.bench/1" in s for s in loaded.skipped)


def test_no_records_and_bad_format_are_config_errors(tmp_path: Path) -> None:
    (tmp_path / "other.json").write_text("{}")
    runner = CliRunner()
    r = runner.invoke(main, ["report", str(tmp_path / "other.json"), "--out",
                             str(tmp_path / "o")])
    assert r.exit_code == 78 and "no edgelm.bench/1 records" in r.output
    r = runner.invoke(main, ["report", str(FIXTURES), "--out", str(tmp_path / "o"),
                             "--format", "svg"])
    assert r.exit_code == 78 and "svg" in r.output


def test_api_returns_paths_and_takes_extra_sections(tmp_path: Path) -> None:
    section = ReportSection(title="Fleet", html="<p>fleet goes here</p>")
    written = render_report([fixture("rpi4-llamacpp-smollm2-estimated")], tmp_path,
                            ("png", "html"), sections=[section])
    assert [p.name for p in written] == [*FIGURES, "report.html"]
    page = page_text(tmp_path / "report.html")
    assert "<h2>Fleet</h2><p>fleet goes here</p>" in page
    assert "ESTIMATED</span> from estimate:cpu_util" in page
