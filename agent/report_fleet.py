"""Fleet figures and the fleet summary table from the collector's database (issue 7).

``agentctl report --db URL`` reads what ``agentctl collect`` stored (SQLite or PostgreSQL,
:mod:`agent.fleet.store`) and renders, per device:

- ``fleet_summary.png`` (and the HTML table): state, time online, requests served, TTFT and
  decode tok/s medians, mean power, peak temperature, energy per token, edge energy and its
  cost at ``price_kwh``, then one row for the cloud fallback (requests, tokens, cost), the
  requests nobody served, and fleet totals;
- ``fleet_latency.png``: the distributions of TTFT and decode tok/s over the devices'
  inference results;
- ``fleet_power_temp.png``: power and hottest temperature over time (telemetry, averaged
  into at most ``max_points`` buckets per device: the collector already keeps one row per
  ``--telemetry-every`` seconds; the buckets keep long windows drawable);
- ``fleet_energy_per_token.png``: energy per generated token per device;
- ``fleet_requests_cost.png``: requests served per device vs by the cloud (split by fallback
  reason), and edge energy cost vs cloud cost (from the router's accounting records);
- ``fleet_timeline.png``: online/offline timeline from the status events (LWT drops marked);
- ``report.html``: one self-contained page (figures embedded as base64 PNG).

Honesty rules, as in :mod:`agent.report`: a value that cannot be computed is shown as
"not measured — reason", never as 0. Energy per token comes from the devices' own energy
integrator (``energy.gross_mj`` in their results) when they report it: "estimated" when the
device's power source is its power model. Otherwise it comes from the router's records, whose
edge energy is the device's own figure when its result carried one, else telemetry power ×
service time (or an assumed power): marked "estimated" unless the device measured it, with
the source named. Edge cost = router-record energy (kWh) × ``price_kwh``;
cloud cost = the records' ``cost_usd`` (token prices configured on the router).
"""

from __future__ import annotations

import datetime as dt
import html
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.fleet.store import FleetStore
from agent.report import (
    _CSS,
    FigureOut,
    Missing,
    ReportError,
    ReportSection,
    Value,
    _html_figure,
    _Notes,
    _png,
    _pyplot,
    _short_num,
    fmt_value,
    matplotlib_version,
)

FLEET_FIGURES = ("fleet_summary", "fleet_latency", "fleet_power_temp", "fleet_energy_per_token",
                 "fleet_requests_cost", "fleet_timeline")
_ESTIMATED = "ESTIMATED"


# ---------------------------------------------------------------------------------- loading


@dataclass
class FleetData:
    """What the database holds for one report window.

    Attributes:
        fleet: The fleet filter (None: every fleet in the database).
        devices: Device names (devices table, results and router records), sorted.
        states: Current state per device (``online``/``offline``/``unknown``).
        reasons: Reason of the current state (``lwt``, ``shutdown``…), if any.
        results: Per device, ``(ts_ms, status, ttft_ms, decode_tok_s)`` of its results.
        energy: Per device, ``(gross_mj, completion_tokens, estimated, source)`` of the ok
            results that carry a device-measured energy.
        energy_missing: Per device, why its results carry no energy (the first reason seen).
        telemetry: Per device, ``(ts_ms, power_mw, temperature_c)`` bucket means.
        power_estimated: Per device, some of its telemetry power came from the power model.
        status: Per device, ``(ts_ms, state, reason)`` in time order.
        requests: The router's accounting records (one dict per request).
        t0_ms / t1_ms: The window covered (first and last timestamp seen).
        kind: ``sqlite`` or ``postgresql``.
    """

    fleet: str | None
    devices: list[str] = field(default_factory=list)
    states: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str | None] = field(default_factory=dict)
    results: dict[str, list[tuple[int, str, float | None, float | None]]] = field(
        default_factory=dict)
    energy: dict[str, list[tuple[float, int, bool, str]]] = field(default_factory=dict)
    energy_missing: dict[str, str] = field(default_factory=dict)
    telemetry: dict[str, list[tuple[int, float | None, float | None]]] = field(
        default_factory=dict)
    power_estimated: dict[str, bool] = field(default_factory=dict)
    status: dict[str, list[tuple[int, str, str | None]]] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    t0_ms: int | None = None
    t1_ms: int | None = None
    kind: str = "sqlite"


def _where(fleet: str | None, since_ms: int | None) -> tuple[str, tuple[Any, ...]]:
    conds: list[str] = []
    params: list[Any] = []
    if fleet:
        conds.append("fleet = ?")
        params.append(fleet)
    if since_ms is not None:
        conds.append("ts_ms >= ?")
        params.append(since_ms)
    return (" WHERE " + " AND ".join(conds) if conds else ""), tuple(params)


def _bucketed(rows: Sequence[tuple[Any, ...]], max_points: int
              ) -> list[tuple[int, float | None, float | None]]:
    """Average power and take the peak temperature per time bucket (at most ``max_points``)."""
    if len(rows) <= max_points:
        return [(int(t), _f(p), _f(c)) for t, p, c in rows]
    t0, t1 = int(rows[0][0]), int(rows[-1][0])
    width = max(1.0, (t1 - t0) / max_points)
    buckets: dict[int, list[tuple[int, float | None, float | None]]] = {}
    for t, p, c in rows:
        buckets.setdefault(min(max_points - 1, int((int(t) - t0) / width)), []).append(
            (int(t), _f(p), _f(c)))
    out = []
    for _, items in sorted(buckets.items()):
        powers = [p for _, p, _ in items if p is not None]
        temps = [c for _, _, c in items if c is not None]
        out.append((sum(t for t, _, _ in items) // len(items),
                    sum(powers) / len(powers) if powers else None,
                    max(temps) if temps else None))
    return out


def _f(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _power_is_estimate(payload: Any) -> bool:
    """Whether a telemetry row's power came from the power model (no measured rail).

    The collector's ``power_mw`` is the board input, else the measured rails, else the
    ``estimate`` source (:func:`agent.fleet.collector.telemetry_summary`).
    """
    try:
        power = json.loads(payload).get("power") or []
    except (TypeError, ValueError, AttributeError):
        return False
    measured = {p.get("covers") for p in power if isinstance(p, dict)
                and isinstance(p.get("power_mw"), (int, float)) and p.get("valid", True)}
    return not measured & {"board_input", "cpu_package", "gpu", "dram"}


def load_fleet(store: FleetStore, fleet: str | None = None, since_ms: int | None = None,
               max_points: int = 600) -> FleetData:
    """Read one report window from the collector's database."""
    where, params = _where(fleet, since_ms)
    data = FleetData(fleet=fleet, kind=store.kind)
    dev_where = " WHERE fleet = ?" if fleet else ""
    for dev, state, reason in store.query(
            f"SELECT device, state, reason FROM devices{dev_where}", (fleet,) if fleet else ()):
        data.states[dev] = state or "unknown"
        data.reasons[dev] = reason
    for dev, ts, status, ttft, tgs, payload in store.query(
            "SELECT device, ts_ms, status, ttft_ms, decode_tok_s, payload FROM results"
            f"{where} ORDER BY ts_ms", params):
        data.results.setdefault(dev, []).append((int(ts), str(status), _f(ttft), _f(tgs)))
        if status != "ok":
            continue
        try:
            body = json.loads(payload)
        except (TypeError, ValueError):
            continue
        e = body.get("energy") or {}
        gross = _f(e.get("gross_mj"))
        tokens = (body.get("usage") or {}).get("completion_tokens")
        if gross is not None and isinstance(tokens, int) and tokens > 0:
            estimated = bool(e.get("estimated")) or e.get("method") == "estimate"
            data.energy.setdefault(dev, []).append(
                (gross, tokens, estimated, str(e.get("source") or "?")))
        elif dev not in data.energy_missing:
            data.energy_missing[dev] = str(
                e.get("reason") or ("the results carry no energy object" if not e
                                    else "the device reported no energy"))
    per_dev: dict[str, list[tuple[Any, ...]]] = {}
    for dev, ts, power, temp, payload in store.query(
            f"SELECT device, ts_ms, power_mw, temperature_c, payload FROM telemetry{where} "
            "ORDER BY ts_ms", params):
        per_dev.setdefault(dev, []).append((ts, power, temp))
        if power is not None and not data.power_estimated.get(dev):
            data.power_estimated[dev] = _power_is_estimate(payload)
    data.telemetry = {d: _bucketed(rows, max_points) for d, rows in per_dev.items()}
    for dev, ts, state, reason in store.query(
            f"SELECT device, ts_ms, state, reason FROM status_events{_where(fleet, None)[0]} "
            "ORDER BY ts_ms, seq", _where(fleet, None)[1]):
        data.status.setdefault(dev, []).append((int(ts), str(state), reason))
    for row in store.query(
            "SELECT router, seq, ts_ms, request_id, served_by, device, status, fallback_reason,"
            " prompt_tokens, completion_tokens, ttft_ms, e2e_ms, energy_j, cost_usd, payload "
            f"FROM requests{where} ORDER BY ts_ms", params):
        (router, seq, ts, rid, served_by, dev, status, fallback, pt, ct, ttft, e2e, ej, cost,
         payload) = row
        try:
            energy_source = json.loads(payload).get("energy_source")
        except (TypeError, ValueError):
            energy_source = None
        data.requests.append({
            "router": router, "seq": seq, "ts_ms": int(ts), "request_id": rid,
            "served_by": served_by, "device": dev, "status": status,
            "fallback_reason": fallback, "prompt_tokens": pt, "completion_tokens": ct,
            "ttft_ms": _f(ttft), "e2e_ms": _f(e2e), "energy_j": _f(ej), "cost_usd": _f(cost),
            "energy_source": energy_source})
    names = set(data.states) | set(data.results) | set(data.telemetry) | {
        r["device"] for r in data.requests if r["device"]}
    data.devices = sorted(names)
    stamps = [t for rs in data.results.values() for t, *_ in rs]
    stamps += [t for rs in data.telemetry.values() for t, *_ in rs]
    stamps += [r["ts_ms"] for r in data.requests]
    if since_ms is None:
        stamps += [t for rs in data.status.values() for t, *_ in rs]
    if stamps:
        data.t0_ms, data.t1_ms = min(stamps), max(stamps)
    return data


# ---------------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class FleetDeviceRow:
    """One device in the fleet summary.

    Attributes:
        device: Device id.
        state: Current state (and reason, e.g. ``offline (lwt)``).
        online_share: Share of the report window the device was online, 0-1.
        served: Requests the router accounted as served by this device.
        results: Inference results the device published (any status).
        ttft_p50_ms: Median TTFT over its ok results, ms.
        decode_p50_tok_s: Median decode tok/s over its ok results.
        power_mean_w: Mean telemetry power, W.
        power_estimated: Some of that power came from the power model, not a sensor.
        temp_max_c: Hottest temperature seen, °C.
        mj_per_token: Energy per generated token, mJ.
        mj_per_token_estimated: It comes from a power model, not a sensor.
        mj_per_token_source: Where it comes from (device sources, or the router's estimate).
        edge_energy_j: Energy of the requests the router accounted to it, J.
        edge_energy_estimated: That energy is (partly) estimated.
        edge_cost_usd: ``edge_energy_j`` at the report's electricity price, USD.
    """

    device: str
    state: str
    online_share: Value
    served: int
    results: int
    ttft_p50_ms: Value
    decode_p50_tok_s: Value
    power_mean_w: Value
    power_estimated: bool
    temp_max_c: Value
    mj_per_token: Value
    mj_per_token_estimated: bool
    mj_per_token_source: str
    edge_energy_j: Value
    edge_energy_estimated: bool
    edge_cost_usd: Value


@dataclass(frozen=True)
class FleetSummary:
    """The fleet summary: per-device rows, the cloud fallback and totals.

    Attributes:
        rows: One per device.
        requests: Requests accounted by the routers.
        edge: Requests served by a device.
        cloud: Requests served by the cloud.
        not_served: Requests that ended in an error without being served.
        cloud_by_reason: Cloud requests per fallback reason.
        cloud_prompt_tokens / cloud_completion_tokens: Tokens sent to the cloud.
        cloud_cost_usd: Cloud cost from the records (token prices on the router).
        edge_cost_usd: Edge energy cost at ``price_kwh``.
        edge_energy_estimated: Some edge energy is estimated.
        price_kwh: Electricity price used, USD/kWh.
    """

    rows: tuple[FleetDeviceRow, ...]
    requests: int
    edge: int
    cloud: int
    not_served: int
    cloud_by_reason: dict[str, int]
    cloud_prompt_tokens: int
    cloud_completion_tokens: int
    cloud_cost_usd: Value
    edge_cost_usd: Value
    edge_energy_estimated: bool
    price_kwh: float

    def row(self, device: str) -> FleetDeviceRow:
        """The row of ``device``."""
        return next(r for r in self.rows if r.device == device)


def _online_share(events: list[tuple[int, str, str | None]], t0: int | None, t1: int | None
                  ) -> Value:
    if not events:
        return Missing("no status messages stored for this device")
    if t0 is None or t1 is None or t1 <= t0:
        return Missing("the report window is empty")
    online_ms = 0
    state: str | None = None
    t_prev = t0
    for ts, st, _ in events:
        ts = min(max(ts, t0), t1)
        if state == "online":
            online_ms += ts - t_prev
        state, t_prev = st, ts
    if state == "online":
        online_ms += t1 - t_prev
    return online_ms / (t1 - t0)


def _median(values: list[float], why: str) -> Value:
    return statistics.median(values) if values else Missing(why)


def _estimated_source(source: Any) -> bool:
    """Whether a router record's ``energy_source`` is an estimate.

    Only energy the device measured itself (``device <sources>``, without ``(estimated)``)
    is a measurement; telemetry power × service time and assumed power are estimates.
    """
    text = str(source or "")
    return not text.startswith("device") or "estimated" in text


def summarise(data: FleetData, price_kwh: float = 0.25) -> FleetSummary:
    """The fleet summary table from loaded data (electricity at ``price_kwh`` USD/kWh)."""
    rows: list[FleetDeviceRow] = []
    edge_total_j = 0.0
    edge_known = False
    edge_estimated = False
    for dev in data.devices:
        results = data.results.get(dev, [])
        ok = [r for r in results if r[1] == "ok"]
        ttfts = [r[2] for r in ok if r[2] is not None]
        tgs = [r[3] for r in ok if r[3] is not None]
        no_results = ("no inference results stored for this device" if not results
                      else "no successful results with this timing")
        tel = data.telemetry.get(dev, [])
        powers = [p for _, p, _ in tel if p is not None]
        temps = [c for _, _, c in tel if c is not None]
        power: Value = (sum(powers) / len(powers) / 1000.0 if powers else Missing(
            "no telemetry stored" if not tel else "telemetry carried no power reading "
            "(no power probe on this device)"))
        temp: Value = (max(temps) if temps else Missing(
            "no telemetry stored" if not tel else "telemetry carried no temperature"))
        served = [r for r in data.requests if r["served_by"] == "edge" and r["device"] == dev
                  and r["status"] == "ok"]
        energies = [r for r in served if r["energy_j"] is not None]
        e_j: Value
        e_est = False
        if energies:
            e_j = sum(float(r["energy_j"]) for r in energies)
            e_est = any(_estimated_source(r["energy_source"]) for r in energies)
            edge_total_j += e_j
            edge_known = True
            edge_estimated |= e_est
        else:
            e_j = Missing("the router accounted no edge-served request to this device"
                          if not served else "the router's records carry no energy")
        cost: Value = e_j / 3.6e6 * price_kwh if isinstance(e_j, float) else e_j
        # energy per token: the device's own measurement first, else the router's estimate
        dev_energy = data.energy.get(dev, [])
        mpt: Value
        mpt_est = False
        if dev_energy:
            mpt = sum(g for g, *_ in dev_energy) / sum(t for _, t, *_ in dev_energy)
            mpt_est = any(est for *_, est, _ in dev_energy)
            mpt_src = "device: " + ", ".join(sorted({s for *_, s in dev_energy}))
        else:
            tokens = sum(int(r["completion_tokens"] or 0) for r in energies)
            if energies and tokens:
                mpt = sum(float(r["energy_j"]) for r in energies) * 1000.0 / tokens
                mpt_est = any(_estimated_source(r["energy_source"]) for r in energies)
                mpt_src = "router: " + ", ".join(sorted({str(r["energy_source"])
                                                           for r in energies}))
            else:
                why = data.energy_missing.get(dev) or ("no energy in results and no "
                                                        "edge-served router records")
                mpt = Missing(why)
                mpt_src = "-"
        state = data.states.get(dev, "unknown")
        reason = data.reasons.get(dev)
        rows.append(FleetDeviceRow(
            device=dev, state=f"{state} ({reason})" if reason and state != "online" else state,
            online_share=_online_share(data.status.get(dev, []), data.t0_ms, data.t1_ms),
            served=len(served), results=len(results),
            ttft_p50_ms=_median(ttfts, no_results), decode_p50_tok_s=_median(tgs, no_results),
            power_mean_w=power, power_estimated=data.power_estimated.get(dev, False),
            temp_max_c=temp, mj_per_token=mpt,
            mj_per_token_estimated=mpt_est, mj_per_token_source=mpt_src,
            edge_energy_j=e_j, edge_energy_estimated=e_est, edge_cost_usd=cost))
    # served means answered: a request that ended in an error (a cloud that was down) counts
    # as not served, wherever it was sent
    cloud = [r for r in data.requests if r["served_by"] == "cloud" and r["status"] == "ok"]
    by_reason: dict[str, int] = {}
    for r in cloud:
        key = str(r["fallback_reason"] or "unknown")
        by_reason[key] = by_reason.get(key, 0) + 1
    costs = [r["cost_usd"] for r in cloud if r["cost_usd"] is not None]
    cloud_cost: Value = (sum(costs) if costs else Missing(
        "no request went to the cloud" if not cloud else "the records carry no cloud cost"))
    return FleetSummary(
        rows=tuple(rows), requests=len(data.requests),
        edge=sum(1 for r in data.requests if r["served_by"] == "edge" and r["status"] == "ok"),
        cloud=len(cloud),
        not_served=sum(1 for r in data.requests if r["status"] != "ok"),
        cloud_by_reason=by_reason,
        cloud_prompt_tokens=sum(int(r["prompt_tokens"] or 0) for r in cloud),
        cloud_completion_tokens=sum(int(r["completion_tokens"] or 0) for r in cloud),
        cloud_cost_usd=cloud_cost,
        edge_cost_usd=(edge_total_j / 3.6e6 * price_kwh if edge_known else Missing(
            "no edge-served request carries energy")),
        edge_energy_estimated=edge_estimated, price_kwh=price_kwh)


SUMMARY_COLUMNS: tuple[tuple[str, str, str], ...] = (
    # (header, FleetDeviceRow attribute, format)
    ("state", "state", "str"),
    ("online", "online_share", "pct"),
    ("served", "served", "int"),
    ("results", "results", "int"),
    ("TTFT p50 ms", "ttft_p50_ms", "f1"),
    ("TGS p50 tok/s", "decode_p50_tok_s", "f1"),
    ("power W", "power_mean_w", "g3"),
    ("temp max °C", "temp_max_c", "f1"),
    ("mJ/token", "mj_per_token", "g3"),
    ("edge energy J", "edge_energy_j", "g3"),
    ("energy cost $", "edge_cost_usd", "g3"),
)


_ESTIMATE_FLAGS = {"power W": "power_estimated", "mJ/token": "mj_per_token_estimated",
                   "edge energy J": "edge_energy_estimated",
                   "energy cost $": "edge_energy_estimated"}


def summary_table(summary: FleetSummary) -> tuple[list[str], list[list[Value | str]]]:
    """The fleet summary as (headers, cells): devices, then cloud, not served and totals."""
    headers = ["device", *(c[0] for c in SUMMARY_COLUMNS)]
    body: list[list[Value | str]] = []
    for row in summary.rows:
        cells: list[Value | str] = [row.device]
        for _, attr, kind in SUMMARY_COLUMNS:
            v = getattr(row, attr)
            cells.append(str(v) if kind in ("str", "int") else v)
        body.append(cells)
    na = Missing("cloud: cost from token prices", "n/a: cloud")
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(summary.cloud_by_reason.items()))
    body.append(["cloud (fallback)", reasons or "-", na, str(summary.cloud), "-", "-", "-", na,
                 na, na, na, summary.cloud_cost_usd])
    body.append(["not served", "-", "-", str(summary.not_served), "-", "-", "-", "-", "-", "-",
                 "-", "-"])
    total_cost: Value = summary.cloud_cost_usd
    if isinstance(summary.edge_cost_usd, float):
        total_cost = summary.edge_cost_usd + (summary.cloud_cost_usd
                                              if isinstance(summary.cloud_cost_usd, float)
                                              else 0.0)
    body.append(["fleet total", f"{summary.requests} requests", "-", str(summary.edge),
                 str(sum(r.results for r in summary.rows)), "-", "-", "-", "-", "-", "-",
                 total_cost])
    return headers, body


def _fmt_cell(v: Value | str, kind: str) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, float) and kind == "g3" and 0 < abs(v) < 1e-3:
        return f"{v:.3g}"
    return fmt_value(v, "g3" if kind in ("str", "int") else kind)


def _kinds() -> list[str]:
    return ["str", *(c[2] for c in SUMMARY_COLUMNS)]


# ---------------------------------------------------------------------------------- figures


def _device_colors(devices: Sequence[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {d: cmap(i % 10) for i, d in enumerate(devices)}


def _title(data: FleetData) -> str:
    return f"fleet {data.fleet}" if data.fleet else "all fleets"


def figure_summary(data: FleetData, summary: FleetSummary) -> FigureOut:
    """The summary table as an image (long reasons as numbered footnotes)."""
    plt = _pyplot()
    headers, body = summary_table(summary)
    kinds = _kinds()
    notes = _Notes()
    est_cols = _ESTIMATE_FLAGS
    cells: list[list[str]] = []
    for i, line in enumerate(body):
        row = summary.rows[i] if i < len(summary.rows) else None
        out = []
        for h, v, kind in zip(headers, line, kinds, strict=True):
            if isinstance(v, Missing):
                out.append(f"— {v.short}" if v.short else f"not measured [{notes.ref(v.why)}]")
                continue
            text = _fmt_cell(v, kind)
            if row is not None and h in est_cols and getattr(row, est_cols[h]):
                text += " (est.)"
            out.append(text)
        cells.append(out)
    est_power = [r.device for r in summary.rows if r.power_estimated]
    est_mpt = [r.device for r in summary.rows if r.mj_per_token_estimated]
    est_edge = [r.device for r in summary.rows if r.edge_energy_estimated]
    foot = [f"served: requests the router accounted to the device; results: results the device "
            f"published; energy cost at {summary.price_kwh:g} USD/kWh; cloud cost from the "
            "router's token prices. (est.) = ESTIMATED: power model or telemetry power × "
            "service time, not a sensor integrated over the request."]
    if est_power:
        foot.append("power ESTIMATED (power model, no power sensor) for: "
                    + ", ".join(est_power))
    if est_mpt:
        foot.append("mJ/token ESTIMATED for: " + ", ".join(est_mpt))
    if est_edge:
        foot.append("edge energy and its cost ESTIMATED for: " + ", ".join(est_edge))
    if notes.items:
        foot.append(notes.text(170))
    foot_text = "\n".join(foot)
    n_foot = foot_text.count("\n") + 1
    row_h, foot_h, title_h = 0.42, 0.16 * n_foot + 0.2, 0.45
    height = title_h + row_h * (len(cells) + 1) + foot_h
    fig = plt.figure(figsize=(15, height))
    ax = fig.add_axes((0.0, foot_h / height, 1.0, row_h * (len(cells) + 1) / height))
    ax.axis("off")
    table = ax.table(cellText=cells, colLabels=headers, cellLoc="center", loc="center",
                     bbox=(0.0, 0.0, 1.0, 1.0))
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    chars = [max(len(t) for t in [headers[c], *(row[c] for row in cells)]) + 3
             for c in range(len(headers))]
    widths = [w / sum(chars) for w in chars]
    for (r, c), cell in table.get_celld().items():
        cell.set_width(widths[c])
        if r == 0:
            cell.set_facecolor("#e8e8e8")
            cell.set_text_props(fontweight="bold")
        elif r > len(summary.rows):
            cell.set_facecolor("#f6f6f6")
        if r > 0 and cell.get_text().get_text().startswith(("—", "not measured")):
            cell.get_text().set_color("dimgrey")
            cell.get_text().set_style("italic")
    fig.text(0.5, 1 - 0.1 / height, f"Fleet summary — {_title(data)}", ha="center", va="top",
             fontsize=11)
    fig.text(0.01, (foot_h - 0.1) / height, foot_text, fontsize=8, va="top")
    return FigureOut("fleet_summary", "Fleet summary",
                     "Per device: state, share of the window online, requests served, median "
                     "TTFT and decode speed, mean power, peak temperature, energy per token, "
                     "edge energy and its cost; then the cloud fallback, requests not served "
                     "and the fleet total. The same values are in the HTML table.", _png(fig))


def figure_latency(data: FleetData) -> FigureOut:
    """Box plots of TTFT and decode tok/s per device over its ok results, points overlaid."""
    plt = _pyplot()
    devices = data.devices or ["(no devices)"]
    colors = _device_colors(devices)
    n = len(devices)
    fig, axes = plt.subplots(1, 2, figsize=(14, 1.6 + 0.55 * n), sharey=True)
    ys = list(range(n))[::-1]
    # matplotlib 3.10 renamed vert=False to orientation="horizontal" (vert warns from 3.11)
    major, minor = (int(p) for p in matplotlib_version().split(".")[:2])
    horizontal: dict[str, Any] = ({"orientation": "horizontal"} if (major, minor) >= (3, 10)
                                  else {"vert": False})
    for ax, (idx, title) in zip(axes, ((2, "TTFT (ms)"), (3, "decode speed (tok/s)")),
                                strict=True):
        for y, dev in zip(ys, devices, strict=True):
            vals = [v for r in data.results.get(dev, [])
                    if r[1] == "ok" and isinstance(v := r[idx], float)]
            if not vals:
                ax.text(0.02, y, "not measured — no successful results stored", va="center",
                        fontsize=8, color="dimgrey", style="italic",
                        transform=ax.get_yaxis_transform())
                continue
            bp = ax.boxplot([vals], positions=[y], widths=0.5, showfliers=False,
                            patch_artist=True, manage_ticks=False,
                            medianprops={"color": "black", "linewidth": 1.5}, **horizontal)
            for box in bp["boxes"]:
                box.set(facecolor=colors[dev], alpha=0.35)
            jitter = [y + 0.15 * ((i * 0.618) % 1.0 - 0.5) for i in range(len(vals))]
            ax.scatter(vals, jitter, s=12, color=colors[dev], zorder=3, edgecolor="black",
                       linewidth=0.3)
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
    axes[0].set_yticks(ys)
    axes[0].set_yticklabels([f"{d}\n({sum(1 for r in data.results.get(d, []) if r[1] == 'ok')}"
                             " ok results)" for d in devices], fontsize=8)
    axes[0].set_ylim(-0.7, n - 0.3)
    fig.suptitle(f"Inference results per device — {_title(data)}", fontsize=11)
    fig.text(0.01, -0.01, "Boxes: quartiles and median over each device's successful results "
             "(whiskers 1.5 IQR); dots: each result. Timings as the device measured them "
             "(DESIGN.md §5).", fontsize=8, va="top")
    fig.tight_layout()
    return FigureOut("fleet_latency", "TTFT and decode speed per device",
                     "Distributions of time to first token and decode tok/s over every "
                     "successful inference result each device published.", _png(fig))


def _unit(data: FleetData) -> tuple[float, str]:
    """Seconds for windows under 10 minutes, minutes under 10 hours, else hours."""
    span_ms = (data.t1_ms or 0) - (data.t0_ms or 0)
    if span_ms < 600_000:
        return 1000.0, "seconds"
    if span_ms < 36_000_000:
        return 60_000.0, "minutes"
    return 3_600_000.0, "hours"


def _minutes(data: FleetData, ts: int) -> float:
    """Time since the window's start in the unit of :func:`_unit`."""
    return (ts - (data.t0_ms or 0)) / _unit(data)[0]


def _t0_label(data: FleetData) -> str:
    unit = _unit(data)[1]
    if data.t0_ms is None:
        return unit
    t0 = dt.datetime.fromtimestamp(data.t0_ms / 1000.0, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    return f"{unit} since {t0} UTC"


def figure_power_temp(data: FleetData) -> FigureOut:
    """Power and hottest temperature over time, one line per device."""
    plt = _pyplot()
    colors = _device_colors(data.devices)
    fig, axes = plt.subplots(2, 1, figsize=(13, 7), sharex=True)
    missing: dict[int, list[str]] = {0: [], 1: []}
    for dev in data.devices:
        tel = data.telemetry.get(dev, [])
        for i, idx, scale in ((0, 1, 1e-3), (1, 2, 1.0)):
            pts = [(_minutes(data, row[0]), float(v) * scale) for row in tel
                   if (v := row[idx]) is not None]
            if not pts:
                missing[i].append(dev)
                continue
            est = i == 0 and data.power_estimated.get(dev, False)
            axes[i].plot([p[0] for p in pts], [p[1] for p in pts], marker=".", markersize=3,
                         linewidth=1, color=colors[dev], linestyle="--" if est else "-",
                         label=f"{dev} (ESTIMATED: power model)" if est else dev)
    for i, (ax, label, what) in enumerate(zip(
            axes, ("power (W)", "hottest sensor (°C)"), ("power", "temperature"), strict=True)):
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8, loc="upper right", ncol=min(4, len(ax.get_lines())))
        if missing[i]:
            ax.text(0.01, 0.97, f"not measured — no {what} in the telemetry of: "
                    + ", ".join(missing[i]), transform=ax.transAxes, fontsize=8,
                    color="dimgrey", style="italic", va="top")
    axes[1].set_xlabel(_t0_label(data))
    fig.suptitle(f"Power and temperature over time — {_title(data)}", fontsize=11)
    fig.text(0.01, -0.01, "Power: board input if measured, else the sum of CPU package, GPU and "
             "DRAM rails, else the power model's estimate (dashed, marked ESTIMATED). "
             "Telemetry as stored by the collector (downsampled), averaged into time buckets.",
             fontsize=8, va="top")
    fig.tight_layout()
    return FigureOut("fleet_power_temp", "Power and temperature over time",
                     "Telemetry power and the hottest temperature sensor of each device over "
                     "the report window (downsampled).", _png(fig))


def figure_energy_per_token(data: FleetData, summary: FleetSummary) -> FigureOut:
    """Energy per generated token per device; estimates hatched, missing values explained."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    rows = list(summary.rows) or []
    colors = _device_colors(data.devices)
    n = max(1, len(rows))
    fig, ax = plt.subplots(figsize=(11, 1.4 + 0.5 * n))
    ys = list(range(n))[::-1]
    vals = [r.mj_per_token for r in rows if isinstance(r.mj_per_token, float)]
    top = max(vals) if vals else 1.0
    any_est = False
    for y, row in zip(ys, rows, strict=False):
        v = row.mj_per_token
        if isinstance(v, Missing):
            ax.text(0.01 * top, y, f"not measured — {v.why}", va="center", fontsize=8,
                    color="dimgrey", style="italic")
            continue
        any_est |= row.mj_per_token_estimated
        ax.barh(y, v, color=colors[row.device], height=0.6,
                hatch="///" if row.mj_per_token_estimated else None,
                edgecolor="black" if row.mj_per_token_estimated else None, linewidth=0.6)
        text = f"{_short_num(v)} mJ  ({row.mj_per_token_source})"
        if row.mj_per_token_estimated:
            text += f"  {_ESTIMATED}"
        ax.text(v + 0.02 * top, y, text, va="center", fontsize=8)
    ax.set_xlim(0, top * 2.2)
    ax.set_yticks(ys)
    ax.set_yticklabels([r.device for r in rows] or ["(no devices)"], fontsize=9)
    ax.set_xlabel("energy per generated token (mJ)")
    ax.grid(True, axis="x", alpha=0.3)
    if any_est:
        ax.legend(handles=[Patch(facecolor="white", edgecolor="black", hatch="///",
                                 label="hatched = ESTIMATED (power model or telemetry power × "
                                       "service time, not a per-request sensor reading)")],
                  fontsize=8, loc="lower right", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(f"Energy per token — {_title(data)}", fontsize=11, loc="left")
    fig.tight_layout()
    return FigureOut("fleet_energy_per_token", "Energy per token",
                     "Gross energy per generated token per device: from the device's own energy "
                     "integrator when its results carry energy, else from the router's estimate "
                     "(telemetry power × service time), which is marked ESTIMATED.", _png(fig))


def figure_requests_cost(data: FleetData, summary: FleetSummary) -> FigureOut:
    """Requests served per device vs the cloud, and edge energy cost vs cloud cost."""
    plt = _pyplot()
    import matplotlib

    colors = _device_colors(data.devices)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 1.8 + 0.45 * (len(summary.rows) + 2)))
    labels = [r.device for r in summary.rows] + ["cloud", "not served"]
    ys = list(range(len(labels)))[::-1]
    for y, row in zip(ys, summary.rows, strict=False):
        ax1.barh(y, row.served, color=colors[row.device], height=0.6)
        ax1.text(row.served, y, f" {row.served}", va="center", fontsize=8)
    left = 0
    cmap = matplotlib.colormaps["Greys"]
    reasons = sorted(summary.cloud_by_reason.items())
    for i, (reason, count) in enumerate(reasons):
        ax1.barh(ys[-2], count, left=left, height=0.6, color=cmap(0.35 + 0.5 * i / max(
            1, len(reasons))), edgecolor="black", linewidth=0.4, label=f"cloud: {reason}")
        left += count
    ax1.text(left, ys[-2], f" {summary.cloud}", va="center", fontsize=8)
    ax1.barh(ys[-1], summary.not_served, color="#b00020", height=0.6)
    ax1.text(summary.not_served, ys[-1], f" {summary.not_served}", va="center", fontsize=8)
    ax1.set_yticks(ys)
    ax1.set_yticklabels(labels, fontsize=9)
    ax1.set_xlabel(f"requests ({summary.requests} accounted by the router)")
    ax1.set_title("Requests served: devices vs cloud fallback", fontsize=10)
    ax1.grid(True, axis="x", alpha=0.3)
    if reasons:
        ax1.legend(fontsize=8, loc="lower right", title="fallback reason", title_fontsize=8)
    # cost: edge energy cost per device, the cloud cost; log scale when they differ a lot
    items: list[tuple[str, Value, bool, Any]] = [
        (r.device, r.edge_cost_usd, r.edge_energy_estimated, colors[r.device])
        for r in summary.rows]
    items.append(("cloud", summary.cloud_cost_usd, False, "grey"))
    known = [v for _, v, _, _ in items if isinstance(v, float) and v > 0]
    log = bool(known) and max(known) / min(known) > 100
    for y, (_, v, est, color) in zip(ys, items, strict=False):
        if not isinstance(v, float):
            why = v.why if isinstance(v, Missing) else "?"
            ax2.text(0.01, y, f"not measured — {why}", va="center", fontsize=8,
                     color="dimgrey", style="italic", transform=ax2.get_yaxis_transform())
            continue
        ax2.barh(y, v, color=color, height=0.6, hatch="///" if est else None,
                 edgecolor="black" if est else None, linewidth=0.6)
        ax2.text(v, y, f" ${v:.3g}" + (f" {_ESTIMATED}" if est else ""), va="center",
                 fontsize=8)
    if log:
        ax2.set_xscale("log")
    if known:
        ax2.set_xlim(min(known) / 3 if log else 0, max(known) * (30 if log else 1.6))
    ax2.set_yticks(ys[:-1])
    ax2.set_yticklabels(labels[:-1], fontsize=9)
    ax2.set_ylim(ys[-1] - 0.5, ys[0] + 0.5)
    ax2.set_xlabel(f"USD (edge: energy × {summary.price_kwh:g} USD/kWh; cloud: token prices)"
                   + (", log scale" if log else ""))
    ax2.set_title("Cost: edge energy vs cloud", fontsize=10)
    ax2.grid(True, axis="x", alpha=0.3)
    fig.suptitle(f"Where requests were served and what they cost — {_title(data)}",
                 fontsize=11)
    fig.tight_layout()
    return FigureOut("fleet_requests_cost", "Requests served and cost",
                     "Requests the router accounted to each device and to the cloud (by "
                     "fallback reason), and the edge energy cost (hatched: estimated energy) "
                     "against the cloud's token cost.", _png(fig))


def figure_timeline(data: FleetData) -> FigureOut:
    """Online/offline intervals per device from the status events."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    devices = data.devices or ["(no devices)"]
    n = len(devices)
    fig, ax = plt.subplots(figsize=(13, 1.4 + 0.45 * n))
    ys = list(range(n))[::-1]
    t1 = data.t1_ms
    lwt_seen = False
    for y, dev in zip(ys, devices, strict=True):
        events = data.status.get(dev, [])
        if not events or t1 is None:
            ax.text(0.01, y, "not measured — no status messages stored", va="center",
                    fontsize=8, color="dimgrey", style="italic",
                    transform=ax.get_yaxis_transform())
            continue
        for i, (ts, state, reason) in enumerate(events):
            end = events[i + 1][0] if i + 1 < len(events) else t1
            if end <= ts and i + 1 < len(events):
                continue
            x0 = _minutes(data, ts)
            width = max(_minutes(data, max(end, ts)) - x0, 0.002)
            color = "#2e7d32" if state == "online" else (
                "#c62828" if reason == "lwt" else "#9e9e9e")
            ax.broken_barh([(x0, width)], (y - 0.3, 0.6), facecolors=color)
            if state != "online" and reason == "lwt":
                lwt_seen = True
                ax.plot([x0], [y], marker="x", color="black", markersize=7)
    ax.set_yticks(ys)
    ax.set_yticklabels(devices, fontsize=9)
    ax.set_xlabel(_t0_label(data))
    ax.grid(True, axis="x", alpha=0.3)
    handles = [Patch(color="#2e7d32", label="online"),
               Patch(color="#9e9e9e", label="offline (shutdown)"),
               Patch(color="#c62828", label="offline (LWT: connection lost)")]
    ax.legend(handles=handles, fontsize=8, loc="lower right", bbox_to_anchor=(1.0, 1.0),
              ncol=3)
    ax.set_title(f"Online/offline timeline — {_title(data)}"
                 + ("  (× = LWT fired)" if lwt_seen else ""), fontsize=11, loc="left")
    fig.tight_layout()
    return FigureOut("fleet_timeline", "Online/offline timeline",
                     "Each device's status over the window, from its status messages and the "
                     "broker's last will (LWT, marked ×).", _png(fig))


def fleet_figures(data: FleetData, summary: FleetSummary) -> list[FigureOut]:
    """Every fleet figure, in :data:`FLEET_FIGURES` order."""
    return [figure_summary(data, summary), figure_latency(data), figure_power_temp(data),
            figure_energy_per_token(data, summary), figure_requests_cost(data, summary),
            figure_timeline(data)]


# ---------------------------------------------------------------------------------- HTML


def summary_html(summary: FleetSummary) -> str:
    """The fleet summary as an HTML table (missing values say why; estimates marked)."""
    headers, body = summary_table(summary)
    kinds = _kinds()
    out = ["<table><tr>" + "".join(
        f'<th class="{"l" if i < 2 else ""}">{html.escape(h)}</th>'
        for i, h in enumerate(headers)) + "</tr>"]
    est_cols = _ESTIMATE_FLAGS
    for i, line in enumerate(body):
        row = summary.rows[i] if i < len(summary.rows) else None
        cells = []
        for h, v, kind in zip(headers, line, kinds, strict=True):
            if isinstance(v, Missing):
                cells.append(f'<td class="nm">{html.escape(fmt_value(v))}</td>')
                continue
            text = html.escape(_fmt_cell(v, kind))
            if row is not None and h in est_cols and getattr(row, est_cols[h]):
                text += ' <span class="est">(estimated)</span>'
            if row is None and h == "energy cost $" and summary.edge_energy_estimated and (
                    line[0] == "fleet total"):
                text += ' <span class="est">(edge part estimated)</span>'
            cls = ' class="l"' if kind == "str" else ""
            cells.append(f"<td{cls}>{text}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    src = "".join(f"<li>{html.escape(r.device)}: {html.escape(r.mj_per_token_source)}</li>"
                  for r in summary.rows if r.mj_per_token_source != "-")
    notes = [f"Energy cost at {summary.price_kwh:g} USD/kWh over the energy the router "
             "accounted to each device; cloud cost from the router's token prices "
             f"({summary.cloud_prompt_tokens} prompt and {summary.cloud_completion_tokens} "
             "completion tokens sent to the cloud).",
             "online: share of the report window between the device's online status and its "
             "offline status or LWT."]
    return ("\n".join(out) + "".join(f"<p><small>{html.escape(n)}</small></p>" for n in notes)
            + (f"<p><small>Energy per token from:</small></p><ul><small>{src}</small></ul>"
               if src else ""))


def fleet_section(data: FleetData, summary: FleetSummary,
                  figures: Sequence[FigureOut]) -> ReportSection:
    """The fleet as a section of the bench report page."""
    return ReportSection(f"Fleet — {_title(data)}", tuple(
        f for f in figures if f.stem != "fleet_summary"), summary_html(summary))


def render_fleet_html(data: FleetData, summary: FleetSummary,
                      figures: Sequence[FigureOut]) -> str:
    """The self-contained fleet page."""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    window = "empty"
    if data.t0_ms is not None and data.t1_ms is not None:
        fmt = "%Y-%m-%d %H:%M:%S"
        window = (dt.datetime.fromtimestamp(data.t0_ms / 1000, dt.UTC).strftime(fmt) + " – "
                  + dt.datetime.fromtimestamp(data.t1_ms / 1000, dt.UTC).strftime(fmt) + " UTC")
    parts = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<title>edgelm fleet report</title>", f"<style>{_CSS}</style></head><body>",
        f"<h1>edgelm fleet report — {html.escape(_title(data))}</h1>",
        f"<p>{len(data.devices)} device(s), {summary.requests} routed request(s); window "
        f"{html.escape(window)}; from the collector's {html.escape(data.kind)} database; "
        f"generated {html.escape(now)} by agentctl report.</p>",
    ]
    if summary.edge_energy_estimated or any(r.mj_per_token_estimated for r in summary.rows):
        parts.append('<p><span class="est">Estimated energy:</span> values marked "estimated" '
                     "come from a power model or from telemetry power × service time, not from "
                     "a sensor integrated over the request.</p>")
    parts.append("<h2>Fleet summary</h2>")
    parts.append(summary_html(summary))
    parts.append("<h2>Figures</h2>")
    parts.extend(_html_figure(f) for f in figures if f.stem != "fleet_summary")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def render_fleet_report(store: FleetStore, out_dir: str | Path, formats: Sequence[str],
                        *, fleet: str | None = None, since_ms: int | None = None,
                        price_kwh: float = 0.25) -> tuple[list[Path], FleetSummary]:
    """Render the fleet figures (PNG) and page (``report.html``) into ``out_dir``.

    Returns:
        The files written, and the summary they show.

    Raises:
        ReportError: The database holds nothing for this fleet/window, or no matplotlib.
    """
    data = load_fleet(store, fleet, since_ms)
    if not data.devices and not data.requests:
        raise ReportError(f"the database holds no devices or routed requests"
                          f"{' for fleet ' + fleet if fleet else ''}"
                          f"{' in the window' if since_ms is not None else ''}")
    summary = summarise(data, price_kwh)
    figures = fleet_figures(data, summary)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if "png" in formats:
        for fig in figures:
            path = out / f"{fig.stem}.png"
            path.write_bytes(fig.png)
            written.append(path)
    if "html" in formats:
        path = out / "report.html"
        path.write_text(render_fleet_html(data, summary, figures), encoding="utf-8")
        written.append(path)
    return written, summary


def fleet_report_section(store: FleetStore, *, fleet: str | None = None,
                         since_ms: int | None = None, price_kwh: float = 0.25
                         ) -> tuple[ReportSection, FleetSummary]:
    """The fleet as a section of the bench report (when records and ``--db`` are both given)."""
    data = load_fleet(store, fleet, since_ms)
    summary = summarise(data, price_kwh)
    figs = fleet_figures(data, summary)
    return fleet_section(data, summary, figs), summary

