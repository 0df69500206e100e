"""LiteRT (TFLite) backend: ``.tflite`` decoders with prefill/decode signatures.

The model is what litert-torch 0.10 writes for SmolLM2 (``agentctl models prepare --format
tflite``): signatures ``prefill_<N>`` (one per prefill length) and ``decode``, with inputs
``tokens`` [1, L] int32, ``input_pos`` [L] int32 and one ``kv_cache_{k,v}_<layer>`` tensor per
layer ([1, kv_len, kv_heads, head_dim] f32); the KV caches are also outputs, and ``decode``
returns ``logits`` [1, 1, vocab]. The tokenizer and chat template come from the
``tokenizer.json`` beside the model (:mod:`backends.hf_tokenizer`).

Engine facts this module relies on (ai-edge-litert 2.3, measured on this project's VM):

- The Python ``Interpreter`` signature runner copies every input in and every output out
  per call: for SmolLM2 that is 60 KV tensors (~47 MB each way) per token, which held the
  naive loop to ~27 tok/s (shared/notes/feasibility.md §4). This backend uses
  ``CompiledModel`` with ``TensorBuffer`` objects instead: each KV tensor is one buffer made
  by ``create_input_buffer_by_name`` and bound as both the input and the output of every
  step, so the cache is updated in place and never crosses into Python. Only the token, its
  position and the logits row (vocab floats) are copied. (``TensorBuffer
  .create_from_host_memory`` would let a numpy array own the memory, but in 2.3 it makes a
  1-D buffer, which the compiled model refuses to bind to a [1, kv, heads, dim] input.)
- The converted graph attends over all ``kv_len`` cache slots every step (later ones masked),
  so each decode step reads the whole cache (60 × 786 KB for SmolLM2 at kv 1024), through
  XNNPACK transposes and weight packing. Slots never written stay on the kernel's shared zero
  page, which those reads hit in cache; writing zeros into the fresh buffers at load made them
  real memory and cost about 3× the transpose time (perf, 1 thread: 405 vs 123 samples per
  64 tokens) — the whole of the gap to a raw engine loop that skips the write. So only the
  part of a buffer that does not already read as zeros is zeroed (the mask makes old finite
  values harmless, but recycled heap memory could hold NaNs, and 0 × NaN is NaN). A request that
  reaches position P makes the slots up to P real for every later request, raw loop alike.
- Prefill positions past the prompt are padding; the model masks cache slots beyond the
  current position, and decode overwrites them before they are ever attended to (the
  pattern of litert-torch's ``text_generator_main.cc``).
- Threads: ``CpuOptions(num_threads=N)`` with N the resolved positive count (0 would let
  LiteRT choose).
- A ``CompiledModel`` and its buffers are not thread-safe: a second concurrent generation on
  the same backend is refused (``backend_failed``), never interleaved.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator
from typing import Any, ClassVar

from backends.base import (
    Availability,
    Backend,
    BackendError,
    BackendOptions,
    GenerationRequest,
    ModelSpec,
    TokenEvent,
    read_json_object,
    sha256_file,
)
from backends.hf_tokenizer import HfChatTokenizer, tokenizer_folder
from backends.sampling import LogitsSampler
from backends.streaming import check_context, token_events

logger = logging.getLogger(__name__)

_PREFILL = re.compile(r"^prefill_(\d+)$")


class TfliteBackend(Backend):
    """LiteRT ``.tflite`` decoders (prefill/decode signatures) on the CPU."""

    name: ClassVar[str] = "tflite"
    formats: ClassVar[tuple[str, ...]] = ("tflite",)

    def __init__(self) -> None:
        self._model: ModelSpec | None = None
        self._options: BackendOptions | None = None
        self._tok: HfChatTokenizer | None = None
        self._cm: Any = None
        self._np: Any = None
        self._prefill: dict[int, str] = {}
        self._kv_names: list[str] = []
        self._kv_arrays: list[Any] = []
        self._kv_buffers: dict[str, Any] = {}
        self._io: dict[str, dict[str, Any]] = {}
        self._logits_buf: Any = None
        self._vocab = 0
        self._kv_len = 0
        self._n_ctx = 0
        self._sha256: str | None = None
        self._load_ms: float | None = None
        self._manifest: dict[str, Any] = {}
        self._busy = threading.Lock()

    @classmethod
    def check(cls) -> Availability:
        """Check that ai-edge-litert's CompiledModel and tokenizers import."""
        try:
            import tokenizers  # noqa: F401
            from ai_edge_litert.compiled_model import CompiledModel  # noqa: F401
        except Exception as exc:
            return Availability(
                False, f"ai-edge-litert/tokenizers not usable: {exc}; install the 'tflite' extra"
            )
        return Availability(True)

    def load(self, model: ModelSpec, options: BackendOptions) -> None:
        """Compile the model for the CPU and allocate the in-place KV buffers."""
        if options.threads <= 0:
            raise BackendError("bad_request", f"threads must be positive, got {options.threads}")
        path = model.path
        if path.is_dir():
            path = path / "model.tflite"
        if path.suffix.lower() == ".gguf":
            raise BackendError(
                "unknown_model",
                f"{path} is a GGUF file; the tflite backend needs a LiteRT model: "
                f"run `agentctl models prepare {model.name} --format tflite`",
            )
        if not path.is_file():
            raise BackendError("unknown_model", f"LiteRT model not found: {path}")
        try:
            import numpy as np
            from ai_edge_litert.compiled_model import CompiledModel
            from ai_edge_litert.cpu_options import CpuOptions
            from ai_edge_litert.hardware_accelerator import HardwareAccelerator
            from ai_edge_litert.options import Options
        except Exception as exc:
            raise BackendError("backend_failed", f"ai-edge-litert is not usable: {exc}") from exc
        self._np = np
        folder = tokenizer_folder(path)
        self._manifest = read_json_object(folder / "manifest.json")
        t0 = time.monotonic()
        self._tok = HfChatTokenizer(folder)
        try:
            cm = CompiledModel.from_file(
                str(path),
                options=Options(
                    hardware_accelerators=HardwareAccelerator.CPU,
                    cpu_options=CpuOptions(num_threads=options.threads),
                ),
            )
            signatures = cm.get_signature_list()
        except Exception as exc:
            raise BackendError(
                "backend_failed", f"LiteRT could not load {path}: {exc}"
            ) from exc
        if "decode" not in signatures:
            raise BackendError(
                "bad_request", f"{path} has no 'decode' signature (has {sorted(signatures)})"
            )
        self._prefill = {
            int(m.group(1)): key for key in signatures if (m := _PREFILL.match(key))
        }
        decode_inputs = list(signatures["decode"]["inputs"])
        self._kv_names = [n for n in decode_inputs if n.startswith("kv_cache_")]
        if not self._kv_names:
            raise BackendError("bad_request", f"{path}: the decode signature has no KV cache")
        self._cm = cm
        details = cm.get_input_tensor_details("decode")
        self._kv_arrays, self._kv_buffers = [], {}
        for name in self._kv_names:
            self._kv_buffers[name] = cm.create_input_buffer_by_name("decode", name)
        # Only after all are allocated: the temporary arrays of the check must not be
        # recycled into a KV buffer.
        for name, buf in self._kv_buffers.items():
            dirty = _dirty_prefix(buf, [int(d) for d in details[name]["shape"]], np)
            if dirty:
                buf.write(np.zeros(dirty, dtype=np.float32))  # a write fills a prefix
        self._kv_len = int(details[self._kv_names[0]]["shape"][1])
        out_details = cm.get_output_tensor_details("decode")
        logits_shape = [int(d) for d in out_details["logits"]["shape"]]
        self._vocab = logits_shape[-1]
        self._logits_buf = cm.create_output_buffer_by_name("decode", "logits")
        self._io = {}
        for key in ["decode", *self._prefill.values()]:
            self._io[key] = {
                "tokens": cm.create_input_buffer_by_name(key, "tokens"),
                "input_pos": cm.create_input_buffer_by_name(key, "input_pos"),
            }
        wanted = options.context_tokens or self._kv_len
        self._n_ctx = min(wanted, self._kv_len)
        self._sha256 = model.sha256 or self._manifest.get("sha256") or sha256_file(path)
        self._load_ms = (time.monotonic() - t0) * 1000.0
        self._model, self._options = model, options
        logger.info(
            "loaded %s (%s) in %.0f ms: prefill %s, kv %d, threads %d",
            model.name, path, self._load_ms, sorted(self._prefill), self._kv_len, options.threads,
        )

    def _require_loaded(self) -> HfChatTokenizer:
        if self._tok is None or self._cm is None:
            raise BackendError("backend_failed", "no model loaded")
        return self._tok

    def count_tokens(self, request: GenerationRequest) -> int:
        """Number of prompt tokens ``request`` would use (after templating)."""
        tok = self._require_loaded()
        return len(tok.prompt_ids(request.messages, request.prompt, request.prompt_token_ids))

    def _run(self, key: str, tokens: list[int], start: int, length: int) -> None:
        """One signature call; the KV buffers are both inputs and outputs (in place)."""
        np = self._np
        io = self._io[key]
        padded = np.zeros((1, length), dtype=np.int32)
        padded[0, : len(tokens)] = tokens
        io["tokens"].write(padded)
        io["input_pos"].write(np.arange(start, start + length, dtype=np.int32))
        inputs = {"tokens": io["tokens"], "input_pos": io["input_pos"], **self._kv_buffers}
        outputs = dict(self._kv_buffers)
        if key == "decode":
            outputs["logits"] = self._logits_buf
        self._cm.run_by_name(key, inputs, outputs)

    def _prefill_tokens(self, ids: list[int], counters: dict[str, Any]) -> None:
        """Fill the cache with ``ids`` using the prefill signatures (decode for a tail)."""
        pos = 0
        lengths = sorted(self._prefill)
        t0 = time.monotonic_ns()
        calls = 0
        while pos < len(ids):
            left = len(ids) - pos
            fitting = [n for n in lengths if pos + n <= self._kv_len]
            if not fitting:
                self._run("decode", [ids[pos]], pos, 1)
                pos += 1
                calls += 1
                continue
            size = next((n for n in fitting if n >= left), fitting[-1])
            chunk = ids[pos : pos + size]
            self._run(self._prefill[size], chunk, pos, size)
            pos += len(chunk)
            calls += 1
        counters["t_prefill_ms"] = (time.monotonic_ns() - t0) / 1e6
        counters["n_prefill_calls"] = calls

    def generate(self, request: GenerationRequest) -> Iterator[TokenEvent]:
        """Stream tokens: prefill all but the last prompt token, then decode step by step."""
        tok = self._require_loaded()
        ids = tok.prompt_ids(request.messages, request.prompt, request.prompt_token_ids)
        max_tokens = check_context(len(ids), self._n_ctx, request.max_tokens)
        counters: dict[str, Any] = {}
        prefill_start_ns = time.monotonic_ns()
        return token_events(
            self._engine_tokens(ids, max_tokens, request, counters),
            request=request,
            token_bytes=tok.token_bytes,
            eog_ids=tok.eog_ids,
            n_prompt=len(ids),
            max_tokens=max_tokens,
            prefill_start_ns=prefill_start_ns,
            engine_counters=lambda: counters,
            engine_name="litert",
        )

    def _engine_tokens(
        self, ids: list[int], max_tokens: int, request: GenerationRequest,
        counters: dict[str, Any],
    ) -> Iterator[tuple[int, int]]:
        if not self._busy.acquire(blocking=False):
            raise BackendError(
                "backend_failed", "the LiteRT model is already generating (one at a time)"
            )
        try:
            tok = self._require_loaded()
            np = self._np
            seed = request.seed if request.seed is not None else (
                self._options.seed if self._options else 0)
            sampler = LogitsSampler(
                request.temperature, request.top_k, request.top_p, seed,
                banned=tok.eog_ids if request.ignore_eos else (),
            )
            # Old cache contents past the new prompt are masked by position, never read.
            self._prefill_tokens(ids[:-1], counters)
            token, pos = ids[-1], len(ids) - 1
            t_decode_ms = 0.0
            for step in range(max_tokens):
                t0 = time.monotonic_ns()
                self._run("decode", [token], pos, 1)
                logits = self._logits_buf.read(self._vocab, np.float32)
                t_decode_ms += (time.monotonic_ns() - t0) / 1e6
                counters["t_decode_ms"] = t_decode_ms
                counters["n_decode"] = step + 1
                token = sampler(logits)
                yield token, time.monotonic_ns()
                pos += 1
        finally:
            self._busy.release()

    def info(self) -> dict[str, Any]:
        """Describe the loaded model and the engine build."""
        try:
            import importlib.metadata

            version = importlib.metadata.version("ai-edge-litert")
        except Exception:
            version = None
        return {
            "backend": self.name,
            "engine": "litert",
            "engine_version": version,
            "build_flags": "CompiledModel CPU (XNNPACK); KV buffers bound in place",
            "model_path": str(self._model.path) if self._model else None,
            "model_sha256": self._sha256,
            "format": "tflite",
            "quantization": self._manifest.get("quantization")
            or read_json_object(tokenizer_folder(self._model.path) / "litert_config.json").get(
                "quantize") if self._model else None,
            "context_tokens": self._n_ctx or None,
            "model_context_tokens": self._kv_len or None,
            "prefill_lengths": sorted(self._prefill),
            "threads": self._options.threads if self._options else None,
            "load_ms": self._load_ms,
            "tokenizer": "tokenizers (tokenizer.json)",
            "source_sha256": self._manifest.get("source_sha256"),
            "prepared_as": self._manifest.get("format"),
        }

    def close(self) -> None:
        """Release the compiled model and the KV buffers."""
        self._kv_buffers = {}
        self._io = {}
        self._logits_buf = None
        self._cm = None
        self._kv_arrays = []
        self._tok = None


def _dirty_prefix(buf: Any, shape: list[int], np: Any) -> int:
    """Length of the prefix of a fresh float32 buffer that must be zeroed (0: none).

    Reading leaves untouched pages on the shared zero page (no memory is committed), which
    writing zeros would not; see the module docstring for why that matters here. Measured
    with ai-edge-litert 2.3: a third of SmolLM2's 60 buffers come from recycled heap memory
    with one stray word near the start (allocator bookkeeping), so zeroing up to the last
    non-zero element (NaN counts) touches one page, not the buffer.
    """
    count = 1
    for d in shape:
        count *= d
    nonzero = np.flatnonzero(buf.read(count, np.float32))
    return int(nonzero[-1]) + 1 if len(nonzero) else 0


