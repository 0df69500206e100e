"""Figures and tables from ``edgelm.bench/1`` records (the paper's views, arXiv 2505.16508).

``agentctl report`` reads bench records (single records, ``edgelm.bench.compare/1`` files,
JSON lines of records, or directories of them) and renders:

- ``accuracy_vs_size.png``: GSM8K Pass@1 (Q) against model file size, with Wilson 95 %
  intervals (a 20-question Q is a wide interval, and the figure says so);
- ``performance.png``: decode speed (TGS), TTFT, mean power and energy per response per
  device, backend and model, mean ± standard deviation over the measured runs;
- ``latency.png``: the distributions of TTFT, per-run ITL and end-to-end latency from the raw
  ``samples`` kept in each record's ``summary``, with the cold first request marked apart;
- ``pcr_table.png`` and the HTML table: the paper's Table I (Q, R, U, TTFT, TGS, energy per
  response, CPR in cents, PCR, and the edge ÷ cloud cost ratio when a cloud row is present);
- ``report.html``: one self-contained page (figures embedded as base64 PNG) with the tables
  and every record's provenance.

Honesty rules the figures follow: a value that was not measured is drawn as "not measured"
with its reason (from the record), never as a zero-height bar; energy from the ``estimate``
power model is hatched and labelled "estimated"; records marked ``"synthetic": true`` (test
fixtures) carry "[synthetic]" in every label.

A record counts as a **cloud** row when its ``paper.cpr_basis`` is ``"cloud_tokens"``, or when
it comes from the ``openai`` backend with token prices configured (its runs carry
``engine.cost``, in currency units, from which the CPR is derived).

The entry point is :func:`render_report`; :class:`ReportSection` lets later views (fleet
figures) add their own figures and HTML to the same page. matplotlib is imported only when a
figure is drawn (extra ``report``), with the Agg backend.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import html
import io
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import AgentError

logger = logging.getLogger(__name__)

BENCH_SCHEMA = "edgelm.bench/1"
COMPARE_SCHEMA = "edgelm.bench.compare/1"
RUN_ROW_SCHEMA = "edgelm.bench.run/1"
FORMATS = ("png", "html")

_NOT_MEASURED = "not measured"
_ESTIMATED_LEGEND = "hatched = ESTIMATED (power model, not a sensor)"


class ReportError(AgentError):
    """Inputs cannot be turned into a report (no records, unreadable file, no matplotlib)."""


# ---------------------------------------------------------------------------------- loading


@dataclass
class LoadedInputs:
    """What :func:`load_inputs` found.

    Attributes:
        records: ``edgelm.bench/1`` records, in input order.
        failures: Compare rows that failed (``{"label", "error"}``), shown in the table.
        skipped: Files or lines that were not records, with why (shown on the page).
    """

    records: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _take(obj: Any, where: str, out: LoadedInputs) -> None:
    if not isinstance(obj, dict):
        out.skipped.append(f"{where}: not a JSON object")
        return
    schema = obj.get("schema")
    if schema == BENCH_SCHEMA:
        out.records.append(obj)
    elif schema == COMPARE_SCHEMA:
        for rec in obj.get("records") or []:
            _take(rec, where, out)
        out.failures.extend({"label": r.get("label", "?"), "error": r["error"]}
                            for r in obj.get("rows") or [] if isinstance(r, dict) and "error" in r)
    elif schema == RUN_ROW_SCHEMA:
        out.skipped.append(f"{where}: a per-run row from `bench --jsonl`, not a record "
                           "(write records with `bench --out FILE`)")
    else:
        out.skipped.append(f"{where}: schema {schema!r} is not {BENCH_SCHEMA} or {COMPARE_SCHEMA}")


def _load_file(path: Path, out: LoadedInputs) -> None:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"cannot read {path}: {exc}") from exc
    try:
        _take(json.loads(text), str(path), out)
        return
    except ValueError:
        pass
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            out.skipped.append(f"{path}:{n}: not JSON ({exc})")
            continue
        _take(obj, f"{path}:{n}", out)


def load_inputs(paths: Iterable[str | os.PathLike[str]]) -> LoadedInputs:
    """Read records from files (JSON, compare, JSON lines) and directories (``*.json[l]``).

    Raises:
        ReportError: A path does not exist or cannot be read.
    """
    out = LoadedInputs()
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in (".json", ".jsonl")
                           and p.is_file())
            if not files:
                out.skipped.append(f"{path}: no .json or .jsonl files")
            for f in files:
                _load_file(f, out)
        elif path.is_file():
            _load_file(path, out)
        else:
            raise ReportError(f"{path}: no such file or directory")
    return out


# ---------------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Missing:
    """A value that is absent, and why (shown as "not measured — why", never as 0).

    Attributes:
        why: The full reason, from the record where it says one.
        short: A few words for a narrow table cell (derived values: "needs Q").
    """

    why: str
    short: str | None = None


Value = float | Missing


@dataclass(frozen=True)
class ReportRow:
    """One record, flattened into what the figures and tables show.

    Attributes:
        label: Unique one-line label, ``device · backend · model``.
        device: Board or host name (``cloud`` for cloud rows).
        backend: Backend name.
        model: Model name.
        model_size_bytes: Model file size, bytes; None for cloud models.
        synthetic: The record is a labelled synthetic fixture, not a measurement.
        cloud: CPR comes from token prices, not energy.
        q: GSM8K Pass@1, 0-1.
        q_n: Questions scored.
        q_correct: Questions answered correctly.
        r: Responsiveness, 0-1.
        u: Utility U = αQ + (1-α)R.
        ttft_ms: Mean TTFT over the responses the paper metrics used, ms.
        tgs: Mean decode tok/s over the measured runs.
        tgs_sd: Its standard deviation.
        ttft_run_ms: Mean TTFT over the measured bench runs, ms.
        ttft_run_sd: Its standard deviation.
        power_mw: Mean power over the bench runs, mW.
        power_sd: Its standard deviation.
        energy_run_mj: Mean gross energy of one bench run, mJ.
        energy_run_sd: Its standard deviation.
        energy_per_response_mj: The paper's energy per response (GSM8K answers when Q was
            measured, else the bench runs), mJ.
        energy_estimated: Energy and power come from the ``estimate`` power model.
        energy_sources: Power sources used.
        cpr_cents: Cost per response, cents.
        pcr: U / CPR.
        cost_ratio: This row's CPR ÷ the reference cloud row's CPR.
        samples: ``ttft_ms`` / ``itl_ms`` / ``e2e_ms`` → raw per-run values.
        cold_ttft_ms: TTFT of the cold first request (excluded from statistics).
        record: The record itself.
    """

    label: str
    device: str
    backend: str
    model: str
    model_size_bytes: int | None
    synthetic: bool
    cloud: bool
    q: Value
    q_n: int | None
    q_correct: int | None
    r: Value
    u: Value
    ttft_ms: Value
    tgs: Value
    tgs_sd: float | None
    ttft_run_ms: Value
    ttft_run_sd: float | None
    power_mw: Value
    power_sd: float | None
    energy_run_mj: Value
    energy_run_sd: float | None
    energy_per_response_mj: Value
    energy_estimated: bool
    energy_sources: tuple[str, ...]
    cpr_cents: Value
    pcr: Value
    cost_ratio: Value
    samples: dict[str, list[float]]
    cold_ttft_ms: float | None
    record: dict[str, Any]


def device_name(record: dict[str, Any]) -> str:
    """Board model, else ``hostname (CPU)``; ``cloud`` for cloud rows."""
    if is_cloud(record):
        return "cloud"
    hw = ((record.get("provenance") or {}).get("hardware")) or {}
    board = hw.get("board_model")
    if board:
        return str(board)
    host, cpu = hw.get("hostname"), hw.get("cpu_model")
    if host and cpu:
        return f"{host} ({cpu})"
    return str(host or cpu or "unknown device")


def is_cloud(record: dict[str, Any]) -> bool:
    """True when the record's cost per response comes from token prices (see module doc)."""
    paper = record.get("paper") or {}
    if paper.get("cpr_basis") in ("cloud", "cloud_tokens"):
        return True
    if record.get("backend") == "openai":
        return any((r.get("engine") or {}).get("cost") is not None
                   for r in record.get("runs") or [])
    return False


def _stat(record: dict[str, Any], key: str, what: str) -> tuple[Value, float | None]:
    s = (record.get("summary") or {}).get(key)
    if not s or s.get("mean") is None:
        if not record.get("valid_runs", 1):
            return Missing("no valid runs (all marked invalid)"), None
        return Missing(what), None
    return float(s["mean"]), (float(s["stdev"]) if s.get("stdev") is not None else None)


def _energy_status(record: dict[str, Any]) -> tuple[bool, str | None, tuple[str, ...]]:
    """(estimated, reason-if-not-measured, sources) from the runs' energy blocks."""
    totals = [((r.get("energy") or {}).get("total") or {}) for r in record.get("runs") or []]
    if not any(totals):
        return False, "the record has no energy data", ()
    estimated = any(t.get("estimated") for t in totals)
    sources = tuple(sorted({s for t in totals for s in t.get("sources") or []}))
    missing = [t for t in totals if t.get("gross_mj") is None]
    if not missing:
        return estimated, None, sources
    why = next((t.get("reason") for t in missing if t.get("reason")), None) or "no power source"
    if len(missing) < len(totals):
        why = f"measured for {len(totals) - len(missing)} of {len(totals)} runs only: {why}"
    return estimated, why, sources


def _reason(paper: dict[str, Any], needle: str, default: str) -> str:
    for r in paper.get("reasons") or []:
        if needle in r:
            return str(r)
    return default


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _row(record: dict[str, Any]) -> ReportRow:
    paper = record.get("paper") or {}
    model = record.get("model") or {}
    quality = record.get("quality") or {}
    cloud = is_cloud(record)
    estimated, energy_why, sources = _energy_status(record)

    q_raw = _num(paper.get("q"))
    if q_raw is None:
        q_raw = _num(quality.get("pass_at_1"))
    q: Value = q_raw if q_raw is not None else Missing(
        _reason(paper, "Q needs", "Q needs --quality gsm8k"))
    ttft = _num(paper.get("ttft_ms"))
    r = _num(paper.get("r"))
    u = _num(paper.get("u"))
    cpr = _num(paper.get("cpr_cents"))
    pcr = _num(paper.get("pcr"))
    epr = _num(paper.get("energy_per_response_mj"))
    if cloud and cpr is None:
        costs = [_num((x.get("engine") or {}).get("cost")) for x in record.get("runs") or []]
        known = [c for c in costs if c is not None]
        if known:
            cpr = sum(known) / len(known) * 100.0  # currency units → cents
    if pcr is None and u is not None and cpr:
        pcr = u / cpr

    no_energy = ("cloud row: cost comes from token prices, not energy" if cloud
                 else f"{energy_why or 'no power source'}")
    no_energy_short = "n/a: cloud" if cloud else None
    tgs, tgs_sd = _stat(record, "decode_tok_s", "no decode speed (runs produced < 2 tokens)")
    ttft_run, ttft_sd = _stat(record, "ttft_ms", "no TTFT")
    power, power_sd = _stat(record, "power_mw", no_energy)
    energy_run, energy_sd = _stat(record, "energy_mj", no_energy)
    if cloud:
        power = Missing(no_energy, no_energy_short)
        energy_run = Missing(no_energy, no_energy_short)

    samples = {}
    for key in ("ttft_ms", "itl_ms", "e2e_ms"):
        s = (record.get("summary") or {}).get(key) or {}
        samples[key] = [float(v) for v in s.get("samples") or [] if _num(v) is not None]

    q_missing = q if isinstance(q, Missing) else None
    u_value: Value
    if u is not None:
        u_value = u
    elif q_missing is not None:
        u_value = Missing(f"needs Q ({q_missing.why})", "needs Q")
    else:
        u_value = Missing("needs Q and R", "needs Q and R")
    cpr_value: Value
    if cpr is not None:
        cpr_value = cpr
    elif cloud:
        cpr_value = Missing("no token prices configured for the endpoint")
    else:
        cpr_value = Missing(f"needs energy per response: {no_energy}", "needs energy")
    pcr_value: Value
    if pcr is not None:
        pcr_value = pcr
    else:
        parts = [w for w, v in (("U", u_value), ("CPR", cpr_value)) if isinstance(v, Missing)]
        need = f"needs {' and '.join(parts) or 'U and CPR'}"
        pcr_value = Missing(need, need)
    return ReportRow(
        label="",
        device=device_name(record),
        backend=str(record.get("backend") or "?"),
        model=str(model.get("name") or "?"),
        model_size_bytes=int(model["size_bytes"]) if _num(model.get("size_bytes")) else None,
        synthetic=record.get("synthetic") is True,
        cloud=cloud,
        q=q,
        q_n=quality.get("n") if isinstance(quality.get("n"), int) else None,
        q_correct=quality.get("correct") if isinstance(quality.get("correct"), int) else None,
        r=r if r is not None else Missing("no TTFT"),
        u=u_value,
        ttft_ms=ttft if ttft is not None else ttft_run,
        tgs=tgs,
        tgs_sd=tgs_sd,
        ttft_run_ms=ttft_run,
        ttft_run_sd=ttft_sd,
        power_mw=power,
        power_sd=power_sd,
        energy_run_mj=energy_run,
        energy_run_sd=energy_sd,
        energy_per_response_mj=epr if epr is not None else Missing(no_energy, no_energy_short),
        energy_estimated=estimated,
        energy_sources=sources,
        cpr_cents=cpr_value,
        pcr=pcr_value,
        cost_ratio=Missing("no cloud row to compare with"),
        samples=samples,
        cold_ttft_ms=_num((record.get("cold") or {}).get("ttft_ms")),
        record=record,
    )


def _started(record: dict[str, Any]) -> str:
    ts = _num(record.get("ts_unix_ms"))
    if ts is None:
        return "?"
    return dt.datetime.fromtimestamp(ts / 1000, dt.UTC).strftime("%Y-%m-%d %H:%MZ")


def build_rows(records: Sequence[dict[str, Any]]) -> list[ReportRow]:
    """Flatten records into rows with unique labels and the edge ÷ cloud cost ratio."""
    rows = [_row(r) for r in records]
    base = [f"{r.device} · {r.backend} · {r.model}" for r in rows]
    labelled = []
    for i, row in enumerate(rows):
        label = base[i]
        if base.count(label) > 1:  # same configuration twice: tell them apart by start time
            label += f" @ {_started(row.record)}"
            if sum(1 for j, b in enumerate(base) if b == base[i]
                   and _started(rows[j].record) == _started(row.record)) > 1:
                label += f" #{base[: i + 1].count(base[i])}"
        if row.synthetic:
            label += " [synthetic]"
        labelled.append(dataclasses.replace(row, label=label))
    ref = next((r for r in labelled if r.cloud and isinstance(r.cpr_cents, float)), None)
    if ref is None:
        return labelled
    ref_cpr = ref.cpr_cents
    assert isinstance(ref_cpr, float)
    out = []
    for row in labelled:
        ratio: Value
        if row is ref:
            ratio = 1.0
        elif isinstance(row.cpr_cents, float) and ref_cpr > 0:
            ratio = row.cpr_cents / ref_cpr
        else:
            ratio = Missing("needs this row's CPR", "needs CPR") if not row.cloud else Missing(
                "another cloud row is the reference", "other cloud")
        out.append(dataclasses.replace(row, cost_ratio=ratio))
    return out


# ---------------------------------------------------------------------------------- format


def fmt_value(v: Value | None, kind: str = "g3") -> str:
    """Format a number for tables (``g3``: 3 significant digits; ``pct``; ``int``; ``f1``)."""
    if v is None:
        return "—"
    if isinstance(v, Missing):
        if v.short and v.short.startswith("n/a"):  # not applicable (cloud energy), not missing
            return f"n/a — {v.why}"
        return f"{_NOT_MEASURED} — {v.why}"
    if kind == "pct":
        return f"{v * 100:.1f} %"
    if kind == "f1":
        return f"{v:,.1f}"
    if kind == "f3":
        return f"{v:.3f}"
    if kind == "ratio":
        return fmt_ratio(v)
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if v == 0 or abs(v) >= 1:
        return f"{v:.3g}"
    # small CPRs (a few millionths of a cent): fixed point, 3 significant digits
    return f"{v:.{2 - math.floor(math.log10(abs(v)))}f}"


def fmt_ratio(v: float) -> str:
    """An edge ÷ cloud cost ratio, with the "× cheaper" a reader wants."""
    if v == 1.0:
        return "1 (reference)"
    base = fmt_value(v)
    if 0 < v < 1:
        return f"{base} ({1 / v:,.0f}× cheaper)" if v < 0.1 else f"{base} ({1 / v:.1f}× cheaper)"
    return f"{base} ({v:.1f}× dearer)"


TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    # (header, ReportRow attribute, format)
    ("Q (GSM8K pass@1)", "q", "f3"),
    ("R", "r", "f3"),
    ("U", "u", "f3"),
    ("TTFT ms", "ttft_ms", "f1"),
    ("TGS tok/s", "tgs", "f1"),
    ("E/resp J", "energy_per_response_j", "g3"),
    ("CPR ¢", "cpr_cents", "g3"),
    ("PCR (U/¢)", "pcr", "g3"),
    ("CPR ÷ cloud", "cost_ratio", "ratio"),
)


def _cell(row: ReportRow, attr: str) -> Value:
    if attr == "energy_per_response_j":
        v = row.energy_per_response_mj
        return v / 1000.0 if isinstance(v, float) else v
    value: Value = getattr(row, attr)
    return value


def table_one(rows: Sequence[ReportRow]) -> tuple[list[str], list[list[Value | str]]]:
    """The paper's Table I as (headers, cells); the ratio column only with a cloud row."""
    has_cloud = any(r.cloud for r in rows)
    cols = [c for c in TABLE_COLUMNS if has_cloud or c[1] != "cost_ratio"]
    headers = ["configuration", *(c[0] for c in cols)]
    body: list[list[Value | str]] = []
    for row in rows:
        body.append([row.label, *(_cell(row, c[1]) for c in cols)])
    return headers, body


# ---------------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class FigureOut:
    """A rendered figure.

    Attributes:
        stem: File name without extension, e.g. ``"performance"``.
        title: Heading on the HTML page.
        caption: What the figure shows and how to read it.
        png: The PNG bytes.
    """

    stem: str
    title: str
    caption: str
    png: bytes


@dataclass(frozen=True)
class ReportSection:
    """Extra content for the page (e.g. fleet figures): figures plus trusted HTML.

    Attributes:
        title: Section heading.
        figures: Rendered figures (also written as PNG files when ``png`` is requested).
        html: HTML placed after the heading (the caller escapes any text it interpolates).
    """

    title: str
    figures: tuple[FigureOut, ...] = ()
    html: str = ""


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise ReportError("figures need matplotlib: pip install 'edgelm-agent[report]'") from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def matplotlib_version() -> str:
    """The installed matplotlib's version string."""
    import matplotlib

    return str(matplotlib.__version__)


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def _palette(rows: Sequence[ReportRow]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {b: cmap(i % 10) for i, b in enumerate(sorted({r.backend for r in rows}))}


def _short_num(v: float) -> str:
    """A compact, readable number for a figure label (no scientific notation above 1)."""
    a = abs(v)
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.2g}"


def _wrap_label(label: str, width: int = 34) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(label, width, break_long_words=False)) or label


class _Notes:
    """Numbered footnotes for "not measured" reasons (one number per distinct reason)."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def ref(self, why: str) -> int:
        if why not in self.items:
            self.items.append(why)
        return self.items.index(why) + 1

    def text(self, width: int = 150) -> str:
        import textwrap

        lines = []
        for i, why in enumerate(self.items, 1):
            lines.extend(textwrap.wrap(f"[{i}] {_NOT_MEASURED} — {why}", width,
                                       subsequent_indent="     "))
        return "\n".join(lines)


def _synthetic_banner(fig: Any, rows: Sequence[ReportRow]) -> None:
    if any(r.synthetic for r in rows):
        fig.text(0.01, 1.0, "Includes SYNTHETIC test records (labelled [synthetic]): not "
                 "measurements", color="#b00020", fontsize=9, fontweight="bold", va="bottom")


def figure_accuracy_vs_size(rows: Sequence[ReportRow]) -> FigureOut:
    """Q (GSM8K Pass@1, Wilson 95 % interval) against model file size."""
    plt = _pyplot()
    colors = _palette(rows)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    placed = [r for r in rows if isinstance(r.q, float) and r.model_size_bytes]
    clouds = [r for r in rows if isinstance(r.q, float) and not r.model_size_bytes]
    unmeasured = [r for r in rows if isinstance(r.q, Missing)]
    groups: dict[tuple[Any, ...], list[ReportRow]] = {}
    for r in placed:
        key = (r.model, r.backend, r.model_size_bytes, r.q, r.q_correct, r.q_n)
        groups.setdefault(key, []).append(r)  # same model and score on several devices
    taken: list[tuple[float, float]] = []
    for (model, backend, size, q, correct, n_q), members in groups.items():
        x = size / 1e6
        # a different point at (almost) the same place: move its label up, not on top
        clash = sum(1 for tx, tq in taken if abs(tx - x) <= 0.05 * x and abs(tq - q) < 0.04)
        taken.append((x, q))
        lo, hi = _wilson(correct, n_q) if n_q else (q, q)
        ax.errorbar([x], [q * 100], yerr=[[(q - lo) * 100], [(hi - q) * 100]],
                    fmt="o", color=colors[backend], capsize=4, markersize=7)
        devices = "\n".join(f"{m.device}{' [synthetic]' if m.synthetic else ''}"
                             for m in members)
        score = (f"{correct}/{n_q} correct" if n_q else f"Q = {q:.3f}") + (
            " (each)" if len(members) > 1 else "")
        ax.annotate(f"{model} · {backend}\n{devices}\n{score}", (x, q * 100),
                    xytext=(8, 4 + 40 * clash), textcoords="offset points", fontsize=8,
                    va="bottom")
    for r in clouds:
        assert isinstance(r.q, float)
        ax.axhline(r.q * 100, color="grey", linestyle="--", linewidth=1)
        ax.text(0.99, r.q * 100, f"cloud: {r.model} ({r.q * 100:.0f} %, size unknown)",
                transform=ax.get_yaxis_transform(), ha="right", va="bottom", fontsize=8,
                color="dimgrey")
    if placed:
        sizes = [r.model_size_bytes / 1e6 for r in placed if r.model_size_bytes]
        if max(sizes) / min(sizes) > 8:
            ax.set_xscale("log")
        lo_x, hi_x = min(sizes), max(sizes)
        ax.set_xlim(lo_x / 1.6, hi_x * 2.2)  # room for the point labels on the right
    else:
        ax.text(0.5, 0.5, "Q was not measured in any record\n(run `agentctl bench --quality "
                "gsm8k`)", transform=ax.transAxes, ha="center", va="center", fontsize=12,
                color="dimgrey")
        ax.set_xticks([])
    ax.set_ylim(-2, 102)
    ax.set_xlabel("model file size (MB)")
    ax.set_ylabel("GSM8K pass@1 (%)")
    ax.set_title("Accuracy (Q) vs model size — error bars: Wilson 95 % interval over the "
                 "questions scored", fontsize=10)
    ax.grid(True, alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=c, label=b)
               for b, c in colors.items() if any(r.backend == b for r in placed)]
    if handles:
        ax.legend(handles=handles, title="backend", fontsize=8, loc="upper left")
    if unmeasured:
        import textwrap

        whys = sorted({r.q.why for r in unmeasured if isinstance(r.q, Missing)})
        lines = []
        for why in whys:
            who = "; ".join(r.label for r in unmeasured
                            if isinstance(r.q, Missing) and r.q.why == why)
            lines += textwrap.wrap(f"Q {_NOT_MEASURED} — {why}: {who}", 130,
                                   subsequent_indent="    ")
        fig.text(0.01, -0.02, "\n".join(lines), fontsize=8, va="top")
    _synthetic_banner(fig, rows)
    return FigureOut("accuracy_vs_size", "Accuracy vs model size",
                     "GSM8K Pass@1 (Q) of each record against its model file size. Error bars "
                     "are Wilson 95 % intervals: with few questions they are wide, so small "
                     "differences between points mean little.", _png(fig))


def _wilson(correct: int | None, n: int | None, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion."""
    if not n or correct is None:
        return (0.0, 1.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


_PERF_PANELS: tuple[tuple[str, str, str, float], ...] = (
    # (title, value attribute, sd attribute, scale to display unit)
    ("Decode speed (TGS)\ntok/s — higher is better", "tgs", "tgs_sd", 1.0),
    ("Time to first token (warm runs)\nms — lower is better", "ttft_run_ms", "ttft_run_sd",
     1.0),
    ("Mean power during a response\nW", "power_mw", "power_sd", 1e-3),
    ("Energy per response\nJ (gross) — lower is better", "energy_run_mj", "energy_run_sd", 1e-3),
)


def _workload(row: ReportRow) -> str:
    rec = row.record
    cfg = rec.get("config") or {}
    runs = (rec.get("summary") or {}).get("ttft_ms") or {}
    return (f"{runs.get('n', 0)} runs, {rec.get('n_prompt', '?')} → "
            f"{cfg.get('max_tokens', '?')} tok")


def figure_performance(rows: Sequence[ReportRow]) -> FigureOut:
    """TGS, TTFT, power and energy per response, one horizontal bar per record."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    colors = _palette(rows)
    n = len(rows)
    fig, axes = plt.subplots(1, len(_PERF_PANELS), figsize=(17, 1.6 + 0.62 * n), sharey=True)
    notes = _Notes()
    ys = list(range(n))[::-1]
    any_estimated = False
    for ax, (title, attr, sd_attr, scale) in zip(axes, _PERF_PANELS, strict=True):
        values = [getattr(r, attr) for r in rows]
        present = [(v + (getattr(r, sd_attr) or 0.0)) * scale
                   for r, v in zip(rows, values, strict=True) if isinstance(v, float)]
        top = max(present) if present else 1.0
        for y, row, v in zip(ys, rows, values, strict=True):
            if isinstance(v, Missing):
                text = f"— {v.short}" if v.short else f"{_NOT_MEASURED} [{notes.ref(v.why)}]"
                ax.text(0.01 * top, y, text, va="center", fontsize=8, color="dimgrey",
                        style="italic")
                continue
            sd = getattr(row, sd_attr)
            energy_like = attr in ("power_mw", "energy_run_mj")
            estimated = energy_like and row.energy_estimated
            any_estimated |= estimated
            ax.barh(y, v * scale, xerr=(sd * scale if sd else None), color=colors[row.backend],
                    hatch="///" if estimated else None, edgecolor="black" if estimated else None,
                    linewidth=0.6, capsize=3, height=0.6)
            text = _short_num(v * scale) + (f" ± {_short_num(sd * scale)}" if sd else "")
            if estimated:
                text += "  (estimated)"
            ax.text(v * scale + (sd * scale if sd else 0) + 0.02 * top, y, text, va="center",
                    fontsize=8)
        ax.set_xlim(0, top * 1.6)  # room for the value labels
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
    axes[0].set_yticks(ys)
    axes[0].set_yticklabels([f"{_wrap_label(r.label)}\n({_workload(r)})" for r in rows],
                            fontsize=8)
    handles = [Patch(color=c, label=b) for b, c in colors.items()]
    if any_estimated:
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="///",
                             label=_ESTIMATED_LEGEND))
    fig.legend(handles=handles, loc="lower right", ncol=min(6, len(handles)), fontsize=8,
               bbox_to_anchor=(1.0, 1.0), title="backend", title_fontsize=8)
    foot = ("Bars: mean over the measured (valid) runs; whiskers: ± 1 standard deviation. "
            "Power and energy cover what the power source measures (see the record table).")
    if notes.items:
        foot += "\n" + notes.text()
    fig.text(0.01, -0.01, foot, fontsize=8, va="top")
    _synthetic_banner(fig, rows)
    fig.tight_layout()
    return FigureOut("performance", "Speed, latency, power and energy",
                     "Per device, backend and model: decode speed, TTFT, mean power and energy "
                     "of one bench response (mean ± sd over the measured runs). Missing bars "
                     "say why they were not measured; hatched bars are estimates from the "
                     "power model, not sensor readings.", _png(fig))


_LATENCY_PANELS: tuple[tuple[str, str], ...] = (
    ("ttft_ms", "TTFT (ms)"),
    ("itl_ms", "ITL, mean gap between tokens per run (ms)"),
    ("e2e_ms", "End-to-end latency (ms)"),
)


def figure_latency(rows: Sequence[ReportRow]) -> FigureOut:
    """Box plots of the raw per-run samples, points overlaid; the cold request marked apart."""
    plt = _pyplot()
    colors = _palette(rows)
    n = len(rows)
    fig, axes = plt.subplots(1, 3, figsize=(16, 1.6 + 0.62 * n), sharey=True)
    ys = list(range(n))[::-1]
    cold_shown = False
    # matplotlib 3.10 renamed vert=False to orientation="horizontal" (vert warns from 3.11)
    major, minor = (int(p) for p in matplotlib_version().split(".")[:2])
    horizontal: dict[str, Any] = ({"orientation": "horizontal"} if (major, minor) >= (3, 10)
                                  else {"vert": False})
    for ax, (key, title) in zip(axes, _LATENCY_PANELS, strict=True):
        all_values: list[float] = []
        for y, row in zip(ys, rows, strict=True):
            vals = row.samples.get(key) or []
            if not vals:
                ax.text(0.02, y, f"{_NOT_MEASURED}: no valid runs", va="center", fontsize=8,
                        color="dimgrey", style="italic", transform=ax.get_yaxis_transform())
                continue
            all_values.extend(vals)
            bp = ax.boxplot([vals], positions=[y], widths=0.5, showfliers=False,
                            patch_artist=True, manage_ticks=False,
                            medianprops={"color": "black", "linewidth": 1.5}, **horizontal)
            for box in bp["boxes"]:
                box.set(facecolor=colors[row.backend], alpha=0.35)
            jitter = [y + 0.12 * math.sin(i * 2.4) for i in range(len(vals))]
            ax.scatter(vals, jitter, s=14, color=colors[row.backend], zorder=3,
                       edgecolor="black", linewidth=0.4)
            if key == "ttft_ms" and row.cold_ttft_ms:
                ax.scatter([row.cold_ttft_ms], [y], marker="x", s=40, color="black", zorder=4,
                           label=None if cold_shown else "cold first request (not in stats)")
                all_values.append(row.cold_ttft_ms)
                cold_shown = True
        if all_values and min(all_values) > 0 and max(all_values) / min(all_values) > 30:
            ax.set_xscale("log")
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
    axes[0].set_yticks(ys)
    axes[0].set_yticklabels([f"{_wrap_label(r.label)}\n({len(r.samples.get('ttft_ms') or [])} "
                             "runs)" for r in rows], fontsize=8)
    axes[0].set_ylim(-0.7, n - 0.3)
    if cold_shown:
        fig.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.text(0.01, -0.01, "Boxes: quartiles and median of the measured runs (whiskers 1.5 IQR); "
             "dots: each run. ITL is each run's mean gap between tokens, not per-token gaps.",
             fontsize=8, va="top")
    _synthetic_banner(fig, rows)
    fig.tight_layout()
    return FigureOut("latency", "Latency distributions",
                     "TTFT, per-run mean inter-token latency and end-to-end latency of every "
                     "measured run (the raw samples in each record). The cold first request "
                     "(model just loaded) is marked apart: it is excluded from the statistics.",
                     _png(fig))


def figure_table_one(rows: Sequence[ReportRow]) -> FigureOut:
    """The paper's Table I as an image (long reasons as numbered footnotes)."""
    plt = _pyplot()
    headers, body = table_one(rows)
    notes = _Notes()
    kinds = {c[0]: c[2] for c in TABLE_COLUMNS}
    row_est = [r.energy_estimated and not r.cloud for r in rows]
    cells: list[list[str]] = []
    for line in body:
        out = [_wrap_label(str(line[0]), 42)]
        for h, v in zip(headers[1:], line[1:], strict=True):
            if isinstance(v, Missing):
                out.append(f"— {v.short}" if v.short else f"{_NOT_MEASURED} [{notes.ref(v.why)}]")
            elif isinstance(v, float):
                est = row_est[len(cells)] and h in _ENERGY_COLUMNS
                out.append(fmt_value(v, kinds[h]) + (" (est.)" if est else ""))
            else:
                out.append(str(v))
        cells.append(out)
    estimated = [r for r in rows if r.energy_estimated and not r.cloud]
    foot = ["Q: GSM8K pass@1; R = min(1, TTFT_ref / TTFT); U = αQ + (1−α)R; "
            "CPR: cost per response in cents; PCR = U / CPR; \"— needs X\": not computed "
            "because X is missing.",
            "TTFT and E/resp are over the GSM8K answers when Q was measured, else over the "
            "bench runs."]
    if estimated:
        foot.append("E/resp, CPR and PCR are ESTIMATED (power model, not a sensor) for: "
                    + "; ".join(r.label for r in estimated))
    if notes.items:
        foot.append(notes.text(170))
    foot_text = "\n".join(foot)
    n_foot = foot_text.count("\n") + 1
    row_h, foot_h, title_h = 0.5, 0.16 * n_foot + 0.2, 0.45
    height = title_h + row_h * (len(rows) + 1) + foot_h
    fig = plt.figure(figsize=(15, height))
    ax = fig.add_axes((0.0, foot_h / height, 1.0, row_h * (len(rows) + 1) / height))
    ax.axis("off")
    table = ax.table(cellText=cells, colLabels=headers, cellLoc="center", loc="center",
                     bbox=(0.0, 0.0, 1.0, 1.0))
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    chars = [max(len(line) for text in [headers[c], *(row[c] for row in cells)]
                 for line in text.split("\n")) + 3 for c in range(len(headers))]
    widths = [w / sum(chars) for w in chars]
    for (r, c), cell in table.get_celld().items():
        cell.set_width(widths[c])
        if r == 0:
            cell.set_facecolor("#e8e8e8")
            cell.set_text_props(fontweight="bold")
        elif cell.get_text().get_text().startswith(("—", _NOT_MEASURED)):
            cell.get_text().set_color("dimgrey")
            cell.get_text().set_style("italic")
    fig.text(0.5, 1 - 0.1 / height, "Table I — quality, responsiveness, cost and PCR",
             ha="center", va="top", fontsize=11)
    fig.text(0.01, (foot_h - 0.1) / height, foot_text, fontsize=8, va="top")
    _synthetic_banner(fig, rows)
    return FigureOut("pcr_table", "Table I (PCR)",
                     "The paper's Table I as an image; the same values are in the HTML table.",
                     _png(fig))


_ENERGY_COLUMNS = frozenset({"E/resp J", "CPR ¢", "PCR (U/¢)", "CPR ÷ cloud"})

FigureBuilder = Callable[[Sequence[ReportRow]], FigureOut]
FIGURES: tuple[FigureBuilder, ...] = (
    figure_table_one,
    figure_accuracy_vs_size,
    figure_performance,
    figure_latency,
)


# ---------------------------------------------------------------------------------- HTML


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1500px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right;vertical-align:top}
th{background:#f0f0f0} td.l,th.l{text-align:left}
td.nm{color:#777;font-style:italic;text-align:left;max-width:22em}
.est{color:#8a5a00;font-weight:bold}
.syn{background:#fde7e9;border:1px solid #b00020;padding:.5em 1em;color:#b00020}
figure{margin:1.5em 0} figcaption{font-size:13px;color:#444;max-width:70em}
img{max-width:100%;border:1px solid #ddd}
"""


def _td(v: Value | str | None, kind: str = "g3", estimated: bool = False) -> str:
    if isinstance(v, Missing):
        return f'<td class="nm">{html.escape(fmt_value(v))}</td>'
    if isinstance(v, str):
        return f'<td class="l">{html.escape(v)}</td>'
    text = html.escape(fmt_value(v, kind))
    if estimated and v is not None:
        text += ' <span class="est">(estimated)</span>'
    return f"<td>{text}</td>"


def _html_table_one(rows: Sequence[ReportRow], failures: Sequence[dict[str, Any]]) -> str:
    headers, body = table_one(rows)
    kinds = {c[0]: c[2] for c in TABLE_COLUMNS}
    out = ["<table><tr>" + "".join(
        f'<th class="{"l" if i == 0 else ""}">{html.escape(h)}</th>'
        for i, h in enumerate(headers)) + "</tr>"]
    for row, line in zip(rows, body, strict=True):
        cells = [_td(str(line[0]))]
        for h, v in zip(headers[1:], line[1:], strict=True):
            est = row.energy_estimated and not row.cloud and h in _ENERGY_COLUMNS
            cells.append(_td(v, kinds[h], est))
        out.append("<tr>" + "".join(cells) + "</tr>")
    for f in failures:
        out.append(f'<tr><td class="l">{html.escape(str(f["label"]))}</td>'
                   f'<td class="nm" colspan="{len(headers) - 1}">FAILED — '
                   f"{html.escape(str(f['error']))}</td></tr>")
    out.append("</table>")
    has_cloud = any(r.cloud for r in rows)
    ref = next((r for r in rows if r.cloud and isinstance(r.cpr_cents, float)), None)
    notes = ["Q: GSM8K Pass@1 on the questions scored; R = min(1, TTFT_ref / TTFT); "
             "U = αQ + (1−α)R; CPR: cost per response in cents (edge: energy × electricity "
             "price; cloud: tokens × token prices); PCR = U / CPR. E/resp is over the GSM8K "
             "answers when Q was measured, else over the bench runs."]
    if has_cloud and ref is not None:
        notes.append(f"CPR ÷ cloud: each row's CPR divided by that of {ref.label} "
                     "(below 1: cheaper than the cloud).")
    return "\n".join(out) + "".join(f"<p><small>{html.escape(n)}</small></p>" for n in notes)


def _energy_cell(row: ReportRow) -> str:
    if row.cloud:
        return '<td class="l">cloud: CPR from token prices</td>'
    if isinstance(row.energy_run_mj, Missing):
        return f'<td class="nm">{html.escape(fmt_value(row.energy_run_mj))}</td>'
    src = ", ".join(row.energy_sources) or "?"
    if row.energy_estimated:
        return (f'<td class="l"><span class="est">ESTIMATED</span> from {html.escape(src)} '
                "(power model, not a sensor)</td>")
    return f'<td class="l">measured by {html.escape(src)}</td>'


def _html_records(rows: Sequence[ReportRow]) -> str:
    heads = ["configuration", "started (UTC)", "device / CPU", "OS", "backend / engine",
             "model", "threads", "runs (valid)", "max tokens", "prompt tokens", "load ms",
             "cold TTFT ms", "energy source", "notes"]
    out = ["<table><tr>" + "".join(f'<th class="l">{html.escape(h)}</th>' for h in heads)
           + "</tr>"]
    for row in rows:
        rec = row.record
        prov = rec.get("provenance") or {}
        hw = prov.get("hardware") or {}
        cfg = rec.get("config") or {}
        model = rec.get("model") or {}
        size = model.get("size_bytes")
        notes = list(rec.get("notes") or []) + list((rec.get("paper") or {}).get("reasons") or [])
        notes += [f"INVALID run: {r.get('invalid_reason')}" for r in rec.get("runs") or []
                  if r.get("valid") is False]
        if row.synthetic:
            notes.insert(0, "SYNTHETIC test record, not a measurement")
        cells = [
            row.label,
            _started(rec),
            f"{row.device} / {hw.get('cpu_model') or '?'} ({hw.get('cpu_count') or '?'} CPUs, "
            f"{hw.get('machine') or '?'})",
            str(hw.get("os") or "?"),
            f"{row.backend} / {prov.get('engine') or '?'} {prov.get('engine_version') or ''}",
            f"{row.model} ({model.get('format') or '?'}, {model.get('quantization') or '?'}"
            + (f", {size / 1e6:.1f} MB" if isinstance(size, (int, float)) else "") + ")",
            str(cfg.get("n_threads", rec.get("n_threads", "?"))),
            f"{cfg.get('runs', '?')} ({rec.get('valid_runs', '?')}), {cfg.get('warmup', '?')} "
            "warm-up",
            str(cfg.get("max_tokens", "?")) + (" (ignore EOS)" if cfg.get("ignore_eos") else ""),
            str(rec.get("n_prompt", "?")),
            fmt_value(_num(rec.get("load_ms")), "f1"),
            fmt_value(row.cold_ttft_ms, "f1"),
        ]
        tds = "".join(f'<td class="l">{html.escape(c)}</td>' for c in cells)
        tds += _energy_cell(row)
        tds += '<td class="l">' + "<br>".join(html.escape(str(n)) for n in notes) + "</td>"
        out.append(f"<tr>{tds}</tr>")
    out.append("</table>")
    return "\n".join(out)


def _html_figure(fig: FigureOut) -> str:
    data = base64.b64encode(fig.png).decode("ascii")
    return (f"<figure><img alt=\"{html.escape(fig.title)}\" src=\"data:image/png;base64,{data}\">"
            f"<figcaption>{html.escape(fig.caption)}</figcaption></figure>")


def render_html(rows: Sequence[ReportRow], figures: Sequence[FigureOut],
                failures: Sequence[dict[str, Any]] = (), skipped: Sequence[str] = (),
                sections: Sequence[ReportSection] = (), figures_error: str | None = None) -> str:
    """The self-contained report page."""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<title>edgelm bench report</title>", f"<style>{_CSS}</style></head><body>",
        "<h1>edgelm bench report</h1>",
        f"<p>{len(rows)} record(s); generated {html.escape(now)} by agentctl report. "
        "Metrics per arXiv 2505.16508 and DESIGN.md §5.</p>",
    ]
    if any(r.synthetic for r in rows):
        parts.append('<p class="syn">This report includes SYNTHETIC test records (labelled '
                     "[synthetic]). They are fixtures, not measurements.</p>")
    if any(r.energy_estimated for r in rows):
        parts.append('<p><span class="est">Estimated energy:</span> rows marked "estimated" '
                     "take power from the configured power model (idle + utilisation × "
                     "(max − idle)), not from a sensor.</p>")
    parts.append("<h2>Table I — quality, responsiveness, cost, PCR</h2>")
    parts.append(_html_table_one(rows, failures))
    parts.append("<h2>Figures</h2>")
    if figures_error:
        parts.append(f'<p class="nm">Figures not rendered: {html.escape(figures_error)}</p>')
    parts.extend(_html_figure(f) for f in figures if f.stem != "pcr_table")
    parts.append("<h2>Records</h2>")
    parts.append(_html_records(rows))
    for sec in sections:
        parts.append(f"<h2>{html.escape(sec.title)}</h2>{sec.html}")
        parts.extend(_html_figure(f) for f in sec.figures)
    if skipped:
        parts.append("<h2>Inputs skipped</h2><ul>"
                     + "".join(f"<li>{html.escape(s)}</li>" for s in skipped) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------- entry


def parse_formats(spec: str) -> tuple[str, ...]:
    """``"png,html"`` → ``("png", "html")``.

    Raises:
        ValueError: An unknown or empty format list.
    """
    fmts = tuple(dict.fromkeys(f.strip().lower() for f in spec.split(",") if f.strip()))
    bad = [f for f in fmts if f not in FORMATS]
    if bad or not fmts:
        raise ValueError(f"unknown format(s) {', '.join(bad) or '(none)'}; "
                         f"choose from {', '.join(FORMATS)}")
    return fmts


def render_report(
    records: Sequence[dict[str, Any]],
    out_dir: str | os.PathLike[str],
    formats: Sequence[str] = FORMATS,
    *,
    failures: Sequence[dict[str, Any]] = (),
    skipped: Sequence[str] = (),
    sections: Sequence[ReportSection] = (),
    figures: Sequence[FigureBuilder] = FIGURES,
) -> list[Path]:
    """Render figures and the HTML page from bench records into ``out_dir``.

    Args:
        records: ``edgelm.bench/1`` records.
        out_dir: Output directory (created).
        formats: ``png`` (one file per figure) and/or ``html`` (``report.html``, figures
            embedded, so it is self-contained).
        failures: Failed compare rows (``{"label", "error"}``) to list in the table.
        skipped: Inputs that were not records, listed on the page.
        sections: Extra sections (e.g. fleet figures) appended to the page; their figures are
            written as PNG too.
        figures: Figure builders to run (default: all of :data:`FIGURES`).

    Returns:
        The files written, in order.

    Raises:
        ReportError: No records, or PNG output requested without matplotlib.
    """
    if not records:
        raise ReportError("no edgelm.bench/1 records to report on")
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ReportError(f"unknown format(s): {', '.join(bad)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = build_rows(records)
    rendered: list[FigureOut] = []
    figures_error: str | None = None
    try:
        for build in figures:
            rendered.append(build(rows))
    except ReportError as exc:
        if "png" in formats:
            raise
        figures_error = str(exc)  # HTML alone still carries the tables
    written: list[Path] = []
    if "png" in formats:
        for fig in [*rendered, *(f for s in sections for f in s.figures)]:
            path = out / f"{fig.stem}.png"
            path.write_bytes(fig.png)
            written.append(path)
    if "html" in formats:
        path = out / "report.html"
        path.write_text(render_html(rows, rendered, failures, skipped, sections, figures_error),
                        encoding="utf-8")
        written.append(path)
    return written
