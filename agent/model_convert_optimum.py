"""The optimum ONNX export, run as a script inside its own tooling environment.

``agentctl models prepare NAME --format onnx-optimum`` runs this file with the interpreter of
``.venv-tools-optimum`` (``./install.sh --tools``). It imports nothing from the agent. It
exports the dequantised fp32 HF folder that ``model_convert.py hf`` made from the GGUF (in
``.venv-tools``) into a plain ``model.onnx`` with ``past_key_values.*`` inputs and
``present.*`` outputs, which the onnxruntime backend runs on onnxruntime alone.

Why a second environment, and what it has to correct (measured on this project's VM,
shared/notes/feasibility.md §3):

- optimum-onnx 0.1.0 (the latest) pins ``optimum~=2.1`` and ``transformers<4.58``; with
  transformers 5.x it fails to import (``get_parameter_dtype``). onnxruntime-genai's builder
  and the GGUF dequantisation need transformers 5. So the two cannot share a venv.
- The HF folder was saved by transformers 5, which writes the RoPE base as
  ``rope_parameters.rope_theta`` and the dtype as ``dtype``. transformers 4.57 reads
  ``rope_theta`` at top level and silently falls back to 10000 when it is missing; SmolLM2
  uses 100000, so an unpatched export would run but produce wrong logits. The config is
  rewritten in the 4.57 spelling (both spellings kept) before export, and the check after
  export fails the conversion if the value did not arrive.
- transformers 5 saves the tokenizer class as ``TokenizersBackend``, unknown to 4.57; the
  staged copy names ``PreTrainedTokenizerFast`` (the same ``tokenizer.json``).
- transformers 4.57 reads this GGUF's EOS as ``<|im_start|>``; generation must stop on
  ``<|im_end|>`` (id 2). The HF folder already has it right; the tokenizer files and the
  generation config are copied from it over whatever optimum re-saved, and checked.

Usage::

    python model_convert_optimum.py versions
    python model_convert_optimum.py export --hf DIR --out DIR [--opset 18]

The output folder holds ``model.onnx`` (graph), ``model.onnx.data`` (weights, external data:
onnxruntime maps it instead of copying it), ``config.json`` and the tokenizer files.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TOOL_DISTRIBUTIONS = (
    "torch",
    "transformers",
    "optimum",
    "optimum-onnx",
    "onnx",
    "onnxruntime",
    "tokenizers",
)

# Copied from the HF folder (EOS fixed there) over optimum's re-saved copies: the runtime
# tokenizes with HF `tokenizers` and reads EOS ids from these.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
)
EOS_TOKEN = "<|im_end|>"


def tool_versions() -> dict[str, str | None]:
    """Installed versions of the export tools (None when a tool is missing)."""
    out: dict[str, str | None] = {}
    for dist in TOOL_DISTRIBUTIONS:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def legacy_config(config: dict[str, Any]) -> dict[str, Any]:
    """A transformers-5 ``config.json`` also spelled the way transformers 4.57 reads it."""
    cfg = dict(config)
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict):
        if "rope_theta" in rope and "rope_theta" not in cfg:
            cfg["rope_theta"] = rope["rope_theta"]
        kind = rope.get("rope_type", "default")
        if kind != "default" and not cfg.get("rope_scaling"):
            cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if "dtype" in cfg and "torch_dtype" not in cfg:
        cfg["torch_dtype"] = cfg["dtype"]
    return cfg


def legacy_tokenizer_config(config: dict[str, Any]) -> dict[str, Any]:
    """A transformers-5 ``tokenizer_config.json`` that transformers 4.57 can load.

    transformers 5 names the class ``TokenizersBackend``, which 4.57 does not have; the
    ``tokenizer.json`` it wraps loads as ``PreTrainedTokenizerFast`` there.
    """
    cfg = dict(config)
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    return cfg


_LEGACY = {"config.json": legacy_config, "tokenizer_config.json": legacy_tokenizer_config}


def _staged_hf(hf: Path, stage: Path) -> None:
    """Link the weights and write the legacy-spelled configs into ``stage``."""
    for src in hf.iterdir():
        if not src.is_file() or src.name.startswith("."):
            continue
        if src.name in _LEGACY:
            cfg = json.loads(src.read_text())
            (stage / src.name).write_text(json.dumps(_LEGACY[src.name](cfg), indent=2) + "\n")
            continue
        try:
            os.symlink(src.resolve(), stage / src.name)
        except OSError:
            shutil.copy2(src, stage / src.name)


def _check_export(hf: Path, out: Path) -> dict[str, Any]:
    """Fail unless the export has past-KV I/O, the right RoPE base and EOS id."""
    onnx: Any = importlib.import_module("onnx")
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    past = [n for n in inputs if n.startswith("past_key_values")]
    present = [n for n in outputs if n.startswith("present")]
    if not past or len(past) != len(present) or "logits" not in outputs:
        raise RuntimeError(f"export has no past-KV I/O: inputs={inputs} outputs={outputs}")
    src_cfg = legacy_config(json.loads((hf / "config.json").read_text()))
    out_cfg = json.loads((out / "config.json").read_text())
    if src_cfg.get("rope_theta") is not None and out_cfg.get("rope_theta") != src_cfg["rope_theta"]:
        raise RuntimeError(
            f"rope_theta {out_cfg.get('rope_theta')} in the export, {src_cfg['rope_theta']} "
            "in the source: transformers 4.57 did not read the transformers-5 config"
        )
    tokenizer = json.loads((out / "tokenizer.json").read_text())
    eos_id = next((t["id"] for t in tokenizer.get("added_tokens", [])
                   if t.get("content") == EOS_TOKEN), None)
    gen = json.loads((out / "generation_config.json").read_text())
    gen_eos = gen.get("eos_token_id")
    gen_eos_ids = gen_eos if isinstance(gen_eos, list) else [gen_eos]
    if eos_id is None or eos_id not in gen_eos_ids:
        raise RuntimeError(f"EOS: {EOS_TOKEN} is id {eos_id}, generation_config says {gen_eos}")
    return {
        "inputs": len(inputs),
        "outputs": len(outputs),
        "past_inputs": len(past),
        "nodes": len(model.graph.node),
        "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                     default=None),
        "rope_theta": out_cfg.get("rope_theta"),
        "eos_token_id": eos_id,
    }


def _externalise(model_file: Path) -> None:
    """Move the weights out of ``model.onnx`` into ``model.onnx.data`` (one file).

    onnxruntime memory-maps external data on CPU instead of copying an embedded protobuf
    into the heap. Measured on this export (SmolLM2 fp32, 652 MB of weights, onnxruntime
    1.32): peak RSS of the backend loading it and generating 6 × 64 tokens is 0.77 GB with
    external data against 0.88 GB embedded (see backends/onnxruntime.py).
    """
    onnx: Any = importlib.import_module("onnx")
    model = onnx.load(str(model_file))  # also reads optimum's own external data, if any
    data = model_file.with_name(model_file.name + ".data")
    for stale in (data, model_file.with_name(model_file.name + "_data")):
        if stale.exists():
            stale.unlink()
    onnx.save_model(model, str(model_file), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=data.name, size_threshold=1024)


def export_onnx(hf: Path, out: Path, opset: int) -> dict[str, Any]:
    """Export ``hf`` to ``out/model.onnx`` (text-generation-with-past), then check it."""
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    t0 = time.monotonic()
    exporters: Any = importlib.import_module("optimum.exporters.onnx")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgelm-optimum-src-") as stage_dir:
        stage = Path(stage_dir)
        _staged_hf(hf, stage)
        # Validation (on by default) runs the ONNX graph against the torch model on random
        # inputs; it is part of what makes the cached export trustworthy.
        exporters.main_export(
            str(stage), output=str(out), task="text-generation-with-past", opset=opset,
            device="cpu", do_validation=True,
        )
    _externalise(out / "model.onnx")
    for name in TOKENIZER_FILES:
        if (hf / name).is_file():
            shutil.copy2(hf / name, out / name)
    # optimum re-saves config.json through transformers 4.57 (legacy spelling); keep it, with
    # the EOS id of the source.
    cfg = json.loads((out / "config.json").read_text())
    src = json.loads((hf / "config.json").read_text())
    cfg["eos_token_id"] = src.get("eos_token_id", cfg.get("eos_token_id"))
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    check = _check_export(hf, out)
    return {"step": "onnx-optimum", "seconds": round(time.monotonic() - t0, 2), "opset": opset,
            "check": check}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints one JSON line describing the step."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    sub.add_parser("versions")
    p_exp = sub.add_parser("export")
    p_exp.add_argument("--hf", type=Path, required=True)
    p_exp.add_argument("--out", type=Path, required=True)
    p_exp.add_argument("--opset", type=int, default=18)
    args = parser.parse_args(argv)
    result: dict[str, Any]
    if args.step == "versions":
        result = tool_versions()
    else:
        result = export_onnx(args.hf, args.out, args.opset)
    print("EDGELM-RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
