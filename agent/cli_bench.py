"""``agentctl bench`` and ``agentctl bench compare``: the paper's methodology on this device."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

import click

from agent.cli import EXIT_CONFIG, _fail, _fmt, _threads
from backends.base import BackendError

_BENCH_OPTIONS = [
    click.option("--max-tokens", type=click.IntRange(min=1), default=64, show_default=True),
    click.option("--ignore-eos", is_flag=True, help="Generate exactly --max-tokens tokens."),
    click.option("--runs", type=click.IntRange(min=1), default=3, show_default=True),
    click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True,
                 help="Unmeasured runs first; the first is reported as the cold request."),
    click.option("--threads", default="auto", show_default=True,
                 help="Positive count or 'auto' (min of physical cores, cgroup quota, affinity)."),
    click.option("--ctx", "context_tokens", type=click.IntRange(min=16), default=2048,
                 show_default=True, help="Context window to allocate (tokens)."),
    click.option("--prompt", default=None, help="User message (default: the standard prompt)."),
    click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False),
                 default=None, help="Chat prompts file: JSON lines of {messages: [...]} or "
                 "{prompt: ...}, or plain text lines; used round-robin."),
    click.option("--prompt-tokens", type=click.IntRange(min=1), default=None,
                 help="Exact-length synthetic prompt (seeded random tokens, like llama-bench)."),
    click.option("--quality", type=click.Choice(["gsm8k"]), default=None,
                 help="Measure Q: GSM8K Pass@1 (100 length-stratified questions by default)."),
    click.option("--limit", "quality_limit", type=click.IntRange(min=1), default=None,
                 help="Score only the first N quality items."),
    click.option("--full", "quality_full", is_flag=True, help="All 1,319 GSM8K test items."),
    click.option("--quality-max-tokens", type=click.IntRange(min=1), default=256,
                 show_default=True),
    click.option("--alpha", type=click.FloatRange(0, 1), default=0.5, show_default=True,
                 help="U = alpha*Q + (1-alpha)*R."),
    click.option("--ttft-ref-ms", type=click.FloatRange(min=1), default=500.0,
                 show_default=True, help="R = min(1, ttft_ref / TTFT)."),
    click.option("--price-kwh", type=click.FloatRange(min=0), default=0.25, show_default=True,
                 help="Electricity price per kWh (edge CPR)."),
    click.option("--cooldown-c", type=float, default=None,
                 help="Before each run, wait until the hottest sensor is below this (°C)."),
    click.option("--probe-root", default="/", show_default=True,
                 help="Filesystem root for the probes."),
    click.option("--power-idle-mw", type=click.FloatRange(min=0), default=None,
                 help="Enable the labelled power estimate: board power at idle (mW)."),
    click.option("--power-max-mw", type=click.FloatRange(min=0), default=None,
                 help="… and with all CPUs busy (mW)."),
    click.option("--backend-opt", "backend_opts", multiple=True, metavar="KEY=VALUE",
                 help="Engine option (repeatable), e.g. base_url=http://127.0.0.1:8080/v1, "
                 "prompt_price_per_mtok=0.15, model_format=onnx-optimum (onnxruntime: the "
                 "prepared optimum export instead of the genai folder); values are parsed as "
                 "JSON when they can be."),
    click.option("--baseline-s", type=click.FloatRange(min=0), default=2.0, show_default=True,
                 help="Idle seconds measured first for net energy (0: none)."),
]


def _with_options(fn: Any) -> Any:
    for opt in reversed(_BENCH_OPTIONS):
        fn = opt(fn)
    return fn


def _load_prompts(path: str) -> tuple[tuple[dict[str, str], ...], ...]:
    convs: list[tuple[dict[str, str], ...]] = []
    for n, line in enumerate(Path(path).read_text("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            obj = line
        if isinstance(obj, str):
            convs.append(({"role": "user", "content": obj},))
        elif isinstance(obj, dict) and isinstance(obj.get("messages"), list):
            convs.append(tuple({"role": str(m["role"]), "content": str(m["content"])}
                               for m in obj["messages"]))
        elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
            convs.append(({"role": "user", "content": obj["prompt"]},))
        else:
            _fail(f"--prompts {path}:{n}: expected text, {{messages: [...]}} or {{prompt: ...}}",
                  EXIT_CONFIG)
    if not convs:
        _fail(f"--prompts {path}: no prompts", EXIT_CONFIG)
    return tuple(convs)


def _backend_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            _fail(f"--backend-opt {pair!r}: expected KEY=VALUE", EXIT_CONFIG)
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def build_config(backend: str, model: str, kw: dict[str, Any]) -> Any:
    """A BenchConfig from CLI options."""
    from agent.bench import DEFAULT_MESSAGES, BenchConfig
    from agent.errors import ModelError
    from agent.model_cache import resolve_for_backend

    backend_options = _backend_options(kw.get("backend_opts") or ())
    try:
        # the build this backend loads (GGUF, ONNX folder, .tflite), so the record's hash,
        # format and size describe what actually ran; --backend-opt model_format=onnx-optimum
        # picks a prepared format other than the backend's default
        fmt = backend_options.get("model_format")
        resolved = resolve_for_backend(model, backend, fmt=None if fmt is None else str(fmt))
    except ModelError as exc:
        _fail(str(exc), EXIT_CONFIG)
    n_threads, how = _threads(kw["threads"])
    messages: tuple[tuple[dict[str, str], ...], ...] = (DEFAULT_MESSAGES,)
    if kw.get("prompts_file"):
        messages = _load_prompts(kw["prompts_file"])
    elif kw.get("prompt") is not None:
        messages = (({"role": "user", "content": kw["prompt"]},),)
    probe_options: dict[str, dict[str, Any]] = {}
    idle, peak = kw.get("power_idle_mw"), kw.get("power_max_mw")
    if (idle is None) != (peak is None):
        _fail("--power-idle-mw and --power-max-mw go together", EXIT_CONFIG)
    if idle is not None and peak is not None:
        if peak <= idle:
            _fail("--power-max-mw must exceed --power-idle-mw", EXIT_CONFIG)
        probe_options["estimate"] = {"idle_mw": idle, "max_mw": peak}
    return BenchConfig(
        backend=backend, model=resolved, threads=n_threads, threads_how=how,
        max_tokens=kw["max_tokens"], ignore_eos=kw["ignore_eos"], runs=kw["runs"],
        warmup=kw["warmup"], messages=messages, prompt_tokens=kw.get("prompt_tokens"),
        context_tokens=kw["context_tokens"], quality=kw.get("quality"),
        quality_limit=kw.get("quality_limit"), quality_full=kw.get("quality_full", False),
        quality_max_tokens=kw["quality_max_tokens"], alpha=kw["alpha"],
        ttft_ref_ms=kw["ttft_ref_ms"], price_per_kwh=kw["price_kwh"],
        cooldown_c=kw.get("cooldown_c"), probe_root=kw["probe_root"],
        probe_options=probe_options, baseline_s=kw["baseline_s"],
        backend_options=backend_options,
    )


def _progress(enabled: bool) -> Any:
    def show(phase: str, done: int, total: int) -> None:
        if not enabled:
            return
        width = 24
        filled = int(width * done / total) if total else width
        click.echo(f"\r{phase:<8} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} ",
                   err=True, nl=False)
        if done == total:
            click.echo("\r" + " " * 50 + "\r", err=True, nl=False)
    return show


def render_bench_table(record: dict[str, Any]) -> str:
    """A readable terminal table of a bench record."""
    m = record["model"]
    cfg = record["config"]
    prompt = (f"{cfg['prompt_tokens']} synthetic tok" if cfg.get("prompt_tokens")
              else f"{record['n_prompt']} tok")
    prepared = (f", prepared as {m['prepared_as']}"
                if m.get("prepared_as") not in (None, m["format"]) else "")
    cold = record.get("cold")
    cold_text = (f"cold TTFT {_fmt(cold.get('ttft_ms'))} ms" if cold
                 else "cold TTFT not separate (--warmup 0: the first measured run was the cold "
                      "one and is in the statistics)")
    lines = [
        f"model    {m['name']}  ({m['format']}"
        f"{prepared}"
        f", {m.get('quantization') or '?'}, "
        f"{m['size_bytes'] / 1e6:.1f} MB, sha256 {(m['sha256'] or '?')[:12]}…)",
        f"backend  {record['backend']} {record['provenance'].get('engine_version') or ''}  "
        f"threads {cfg['n_threads']} ({record['provenance']['threads_how']})  "
        f"prompt {prompt}  max_tokens {cfg['max_tokens']}"
        f"{'  ignore_eos' if cfg['ignore_eos'] else ''}",
        f"runs     {cfg['runs']} measured ({record['valid_runs']} valid), {cfg['warmup']} "
        f"warm-up; model load {_fmt(record.get('load_ms'), 0)} ms; " + cold_text,
        "",
    ]
    rows = [
        ("TTFT", "ttft_ms", "ms"),
        ("prefill", "prefill_tok_s", "tok/s"),
        ("decode", "decode_tok_s", "tok/s"),
        ("ITL", "itl_ms", "ms"),
        ("e2e latency", "e2e_ms", "ms"),
        ("completion tokens", "completion_tokens", "tok"),
        ("worker CPU", "cpu_pct", "%"),
        ("power", "power_mw", "mW"),
        ("energy", "energy_mj", "mJ"),
        ("energy / token", "mj_per_token", "mJ"),
    ]
    header = f"{'metric':<18} {'unit':<6} {'mean':>9} {'p50':>9} {'p90':>9} {'min':>9} {'max':>9}"
    lines += [header, "-" * len(header)]
    for label, key, unit in rows:
        s = record["summary"].get(key)
        if s is None:
            lines.append(f"{label:<18} {unit:<6} {'—':>9}")
            continue
        digits = 0 if key == "completion_tokens" else 1
        lines.append(
            f"{label:<18} {unit:<6} "
            + " ".join(f"{_fmt(s[k], digits):>9}" for k in ("mean", "p50", "p90", "min", "max"))
        )
    rss = record.get("peak_rss_bytes")
    lines.append(f"{'peak RSS':<18} {'MB':<6} {_fmt(rss / 1e6 if rss else None):>9}")
    first_energy = ((record["runs"][0].get("energy") or {}).get("total") or {})
    if first_energy.get("gross_mj") is None:
        lines.append(f"energy: not measured — {first_energy.get('reason') or 'no power source'}")
    elif first_energy.get("estimated"):
        lines.append(f"energy: ESTIMATED from {', '.join(first_energy.get('sources') or [])}")
    else:
        lines.append(f"energy: measured by {', '.join(first_energy.get('sources') or [])}, "
                     f"coverage {_fmt(first_energy.get('coverage'), 2)}")
    q = record.get("quality")
    if q:
        lines.append(f"quality  GSM8K pass@1 {q['correct']}/{q['n']} = "
                     f"{_fmt(q['pass_at_1'], 3)}  ({q['selection']})")
    p = record.get("paper") or {}
    lines.append(
        f"paper    Q {_fmt(p.get('q'), 3)}  R {_fmt(p.get('r'), 3)}  U {_fmt(p.get('u'), 3)} "
        f"(α={p.get('alpha')})  CPR {_fmt(p.get('cpr_cents'), 6)} ¢ "
        f"@ {p.get('price_per_kwh')}/kWh  PCR {_fmt(p.get('pcr'), 1)}"
    )
    for reason in p.get("reasons") or []:
        lines.append(f"         note: {reason}")
    invalid = [r for r in record["runs"] if not r.get("valid", True)]
    for r in invalid:
        lines.append(f"INVALID run: {r.get('invalid_reason')}")
    return "\n".join(lines)


CSV_FIELDS = ["backend", "model", "run", "valid", "prompt_tokens", "completion_tokens",
              "ttft_ms", "prefill_tok_s", "decode_tok_s", "itl_ms", "tpot_ms", "e2e_ms",
              "cpu_pct", "power_mw", "energy_mj", "energy_net_mj", "mj_per_token",
              "finish_reason"]


def _flat_runs(record: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"backend": record["backend"], "model": record["model"]["name"], "run": i,
             **{k: r.get(k) for k in CSV_FIELDS if k not in ("backend", "model", "run")}}
            for i, r in enumerate(record["runs"])]


def emit(record: dict[str, Any], fmt: str) -> str:
    """Render a record as ``json``, ``jsonl`` (one line per run), ``csv`` or ``table``."""
    if fmt == "json":
        return json.dumps(record)
    if fmt == "jsonl":
        return "\n".join(json.dumps({"schema": "edgelm.bench.run/1", **row})
                         for row in _flat_runs(record))
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(_flat_runs(record))
        return buf.getvalue().rstrip("\n")
    return render_bench_table(record)


@click.group(invoke_without_command=True)
@click.option("--backend", default="llamacpp", show_default=True, help="Inference backend.")
@click.option("--model", default="smollm2-135m", show_default=True, help="Model name or path.")
@_with_options
@click.option("--json", "fmt", flag_value="json", help="One JSON object (edgelm.bench/1).")
@click.option("--jsonl", "fmt", flag_value="jsonl", help="One JSON line per run.")
@click.option("--csv", "fmt", flag_value="csv", help="CSV, one row per run.")
@click.option("--out", "out_file", type=click.Path(dir_okay=False), default=None,
              help="Also write the full JSON record to this file (for `agentctl report`).")
@click.pass_context
def bench(ctx: click.Context, /, backend: str, model: str, fmt: str | None,
          out_file: str | None, **kw: Any) -> None:
    """Benchmark a backend on a model (TTFT, speed, energy, quality, U/CPR/PCR).

    Measures TTFT, prefill/decode speed, ITL, latency, RSS, CPU, energy, GSM8K quality and
    the paper's U / CPR / PCR.
    """
    if ctx.invoked_subcommand is not None:
        ctx.obj = {"backend": backend, "model": model, "kw": kw, "out": out_file}
        return
    from agent.bench import run_bench

    config = build_config(backend, model, kw)
    try:
        record = run_bench(config, progress=_progress(fmt is None and sys.stderr.isatty()))
    except BackendError as exc:
        _fail(f"{exc.code}: {exc.message}")
    except ValueError as exc:
        _fail(str(exc), EXIT_CONFIG)
    if out_file:
        Path(out_file).write_text(json.dumps(record) + "\n")
    click.echo(emit(record, fmt or "table"))


def _parse_target(spec: str) -> tuple[str, str]:
    backend, sep, model = spec.partition(":")
    if not sep or not backend or not model:
        _fail(f"--config {spec!r}: expected BACKEND:MODEL (e.g. llamacpp:smollm2-135m)",
              EXIT_CONFIG)
    return backend, model


def render_table_one(rows: list[dict[str, Any]]) -> str:
    """The paper's Table I: quality, responsiveness, utility, speed, energy, cost, PCR."""
    head = (f"{'configuration':<28}{'Q':>7}{'R':>7}{'U':>7}{'TTFT ms':>10}{'TGS tok/s':>11}"
            f"{'E/resp J':>10}{'CPR ¢':>12}{'PCR':>10}")
    out = [head, "-" * len(head)]
    estimated = False
    for r in rows:
        e = r.get("energy_per_response_mj")
        mark = "*" if r.get("energy_estimated") and e is not None else ""
        estimated = estimated or bool(mark)
        out.append(
            f"{r['label']:<28}{_fmt(r.get('q'), 3):>7}{_fmt(r.get('r'), 3):>7}"
            f"{_fmt(r.get('u'), 3):>7}{_fmt(r.get('ttft_ms')):>10}{_fmt(r.get('tgs')):>11}"
            f"{_fmt(e / 1000 if e is not None else None, 2) + mark:>10}"
            f"{_fmt(r.get('cpr_cents'), 6):>12}{_fmt(r.get('pcr'), 1):>10}"
        )
    if estimated:
        out.append("* energy ESTIMATED from the configured power model (no power sensor); "
                   "CPR and PCR inherit that")
    return "\n".join(out)


@bench.command("compare")
@click.option("--config", "targets", multiple=True, required=True,
              help="BACKEND:MODEL to include (repeatable), e.g. llamacpp:smollm2-135m.")
@click.option("--json", "as_json", is_flag=True, help="Print an edgelm.bench.compare/1 object.")
@click.pass_context
def bench_compare(ctx: click.Context, targets: tuple[str, ...], as_json: bool) -> None:
    """Run several configurations in one go and print the paper's Table I."""
    from agent.bench import run_bench

    base = ctx.obj
    records: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for spec in targets:
        backend, model = _parse_target(spec)
        config = build_config(backend, model, base["kw"])
        if not as_json:
            click.echo(f"… {spec}", err=True)
        try:
            record = run_bench(config, progress=_progress(not as_json and sys.stderr.isatty()))
        except BackendError as exc:
            rows.append({"label": spec, "error": f"{exc.code}: {exc.message}"})
            continue
        records.append(record)
        p = record["paper"]
        rows.append({"label": spec, "backend": backend, "model": record["model"]["name"],
                     "q": p["q"], "r": p["r"], "u": p["u"], "ttft_ms": p["ttft_ms"],
                     "tgs": (record["summary"].get("decode_tok_s") or {}).get("mean"),
                     "energy_per_response_mj": p["energy_per_response_mj"],
                     "energy_estimated": p.get("energy_estimated", False),
                     "cpr_basis": p.get("cpr_basis"), "cpr_cents": p["cpr_cents"],
                     "pcr": p["pcr"], "reasons": p["reasons"]})
    cloud = [r for r in rows if r.get("cpr_basis") == "cloud_tokens" and r.get("cpr_cents")]
    for r in rows:
        if r.get("cpr_basis") == "edge_energy" and r.get("cpr_cents") and cloud:
            r["edge_vs_cloud_cost"] = r["cpr_cents"] / cloud[0]["cpr_cents"]
    result = {"schema": "edgelm.bench.compare/1", "rows": rows, "records": records}
    if base.get("out"):
        Path(base["out"]).write_text(json.dumps(result) + "\n")
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(render_table_one([r for r in rows if "error" not in r]))
    for r in rows:
        if r.get("edge_vs_cloud_cost") is not None:
            click.echo(f"{r['label']}: edge CPR is {r['edge_vs_cloud_cost']:.3g}× the cloud's")
        if "error" in r:
            click.echo(f"{r['label']}: FAILED {r['error']}")
        for reason in r.get("reasons") or []:
            click.echo(f"{r['label']}: note: {reason}")
