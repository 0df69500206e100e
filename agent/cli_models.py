"""``agentctl models``: list known models and prepare their ONNX / TFLite / GGUF builds.

Registered on the main group by ``agent.cli``. Exit codes follow ``agent.cli``: 78
(EX_CONFIG) for an unknown model or format and for missing tooling, 1 for a failed
conversion.
"""

from __future__ import annotations

import json
import sys
from typing import NoReturn

import click

from agent.errors import ModelError

EXIT_CONFIG = 78


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"agentctl: error: {message}", err=True)
    sys.exit(code)


@click.group("models")
def models_group() -> None:
    """List known models and prepare their formats in the model cache ($EDGELM_HOME)."""


@models_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array.")
def models_list(as_json: bool) -> None:
    """Show every known model and format: prepared or not, where, and how to prepare it."""
    from agent.model_cache import list_models, models_home, search_homes

    rows = list_models()
    if as_json:
        click.echo(json.dumps({"home": str(models_home()), "models": rows}))
        return
    click.echo(f"new builds go to: {models_home()}; searched: "
               f"{', '.join(str(h) for h in search_homes())}")
    for row in rows:
        state = "prepared" if row["prepared"] else "missing"
        where = row["path"] or f"run: {row['prepare']}"
        click.echo(
            f"{row['model']:<14} {row['format']:<12} {state:<9} "
            f"{','.join(row['backends']):<12} {row['quantization'] or '?':<46} {where}"
        )


@models_group.command("prepare")
@click.argument("name")
@click.option("--format", "formats", multiple=True, required=True,
              type=click.Choice(["gguf", "onnx", "onnx-optimum", "tflite"]),
              help="Format to build (repeatable): onnx is the onnxruntime-genai int4 folder, "
              "onnx-optimum a plain fp32 model.onnx with past-KV (optimum export).")
@click.option("--force", is_flag=True, help="Rebuild even when a matching build is cached.")
def models_prepare(name: str, formats: tuple[str, ...], force: bool) -> None:
    """Build NAME in each --format from its bundled GGUF, with a manifest.json.

    Conversion runs in the separate tooling environment (./install.sh --tools), never in
    the agent's own.
    """
    from agent.model_cache import prepare
    from agent.models import KNOWN_MODELS

    if name not in KNOWN_MODELS:
        _fail(f"unknown model {name!r} (known: {', '.join(sorted(KNOWN_MODELS))})", EXIT_CONFIG)

    def log(line: str) -> None:
        click.echo(line, err=True)

    for fmt in formats:
        try:
            prepared = prepare(name, fmt, force=force, log=log)
        except ModelError as exc:
            code = EXIT_CONFIG if "tooling environment" in str(exc) else 1
            _fail(str(exc), code)
        m = prepared.manifest
        click.echo(
            f"{name} {fmt}: {prepared.entry} ({m.get('quantization')}, "
            f"{int(m.get('size_bytes', 0)) / 1e6:.1f} MB, sha256 {str(m.get('sha256'))[:12]}…)"
        )
