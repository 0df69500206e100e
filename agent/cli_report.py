"""``agentctl report``: figures and the paper's Table I from bench records, fleet figures."""

from __future__ import annotations

import time
from pathlib import Path

import click


@click.command("report")
@click.argument("inputs", nargs=-1, type=click.Path(exists=True))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for the PNG files and report.html (created).")
@click.option("--format", "formats", default="png,html", show_default=True,
              help="Comma-separated: png (one file per figure), html (self-contained page).")
@click.option("--db", default=None,
              help="The collector's database (sqlite:///path or postgresql://…): render the "
                   "fleet figures and summary table (needs the 'fleet' extra for PostgreSQL).")
@click.option("--fleet", default=None, help="With --db: only this fleet.")
@click.option("--since-hours", type=click.FloatRange(min=0, min_open=True), default=None,
              help="With --db: only the last N hours (default: everything stored).")
@click.option("--price-kwh", type=click.FloatRange(min=0), default=0.25, show_default=True,
              help="With --db: electricity price for the edge energy cost, USD/kWh.")
def report(inputs: tuple[str, ...], out_dir: str, formats: str, db: str | None,
           fleet: str | None, since_hours: float | None, price_kwh: float) -> None:
    """Render figures and tables from bench records and/or a fleet database.

    INPUTS are `bench --out` records, `bench compare --out` files, JSON lines of records, or
    directories holding them. Writes accuracy vs model size, speed/TTFT/power/energy per
    device and backend, latency distributions, the paper's Table I (Q, R, U, TTFT, TGS,
    energy per response, CPR, PCR) and report.html.

    With --db (and no INPUTS), the fleet report instead: per device TTFT and decode tok/s
    distributions, power and temperature over time, energy per token, requests served vs
    cloud fallback, edge energy cost vs cloud cost, the online/offline timeline and a fleet
    summary table. With both, the fleet is a section of the bench report.
    """
    from agent.cli import EXIT_CONFIG, _fail  # here, not at import: agent.cli imports this
    from agent.errors import ConfigError
    from agent.report import (
        ReportError,
        ReportSection,
        load_inputs,
        parse_formats,
        render_report,
    )

    if not inputs and not db:
        _fail("give bench records (INPUTS) and/or --db with the collector's database", 2)
    if not db and (fleet or since_hours is not None):
        _fail("--fleet and --since-hours need --db", 2)
    try:
        fmts = parse_formats(formats)
    except ValueError as exc:
        _fail(f"--format: {exc}", EXIT_CONFIG)
    since_ms = (int((time.time() - since_hours * 3600) * 1000) if since_hours is not None
                else None)
    sections: list[ReportSection] = []
    written: list[Path] = []
    if db:
        from agent.fleet.store import FleetStore
        from agent.report_fleet import fleet_report_section, render_fleet_report

        try:
            store = FleetStore(db, create=False)
        except (ConfigError, OSError) as exc:
            _fail(str(exc), EXIT_CONFIG)
        try:
            if not inputs:
                written, summary = render_fleet_report(store, out_dir, fmts, fleet=fleet,
                                                       since_ms=since_ms, price_kwh=price_kwh)
            else:
                section, summary = fleet_report_section(store, fleet=fleet, since_ms=since_ms,
                                                        price_kwh=price_kwh)
                sections.append(section)
        except ReportError as exc:
            _fail(str(exc), EXIT_CONFIG)
        finally:
            store.close()
        click.echo(f"fleet: {len(summary.rows)} device(s), {summary.requests} routed "
                   f"request(s) ({summary.edge} edge, {summary.cloud} cloud, "
                   f"{summary.not_served} not served)")
    if inputs:
        try:
            loaded = load_inputs(inputs)
            if not loaded.records:
                why = "; ".join(loaded.skipped[:5])
                _fail(f"no edgelm.bench/1 records found{': ' + why if why else ''}",
                      EXIT_CONFIG)
            written = render_report(loaded.records, out_dir, fmts, failures=loaded.failures,
                                    skipped=loaded.skipped, sections=sections)
        except ReportError as exc:
            _fail(str(exc), EXIT_CONFIG)
        for note in loaded.skipped:
            click.echo(f"skipped: {note}", err=True)
        click.echo(f"{len(loaded.records)} record(s) → {len(written)} file(s):")
    else:
        click.echo(f"{len(written)} file(s):")
    for path in written:
        click.echo(f"  {path}")
