"""The model cache: formats prepared from a known model's GGUF, each with a manifest.

Layout (``$EDGELM_HOME``; default ``/var/lib/edgelm/models``, or ``~/.cache/edgelm/models``
when that is not writable)::

    <home>/<model>/hf-<key>/                  dequantised fp32 HF folder (intermediate)
    <home>/<model>/gguf-<key>/model.gguf      the bundled GGUF, copied (hard-linked if possible)
    <home>/<model>/onnx-<key>/                onnxruntime-genai int4 folder + tokenizer.json
    <home>/<model>/onnx-optimum-<key>/model.onnx  optimum fp32 export with past-KV (weights in
                                              model.onnx.data) + tokenizer.json
    <home>/<model>/tflite-<key>/model.tflite  LiteRT prefill/decode model + tokenizer.json
    <home>/<model>/<format>-<key>/manifest.json

``key`` hashes the source GGUF's sha256, the format's conversion parameters, the pinned
tool requirements (``agent/data/tools-requirements*.txt``) and the converter scripts, so a new
source, new tool pins or a changed converter produce a new folder and old ones are never
trusted by mistake. The manifest records the tool versions actually used.

Conversion runs in a tooling interpreter as a subprocess, so torch, transformers,
onnxruntime-genai's builder, optimum and litert-torch never enter the agent's environment:

- ``.venv-tools`` (or ``$EDGELM_TOOLS_PYTHON``): transformers 5, for the GGUF → HF step and
  the ``onnx`` / ``tflite`` formats (``model_convert.py``);
- ``.venv-tools-optimum`` (or ``$EDGELM_TOOLS_OPTIMUM_PYTHON``): optimum-onnx 0.1, which pins
  transformers < 4.58, for ``onnx-optimum`` (``model_convert_optimum.py``), exported from the
  same HF folder. Both are made by ``./install.sh --tools``.

A backend loads its default format (``BACKEND_FORMAT``); ``onnxruntime`` also loads
``onnx-optimum`` when asked (``bench --backend-opt model_format=onnx-optimum``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import ModelError
from agent.models import KNOWN_MODELS, KnownModel, ResolvedModel, resolve_model
from backends.base import sha256_file

logger = logging.getLogger(__name__)

MANIFEST_SCHEMA = "edgelm.model-manifest/1"
DEFAULT_HOME = Path("/var/lib/edgelm/models")
FALLBACK_HOME = Path("~/.cache/edgelm/models")

_HERE = Path(__file__).resolve().parent
CONVERTER = _HERE / "model_convert.py"
TOOLS_REQUIREMENTS = _HERE / "data" / "tools-requirements.txt"
CONVERTER_OPTIMUM = _HERE / "model_convert_optimum.py"
TOOLS_REQUIREMENTS_OPTIMUM = _HERE / "data" / "tools-requirements-optimum.txt"

# What each prepared format is, how it is made, and which backends load it. ``tools`` names the
# tooling environment that makes it (``tools_python``); every non-GGUF format starts from the
# HF folder that ``.venv-tools`` dequantises from the GGUF.
PREPARED_FORMATS: dict[str, dict[str, Any]] = {
    "gguf": {"model_format": "gguf", "entry": "model.gguf", "params": {}},
    "onnx": {"model_format": "onnx-genai", "entry": ".", "params": {"precision": "int4"},
             "quantization": "int4 (MatMulNBits, onnxruntime-genai builder)"},
    "tflite": {"model_format": "tflite", "entry": "model.tflite",
               "params": {"kv": 1024, "prefill": "64,256", "quantize": "dynamic_int8"},
               "quantization": "dynamic_int8 (litert-torch)"},
    "onnx-optimum": {"model_format": "onnx", "entry": "model.onnx", "tools": "optimum",
                     "params": {"task": "text-generation-with-past", "opset": 18},
                     "quantization": "none (fp32, optimum export with past-KV)"},
}
# The format each backend loads by default, and every format it can load when asked.
BACKEND_FORMAT = {"llamacpp": "gguf", "onnxruntime": "onnx", "tflite": "tflite"}
BACKEND_FORMATS: dict[str, tuple[str, ...]] = {
    "llamacpp": ("gguf",), "onnxruntime": ("onnx", "onnx-optimum"), "tflite": ("tflite",),
}


def models_home() -> Path:
    """Where new builds go: ``$EDGELM_HOME``, else the system path, else per-user.

    The system path when this user could write it (it, or its closest existing parent).
    Creates nothing: a listing must not leave an empty system folder behind (prepare creates
    the folder it writes into).
    """
    env = os.environ.get("EDGELM_HOME")
    if env:
        return Path(env).expanduser()
    probe = DEFAULT_HOME
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.is_dir() and os.access(probe, os.W_OK | os.X_OK):
        return DEFAULT_HOME
    return FALLBACK_HOME.expanduser()


def search_homes() -> list[Path]:
    """Where prepared builds are looked up, in order.

    ``$EDGELM_HOME`` alone when set, else the system cache then the per-user one (a build
    prepared as a user is found by the same user's bench).
    """
    env = os.environ.get("EDGELM_HOME")
    if env:
        return [Path(env).expanduser()]
    return [DEFAULT_HOME, FALLBACK_HOME.expanduser()]


def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def _key_inputs(fmt: str) -> tuple[list[Path], list[Path]]:
    """The (requirements files, converter scripts) a format's build depends on."""
    if fmt == "gguf":
        return [], []
    if PREPARED_FORMATS[fmt].get("tools") == "optimum":
        # exported from the HF folder made in .venv-tools, so both environments count
        return [TOOLS_REQUIREMENTS, TOOLS_REQUIREMENTS_OPTIMUM], [CONVERTER, CONVERTER_OPTIMUM]
    return [TOOLS_REQUIREMENTS], [CONVERTER]


def conversion_key(source_sha256: str, fmt: str) -> str:
    """16 hex digits naming one (source, format parameters, tool pins, converter) build."""
    spec = PREPARED_FORMATS[fmt]
    requirements, converters = _key_inputs(fmt)
    material = json.dumps({
        "source": source_sha256,
        "format": fmt,
        "params": spec["params"],
        "tools": "+".join(_file_sha(p) for p in requirements),
        "converter": "+".join(_file_sha(p) for p in converters),
    }, sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()[:16]


_TOOL_ENVS = {
    # which: (environment variable, venv folder, what it holds)
    "main": ("EDGELM_TOOLS_PYTHON", ".venv-tools",
             "torch, transformers 5, onnxruntime-genai, litert-torch"),
    "optimum": ("EDGELM_TOOLS_OPTIMUM_PYTHON", ".venv-tools-optimum",
                "torch, optimum-onnx, transformers 4.57"),
}


def tools_python(which: str = "main") -> Path:
    """The tooling interpreter: ``main`` (.venv-tools) or ``optimum`` (.venv-tools-optimum).

    Raises:
        ModelError: Neither the environment variable's interpreter nor the venv exists.
    """
    var, venv, holds = _TOOL_ENVS[which]
    env = os.environ.get(var)
    candidates = [Path(env)] if env else []
    candidates.append(_HERE.parent / venv / "bin" / "python")
    for cand in candidates:
        if cand.is_file() and os.access(cand, os.X_OK):
            return cand
    raise ModelError(
        f"model conversion needs the tooling environment ({holds}), which is not installed: "
        f"run `./install.sh --tools` (creates {venv}) or point {var} at an interpreter that "
        "has them"
    )


@dataclass(frozen=True)
class PreparedModel:
    """One prepared format in the cache."""

    name: str
    fmt: str
    folder: Path
    manifest: dict[str, Any]

    @property
    def entry(self) -> Path:
        """The path a backend loads (a file, or the folder itself)."""
        rel = PREPARED_FORMATS[self.fmt]["entry"]
        return self.folder if rel == "." else self.folder / rel


def _known(name: str) -> KnownModel:
    known = KNOWN_MODELS.get(name)
    if known is None:
        raise ModelError(f"unknown model {name!r} (known: {', '.join(sorted(KNOWN_MODELS))})")
    return known


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("complete") else None


def find_prepared(
    name: str, fmt: str, source_sha256: str | None = None, home: Path | None = None
) -> PreparedModel | None:
    """The cached build of ``name`` in ``fmt`` for the current key, or None."""
    known = _known(name)
    source = source_sha256 or known.sha256
    for base in [home] if home is not None else search_homes():
        folder = base / name / f"{fmt}-{conversion_key(source, fmt)}"
        manifest = _read_manifest(folder)
        if manifest is not None and manifest.get("source_sha256") == source:
            return PreparedModel(name, fmt, folder, manifest)
    return None


def prepare_hint(name: str, fmt: str) -> str:
    """The exact commands that produce ``fmt`` for ``name``."""
    tools = "" if fmt == "gguf" else " (needs the tooling env: ./install.sh --tools)"
    return f"agentctl models prepare {name} --format {fmt}{tools}"


def resolve_for_backend(
    name: str, backend: str, verify: bool = True, fmt: str | None = None
) -> ResolvedModel:
    """Resolve a known model name to the prepared format ``backend`` loads.

    ``llamacpp`` gets the bundled GGUF itself; ``onnxruntime`` and ``tflite`` get the build in
    the cache, or a :class:`ModelError` saying exactly how to prepare it. Other backends (and
    paths) resolve as :func:`agent.models.resolve_model` does. ``fmt`` picks a prepared
    format other than the backend's default (``onnx-optimum`` for ``onnxruntime``); one the
    backend cannot load is a :class:`ModelError`.
    """
    if fmt is not None and fmt not in BACKEND_FORMATS.get(backend, ()):
        raise ModelError(
            f"backend {backend!r} cannot load prepared format {fmt!r} "
            f"(it loads: {', '.join(BACKEND_FORMATS.get(backend, ())) or 'none'})"
        )
    fmt = fmt or BACKEND_FORMAT.get(backend)
    if name not in KNOWN_MODELS or fmt is None or fmt == "gguf":
        return resolve_model(name, verify=verify)
    prepared = find_prepared(name, fmt)
    if prepared is None:
        raise ModelError(
            f"model {name!r} has no {fmt} build for backend {backend!r} in "
            f"{models_home() / name}; prepare it with: {prepare_hint(name, fmt)}"
        )
    m = prepared.manifest
    return ResolvedModel(
        name=name,
        path=prepared.entry,
        format=str(m["model_format"]),
        sha256=str(m["sha256"]),
        size_bytes=int(m.get("size_bytes", 0)),
    )


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock per model, so concurrent prepares (CI, tests) convert once."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run_tool(
    python: Path, args: list[str], log: Callable[[str], None], script: Path = CONVERTER
) -> dict[str, Any]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    cmd = [str(python), str(script), *args]
    log("running: " + " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise ModelError(f"conversion step {args[0]!r} failed (exit {proc.returncode}):\n{tail}")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("EDGELM-RESULT "):
            result: dict[str, Any] = json.loads(line.split(" ", 1)[1])
            return result
    return {}


def _tool_versions(
    python: Path, log: Callable[[str], None], script: Path = CONVERTER
) -> dict[str, Any]:
    return _run_tool(python, ["versions"], log, script)


def _dir_files(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "manifest.json"
    }


def _weights_file(folder: Path, fmt: str) -> Path:
    if fmt in ("onnx", "onnx-optimum"):  # the weights, not the graph, identify the model
        data = folder / "model.onnx.data"
        return data if data.is_file() else folder / "model.onnx"
    return folder / str(PREPARED_FORMATS[fmt]["entry"])


def _hf_folder(
    name: str, gguf: ResolvedModel, python: Callable[[], Path], home: Path,
    log: Callable[[str], None],
) -> Path:
    """The dequantised HF folder, made (in .venv-tools, via ``python()``) only when missing."""
    key = hashlib.sha256(
        (gguf.sha256 + _file_sha(TOOLS_REQUIREMENTS) + _file_sha(CONVERTER)).encode()
    ).hexdigest()[:16]
    folder = home / name / f"hf-{key}"
    if (folder / "config.json").is_file() and (folder / ".complete").is_file():
        return folder
    tmp = Path(tempfile.mkdtemp(prefix=".hf-", dir=home / name))
    try:
        _run_tool(python(), ["hf", "--gguf", str(gguf.path), "--out", str(tmp)], log)
        (tmp / ".complete").write_text("")
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def prepare(
    name: str,
    fmt: str,
    *,
    force: bool = False,
    home: Path | None = None,
    log: Callable[[str], None] = logger.info,
) -> PreparedModel:
    """Build ``fmt`` for known model ``name`` from its GGUF into the cache (idempotent).

    Raises:
        ModelError: Unknown model/format, missing tooling, or a failed conversion step.
    """
    if fmt not in PREPARED_FORMATS:
        raise ModelError(f"unknown format {fmt!r} (one of {', '.join(PREPARED_FORMATS)})")
    home = home or models_home()
    gguf = resolve_model(name)  # verifies size and sha256 of the bundled file
    with _locked(home / name):
        existing = find_prepared(name, fmt, gguf.sha256, home)
        if existing is not None and not force:
            log(f"{name} {fmt}: already prepared in {existing.folder}")
            return existing
        key = conversion_key(gguf.sha256, fmt)
        folder = home / name / f"{fmt}-{key}"
        t0 = time.monotonic()
        tools: dict[str, Any] = {}
        steps: list[dict[str, Any]] = []
        hf: Path | None = None
        hf_tools: dict[str, Any] | None = None
        tmp = Path(tempfile.mkdtemp(prefix=f".{fmt}-", dir=home / name))
        try:
            if fmt == "gguf":
                target = tmp / "model.gguf"
                try:
                    os.link(gguf.path, target)
                except OSError:
                    shutil.copy2(gguf.path, target)
            elif PREPARED_FORMATS[fmt].get("tools") == "optimum":
                python = tools_python("optimum")  # fail before any work when it is missing
                tools = _tool_versions(python, log, CONVERTER_OPTIMUM)
                hf = _hf_folder(name, gguf, tools_python, home, log)
                with contextlib.suppress(ModelError):  # None: .venv-tools is not installed
                    hf_tools = _tool_versions(tools_python(), log)
                params = PREPARED_FORMATS[fmt]["params"]
                steps.append(_run_tool(python, [
                    "export", "--hf", str(hf), "--out", str(tmp),
                    "--opset", str(params["opset"])], log, CONVERTER_OPTIMUM))
            else:
                python = tools_python()
                tools = _tool_versions(python, log)
                hf = _hf_folder(name, gguf, lambda: python, home, log)
                hf_tools = tools
                params = PREPARED_FORMATS[fmt]["params"]
                if fmt == "onnx":
                    args = ["onnx", "--hf", str(hf), "--out", str(tmp),
                            "--precision", str(params["precision"])]
                else:
                    args = ["tflite", "--hf", str(hf), "--out", str(tmp),
                            "--kv", str(params["kv"]), "--prefill", str(params["prefill"]),
                            "--quantize", str(params["quantize"])]
                steps.append(_run_tool(python, args, log))
            weights = _weights_file(tmp, fmt)
            files = _dir_files(tmp)
            manifest = {
                "schema": MANIFEST_SCHEMA,
                "complete": True,
                "name": name,
                "format": fmt,
                "model_format": PREPARED_FORMATS[fmt]["model_format"],
                "quantization": PREPARED_FORMATS[fmt].get("quantization", gguf_quant(name)),
                "key": key,
                "sha256": sha256_file(weights),
                "weights_file": weights.name,
                "size_bytes": sum(files.values()),
                "files": files,
                "source": {"path": str(gguf.path), "format": "gguf",
                           "quantization": gguf_quant(name), "size_bytes": gguf.size_bytes},
                "source_sha256": gguf.sha256,
                "params": PREPARED_FORMATS[fmt]["params"],
                "tools": tools,
                "converter_sha256": _file_sha(CONVERTER) if fmt != "gguf" else None,
                "converters": {p.name: _file_sha(p) for p in _key_inputs(fmt)[1]},
                "tool_requirements": {p.name: _file_sha(p) for p in _key_inputs(fmt)[0]},
                "intermediate_hf": str(hf) if hf is not None else None,
                # the environment that dequantised the GGUF into it (same pins: same key)
                "intermediate_tools": hf_tools,
                "steps": steps,
                "seconds": round(time.monotonic() - t0, 2),
                "created_unix": int(time.time()),
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            if folder.exists():
                shutil.rmtree(folder)
            tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"{name} {fmt}: prepared in {folder} ({manifest['seconds']} s)")
        return PreparedModel(name, fmt, folder, manifest)


def gguf_quant(name: str) -> str:
    """The bundled GGUF's quantization (e.g. ``Q4_1``)."""
    return _known(name).quantization


def list_models(home: Path | None = None) -> list[dict[str, Any]]:
    """One row per known model and prepared format: prepared or not, where, how to make it."""
    rows: list[dict[str, Any]] = []
    for name, known in sorted(KNOWN_MODELS.items()):
        for fmt in PREPARED_FORMATS:
            found = find_prepared(name, fmt, known.sha256, home)
            backends = [b for b, fs in BACKEND_FORMATS.items() if fmt in fs]
            rows.append({
                "model": name,
                "format": fmt,
                "backends": backends,
                "prepared": found is not None,
                "path": str(found.entry) if found else None,
                "quantization": (
                    found.manifest.get("quantization") if found
                    else PREPARED_FORMATS[fmt].get("quantization", known.quantization)
                ),
                "size_bytes": found.manifest.get("size_bytes") if found else None,
                "prepare": None if found else prepare_hint(name, fmt),
            })
    return rows
