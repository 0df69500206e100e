"""Model conversion steps, run as a script inside the tooling environment (``.venv-tools``).

This file imports nothing from the agent: ``agentctl models prepare`` runs it with the tooling
interpreter (torch, transformers, onnxruntime-genai, litert-torch), so none of those ever
become daemon dependencies. Each step writes into an empty output folder and prints one JSON
line with what it did.

Engine facts (measured on this project's 2-core VM, see shared/notes/feasibility.md §3–4):

- transformers 5.x loads the Q4_1 GGUF offline with ``gguf_file=`` and dequantises it to
  fp32 (about 10 s, 1.1 GB RSS); 4.57 gets the EOS token wrong (``<|im_start|>``), so EOS is
  forced to ``<|im_end|>`` (id 2) before saving either way.
- onnxruntime-genai's builder does not take a quantized GGUF offline; it takes the
  dequantised HF folder and writes an int4 (MatMulNBits) model in about 8 s.
- litert-torch 0.10 imports ``tensorflow.lite.python.schema_py_generated`` although it does
  not depend on TensorFlow; ai-edge-litert ships the same module, so a 4-file shim package
  re-exporting it is put on ``PYTHONPATH`` for the conversion subprocess.

Usage::

    python model_convert.py versions
    python model_convert.py hf --gguf FILE --out DIR
    python model_convert.py onnx --hf DIR --out DIR [--precision int4]
    python model_convert.py tflite --hf DIR --out DIR [--kv 1024] [--prefill 64,256]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Files a runtime needs besides the weights: tokenizer.json for HF `tokenizers`, the chat
# template (tokenizer_config.json or chat_template.jinja) and the generation config (EOS ids).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
    "config.json",
)

TOOL_DISTRIBUTIONS = (
    "torch",
    "transformers",
    "gguf",
    "onnxruntime-genai",
    "onnx-ir",
    "onnx",
    "litert-torch",
    "ai-edge-litert",
    "tokenizers",
)


def tool_versions() -> dict[str, str | None]:
    """Installed versions of the conversion tools (None when a tool is missing)."""
    out: dict[str, str | None] = {}
    for dist in TOOL_DISTRIBUTIONS:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _offline_env() -> dict[str, str]:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    return env


def convert_hf(gguf: Path, out: Path) -> dict[str, Any]:
    """Dequantise a GGUF into an fp32 HF folder (safetensors + tokenizer), EOS fixed."""
    os.environ.update(_offline_env())
    torch: Any = importlib.import_module("torch")
    transformers: Any = importlib.import_module("transformers")
    t0 = time.monotonic()
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # transformers 4.57 reads eos=<|im_start|> from this GGUF; the chat template ends turns
    # with <|im_end|> (id 2), which is what generation must stop on.
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|im_end|>"
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = model.generation_config.eos_token_id
    model.config.eos_token_id = model.generation_config.eos_token_id
    out.mkdir(parents=True, exist_ok=True)
    # transformers 5.x marks a GGUF-loaded model as "quantized with gguf" and refuses
    # save_pretrained, although the weights are already dequantised fp32: copy them into a
    # plain model built from the same config (without the quantization marker).
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    plain.generation_config = model.generation_config
    plain.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return {
        "step": "hf",
        "seconds": round(time.monotonic() - t0, 2),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "eos_token_id": int(model.generation_config.eos_token_id),
    }


def copy_tokenizer(hf: Path, out: Path) -> list[str]:
    """Copy the tokenizer, chat template and configs next to the converted weights."""
    copied = []
    for name in TOKENIZER_FILES:
        src = hf / name
        if src.is_file() and not (out / name).exists():
            shutil.copy2(src, out / name)
            copied.append(name)
    return copied


def convert_onnx_genai(hf: Path, out: Path, precision: str) -> dict[str, Any]:
    """Build an onnxruntime-genai model folder (default int4 MatMulNBits) from an HF folder."""
    t0 = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgelm-genai-cache-") as cache:
        cmd = [
            sys.executable, "-m", "onnxruntime_genai.models.builder",
            "-i", str(hf), "-o", str(out), "-p", precision, "-e", "cpu", "-c", cache,
            "--extra_options", "hf_token=false",
        ]
        subprocess.run(cmd, check=True, env=_offline_env())
    # The builder writes its own tokenizer files; ours (from the HF folder, EOS fixed) win,
    # as onnxruntime-genai's tokenizer is not used at run time (it mis-tokenizes ChatML here).
    for name in TOKENIZER_FILES:
        if (hf / name).is_file():
            shutil.copy2(hf / name, out / name)
    return {"step": "onnx", "seconds": round(time.monotonic() - t0, 2), "precision": precision}


_TF_SHIM = {
    "tensorflow/__init__.py": "",
    "tensorflow/lite/__init__.py": "",
    "tensorflow/lite/python/__init__.py": "",
    "tensorflow/lite/python/schema_py_generated.py":
        "from ai_edge_litert.schema_py_generated import *  # noqa: F403\n",
}


def convert_tflite(hf: Path, out: Path, kv: int, prefill: str, quantize: str) -> dict[str, Any]:
    """Convert an HF SmolLM2 folder to a LiteRT model with prefill/decode signatures."""
    t0 = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgelm-tfshim-") as shim, \
            tempfile.TemporaryDirectory(prefix="edgelm-tflite-") as work:
        for rel, text in _TF_SHIM.items():
            p = Path(shim) / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
        env = _offline_env()
        env["PYTHONPATH"] = shim + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [
            sys.executable, "-m", "litert_torch.generative.examples.smollm.convert_v2_to_tflite",
            f"--checkpoint_path={hf}", f"--output_path={work}",
            f"--kv_cache_max_len={kv}", f"--quantize={quantize}",
            # absl multi_integer flag: one occurrence per length
            *(f"--prefill_seq_lens={int(n)}" for n in prefill.split(",")),
        ]
        subprocess.run(cmd, check=True, env=env)
        produced = sorted(Path(work).glob("*.tflite"))
        if len(produced) != 1:
            raise RuntimeError(f"expected one .tflite from litert-torch, got {produced}")
        shutil.move(str(produced[0]), out / "model.tflite")
        produced_name = produced[0].name
    copy_tokenizer(hf, out)
    (out / "litert_config.json").write_text(json.dumps(
        {"kv_cache_max_len": kv, "prefill_seq_lens": [int(x) for x in prefill.split(",")],
         "quantize": quantize, "converter_output": produced_name}, indent=2))
    return {"step": "tflite", "seconds": round(time.monotonic() - t0, 2), "quantize": quantize}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints one JSON line describing the step."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    sub.add_parser("versions")
    p_hf = sub.add_parser("hf")
    p_hf.add_argument("--gguf", type=Path, required=True)
    p_hf.add_argument("--out", type=Path, required=True)
    p_onnx = sub.add_parser("onnx")
    p_onnx.add_argument("--hf", type=Path, required=True)
    p_onnx.add_argument("--out", type=Path, required=True)
    p_onnx.add_argument("--precision", default="int4", choices=["int4", "int8", "fp32"])
    p_tfl = sub.add_parser("tflite")
    p_tfl.add_argument("--hf", type=Path, required=True)
    p_tfl.add_argument("--out", type=Path, required=True)
    p_tfl.add_argument("--kv", type=int, default=1024)
    p_tfl.add_argument("--prefill", default="64,256")
    p_tfl.add_argument("--quantize", default="dynamic_int8")
    args = parser.parse_args(argv)
    result: dict[str, Any]
    if args.step == "versions":
        result = tool_versions()
    elif args.step == "hf":
        result = convert_hf(args.gguf, args.out)
    elif args.step == "onnx":
        result = convert_onnx_genai(args.hf, args.out, args.precision)
    else:
        result = convert_tflite(args.hf, args.out, args.kv, args.prefill, args.quantize)
    print("EDGELM-RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
