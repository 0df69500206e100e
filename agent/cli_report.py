"""``agentctl report``: figures and the paper's Table I from bench records."""

from __future__ import annotations

import click


@click.command("report")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for the PNG files and report.html (created).")
@click.option("--format", "formats", default="png,html", show_default=True,
              help="Comma-separated: png (one file per figure), html (self-contained page).")
def report(inputs: tuple[str, ...], out_dir: str, formats: str) -> None:
    """Render figures and tables from bench records.

    INPUTS are `bench --out` records, `bench compare --out` files, JSON lines of records, or
    directories holding them. Writes accuracy vs model size, speed/TTFT/power/energy per
    device and backend, latency distributions, the paper's Table I (Q, R, U, TTFT, TGS,
    energy per response, CPR, PCR) and report.html.
    """
    from agent.cli import EXIT_CONFIG, _fail  # here, not at import: agent.cli imports this
    from agent.report import ReportError, load_inputs, parse_formats, render_report

    try:
        fmts = parse_formats(formats)
    except ValueError as exc:
        _fail(f"--format: {exc}", EXIT_CONFIG)
    try:
        loaded = load_inputs(inputs)
        if not loaded.records:
            why = "; ".join(loaded.skipped[:5])
            _fail(f"no edgelm.bench/1 records found{': ' + why if why else ''}", EXIT_CONFIG)
        written = render_report(loaded.records, out_dir, fmts, failures=loaded.failures,
                                skipped=loaded.skipped)
    except ReportError as exc:
        _fail(str(exc), EXIT_CONFIG)
    for note in loaded.skipped:
        click.echo(f"skipped: {note}", err=True)
    click.echo(f"{len(loaded.records)} record(s) → {len(written)} file(s):")
    for path in written:
        click.echo(f"  {path}")
