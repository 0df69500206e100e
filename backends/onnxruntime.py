"""ONNX Runtime backend: onnxruntime-genai model folders and plain ``model.onnx`` with past-KV.

Two layouts are accepted:

- **onnxruntime-genai folder** (``genai_config.json`` + ``model.onnx`` + ``model.onnx.data``),
  as ``agentctl models prepare --format onnx`` builds it (int4 MatMulNBits). It runs on
  ``onnxruntime_genai.Generator``; on this project's 2-core VM it measured 168–177 decode
  tok/s for SmolLM2-135M, the fastest engine here (shared/notes/feasibility.md §3).
- **plain ``model.onnx`` with ``past_key_values.*`` inputs** (an optimum
  ``text-generation-with-past`` export, or any graph with the same I/O convention) on
  ``onnxruntime.InferenceSession`` alone. The loop keeps the ``present.*`` outputs as
  ``OrtValue`` objects and binds them as the next step's ``past_key_values.*`` through
  ``IOBinding``, so the KV cache stays in native memory between steps.
  A graph without past-KV inputs is refused: it would re-run the whole sequence per token.

Tokenization and the chat template use HF ``tokenizers`` (:mod:`backends.hf_tokenizer`):
onnxruntime-genai's tokenizer turns the 43-token ChatML bench prompt into 118 tokens with
this vocabulary. No torch at run time.

Session options, chosen for variable-length decoding (every step has a new sequence length,
so ONNX Runtime's defaults do not fit): ``enable_mem_pattern=False`` (memory patterns are
planned for one fixed input shape; ORT docs, "Memory pattern"), and the CPU memory arena off
by default (a BFC arena grows to the largest request seen and never shrinks, so RSS ratchets
up with prompt length; opt back in with ``extra={"cpu_mem_arena": True}``). Threads:
``intra_op_num_threads`` = the resolved count, ``inter_op_num_threads=1`` with sequential
execution (a decoder graph is one chain).

Peak RSS of the plain path, explained. VmHWM of one process loading the optimum fp32 export
of SmolLM2 (652 MB of weights: the exporter stores the tied embedding twice, once transposed
for the head) and generating 6 × 64 tokens, onnxruntime 1.32, 2 threads, measured on this
project's 2-core VM (load average 5-9; memory figures are deterministic to ~±30 MB):

- 2.27 GB: embedded weights and no manifest. The quantization probe ran
  ``onnx.load(load_external_data=False)``, which still parses embedded weights (twice in
  flight: file bytes + message). The graph's op types are now read from the protobuf wire
  format without touching initializers (``_op_types``): 0.88 GB.
- 1.19 GB → 0.88 GB: embedded weights (the file as optimum wrote it; 0.91-0.94 → 0.88 GB
  for the same weights re-saved by ``onnx``, which orders them differently). glibc's
  dynamic mmap threshold moves ONNX Runtime's weight copies onto the brk heap after the
  first large frees; pinning it during session construction (``_mmap_threshold_pinned``)
  gives what ``MALLOC_MMAP_THRESHOLD_=131072`` gives. Decode CPU time per token with and
  without the pin: no difference beyond the noise (3 alternating runs of 3 × 128 tokens).
- 0.77 GB (0.71 GB after): weights in ``model.onnx.data`` (external data), as
  ``agentctl models prepare --format onnx-optimum`` now writes them: onnxruntime maps the
  file instead of copying a parsed protobuf. The mmap pinning makes no difference there.
  RSS after 300 sequential requests is within 0.6 % of RSS after 20 (728 → 732 MB).

Options measured and not kept (peak RSS, standalone loop, embedded weights unless noted):
ONNX Runtime's defaults (memory pattern + arena) 1.16 GB against 0.87-0.93 GB with both
off; arena on with ``arena_extend_strategy=kSameAsRequested`` 0.87 GB (no better than off);
``session.use_env_allocators`` and ``session.use_device_allocator_for_initializers`` 0.87 GB
(no change); optimization level basic/extended 1.16 GB, disabled 1.02 GB (all: 0.87-0.93);
an optimized model saved with ``optimized_model_filepath`` and reloaded unoptimised 0.86 GB
(its one-off save peaks at 1.93 GB); ``session.disable_prepacking`` saves 30-80 MB of peak
(0.66 GB with external data) but costs ~40 % prefill and ~10 % decode CPU time per token
(process CPU time, 3 alternating runs of 128 tokens), so MatMul weights stay pre-packed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
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
from backends.hf_tokenizer import HfChatTokenizer
from backends.sampling import LogitsSampler
from backends.streaming import check_context, token_events

logger = logging.getLogger(__name__)


class OnnxRuntimeBackend(Backend):
    """onnxruntime-genai folders and plain past-KV ``model.onnx`` files, on CPU."""

    name: ClassVar[str] = "onnxruntime"
    formats: ClassVar[tuple[str, ...]] = ("onnx-genai", "onnx")

    def __init__(self) -> None:
        self._model: ModelSpec | None = None
        self._options: BackendOptions | None = None
        self._tok: HfChatTokenizer | None = None
        self._folder: Path | None = None
        self._onnx_file: Path | None = None
        self._kind: str | None = None  # "genai" or "plain"
        self._og_model: Any = None
        self._session: Any = None
        self._n_ctx = 0
        self._model_ctx: int | None = None
        self._sha256: str | None = None
        self._quantization: str | None = None
        self._load_ms: float | None = None
        self._manifest: dict[str, Any] = {}
        # plain-ORT graph facts
        self._past_names: list[str] = []
        self._present_names: list[str] = []
        self._kv_dtype: Any = None
        self._kv_heads = 0
        self._head_dim = 0
        self._has_position_ids = False

    @classmethod
    def check(cls) -> Availability:
        """Check that onnxruntime and tokenizers import (onnxruntime-genai is optional)."""
        try:
            import onnxruntime  # noqa: F401
            import tokenizers  # noqa: F401
        except Exception as exc:
            return Availability(
                False, f"onnxruntime/tokenizers not usable: {exc}; install the 'onnx' extra"
            )
        return Availability(True)

    # ------------------------------------------------------------------------ loading

    def load(self, model: ModelSpec, options: BackendOptions) -> None:
        """Load a genai folder or a plain ``model.onnx`` with past-KV inputs."""
        if options.threads <= 0:
            raise BackendError("bad_request", f"threads must be positive, got {options.threads}")
        path = model.path
        if not path.exists():
            raise BackendError("unknown_model", f"ONNX model not found: {path}")
        folder = path if path.is_dir() else path.parent
        onnx_file = path if path.is_file() else folder / "model.onnx"
        if path.suffix.lower() == ".gguf":
            raise BackendError(
                "unknown_model",
                f"{path} is a GGUF file; the onnxruntime backend needs an ONNX model: "
                f"run `agentctl models prepare {model.name} --format onnx`",
            )
        if not onnx_file.is_file():
            raise BackendError("unknown_model", f"no model.onnx in {folder}")
        self._folder, self._onnx_file = folder, onnx_file
        self._manifest = read_json_object(folder / "manifest.json")
        t0 = time.monotonic()
        self._tok = HfChatTokenizer(folder)
        genai = (folder / "genai_config.json").is_file() and not options.extra.get("plain_ort")
        if genai:
            self._load_genai(folder, options)
        else:
            self._load_plain(onnx_file, folder, options)
        self._load_ms = (time.monotonic() - t0) * 1000.0
        self._model, self._options = model, options
        self._sha256 = model.sha256 or self._manifest.get("sha256") or sha256_file(onnx_file)
        logger.info(
            "loaded %s (%s, %s) in %.0f ms, n_ctx=%d, threads=%d",
            model.name, path, self._kind, self._load_ms, self._n_ctx, options.threads,
        )

    def _context(self, model_ctx: int | None, options: BackendOptions) -> int:
        self._model_ctx = model_ctx
        wanted = options.context_tokens or model_ctx or 2048
        return min(wanted, model_ctx) if model_ctx else wanted

    def _load_genai(self, folder: Path, options: BackendOptions) -> None:
        try:
            import onnxruntime_genai as og
        except Exception as exc:
            raise BackendError(
                "backend_failed", f"onnxruntime-genai is needed for {folder}: {exc}"
            ) from exc
        assert self._tok is not None
        cfg = read_json_object(folder / "genai_config.json")
        session_options: dict[str, Any] = {
            "intra_op_num_threads": options.threads,
            "inter_op_num_threads": 1,
            "enable_mem_pattern": False,
            "enable_cpu_mem_arena": bool(options.extra.get("cpu_mem_arena", False)),
        }
        overlay = {
            "model": {
                # All end-of-generation ids, so min_length (ignore_eos) bans every one of them.
                "eos_token_id": sorted(self._tok.eog_ids),
                "decoder": {"session_options": session_options},
            }
        }
        try:
            config = og.Config(str(folder))
            config.clear_providers()  # CPU
            config.overlay(json.dumps(overlay))
            self._og_model = og.Model(config)
        except Exception as exc:
            raise BackendError(
                "backend_failed", f"onnxruntime-genai could not load {folder}: {exc}"
            ) from exc
        self._kind = "genai"
        self._n_ctx = self._context(cfg.get("model", {}).get("context_length"), options)
        self._quantization = self._manifest.get("quantization") or _genai_precision(folder)

    def _load_plain(self, onnx_file: Path, folder: Path, options: BackendOptions) -> None:
        try:
            import numpy as np
            import onnxruntime as ort
        except Exception as exc:
            raise BackendError("backend_failed", f"onnxruntime is not usable: {exc}") from exc
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.enable_mem_pattern = False
        so.enable_cpu_mem_arena = bool(options.extra.get("cpu_mem_arena", False))
        # Embedded weights are copied out of the parsed protobuf in pieces of a few MB; see
        # the module docstring for why glibc's mmap threshold is pinned while that happens.
        embedded = onnx_file.stat().st_size > _EMBEDDED_WEIGHTS_BYTES
        try:
            with _mmap_threshold_pinned(embedded):
                session = ort.InferenceSession(
                    str(onnx_file), sess_options=so, providers=["CPUExecutionProvider"]
                )
        except Exception as exc:
            raise BackendError(
                "backend_failed", f"onnxruntime could not load {onnx_file}: {exc}"
            ) from exc
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        past = sorted(n for n in inputs if n.startswith("past_key_values"))
        if not past or "input_ids" not in inputs or "logits" not in outputs:
            raise BackendError(
                "bad_request",
                f"{onnx_file} has no past_key_values inputs (inputs: {sorted(inputs)}): without "
                "a KV cache every token re-runs the whole sequence. Export it with past-KV "
                "(optimum-cli export onnx --task text-generation-with-past) or build an "
                "onnxruntime-genai model (`agentctl models prepare NAME --format onnx`).",
            )
        presents = [n.replace("past_key_values", "present", 1) for n in past]
        missing = [p for p in presents if p not in outputs]
        if missing:
            raise BackendError("bad_request", f"{onnx_file}: outputs {missing} are missing")
        first = inputs[past[0]]
        self._kv_dtype = np.float16 if "float16" in first.type else np.float32
        config = read_json_object(folder / "config.json")
        shape = first.shape
        heads = shape[1] if isinstance(shape[1], int) else None
        dim = shape[3] if isinstance(shape[3], int) else None
        n_heads = int(config.get("num_attention_heads", 0) or 0)
        self._kv_heads = int(heads or config.get("num_key_value_heads") or n_heads)
        self._head_dim = int(
            dim or config.get("head_dim") or (int(config.get("hidden_size", 0)) // max(1, n_heads))
        )
        if self._kv_heads <= 0 or self._head_dim <= 0:
            raise BackendError(
                "bad_request", f"{onnx_file}: KV shape unknown and no config.json beside it"
            )
        self._session = session
        self._past_names, self._present_names = past, presents
        self._has_position_ids = "position_ids" in inputs
        self._kind = "plain"
        self._n_ctx = self._context(config.get("max_position_embeddings"), options)
        self._quantization = self._manifest.get("quantization") or _quantization(onnx_file)

    # ---------------------------------------------------------------------- generation

    def _require_loaded(self) -> HfChatTokenizer:
        if self._tok is None or self._kind is None:
            raise BackendError("backend_failed", "no model loaded")
        return self._tok

    def count_tokens(self, request: GenerationRequest) -> int:
        """Number of prompt tokens ``request`` would use (after templating)."""
        tok = self._require_loaded()
        return len(tok.prompt_ids(request.messages, request.prompt, request.prompt_token_ids))

    def generate(self, request: GenerationRequest) -> Iterator[TokenEvent]:
        """Stream tokens as the engine produces them."""
        tok = self._require_loaded()
        ids = tok.prompt_ids(request.messages, request.prompt, request.prompt_token_ids)
        max_tokens = check_context(len(ids), self._n_ctx, request.max_tokens)
        counters: dict[str, Any] = {}
        prefill_start_ns = time.monotonic_ns()
        if self._kind == "genai":
            engine = self._genai_tokens(ids, max_tokens, request, counters)
            name = "onnxruntime-genai"
        else:
            engine = self._plain_tokens(ids, max_tokens, request, counters)
            name = "onnxruntime"
        return token_events(
            engine,
            request=request,
            token_bytes=tok.token_bytes,
            eog_ids=tok.eog_ids,
            n_prompt=len(ids),
            max_tokens=max_tokens,
            prefill_start_ns=prefill_start_ns,
            engine_counters=lambda: counters,
            engine_name=name,
        )

    def _genai_tokens(
        self, ids: list[int], max_tokens: int, request: GenerationRequest,
        counters: dict[str, Any],
    ) -> Iterator[tuple[int, int]]:
        import numpy as np
        import onnxruntime_genai as og

        total = len(ids) + max_tokens
        search: dict[str, Any] = {
            "max_length": total,
            # onnxruntime-genai masks every configured EOS id while the sequence is shorter
            # than min_length (the overlay set them to all end-of-generation ids).
            "min_length": total if request.ignore_eos else 0,
            "do_sample": request.temperature > 0.0,
        }
        if request.temperature > 0.0:
            search.update(temperature=request.temperature, top_k=max(request.top_k, 0),
                          top_p=request.top_p)
            seed = request.seed if request.seed is not None else self._seed()
            search["random_seed"] = int(seed)
        params = og.GeneratorParams(self._og_model)
        params.set_search_options(**search)
        generator = og.Generator(self._og_model, params)
        try:
            t0 = time.monotonic_ns()
            generator.append_tokens(np.asarray(ids, dtype=np.int32))
            counters["t_prefill_ms"] = (time.monotonic_ns() - t0) / 1e6
            counters["n_prefill"] = len(ids)
            steps = 0
            while not generator.is_done():
                generator.generate_next_token()
                token = int(generator.get_next_tokens()[0])
                steps += 1
                counters["n_decode_steps"] = steps
                yield token, time.monotonic_ns()
        finally:
            del generator  # frees the request's KV buffers now, not at the next GC

    def _seed(self) -> int:
        return self._options.seed if self._options else 0

    def _plain_tokens(
        self, ids: list[int], max_tokens: int, request: GenerationRequest,
        counters: dict[str, Any],
    ) -> Iterator[tuple[int, int]]:
        import numpy as np
        import onnxruntime as ort

        tok = self._require_loaded()
        sampler = LogitsSampler(
            request.temperature, request.top_k, request.top_p,
            request.seed if request.seed is not None else self._seed(),
            banned=tok.eog_ids if request.ignore_eos else (),
        )
        session = self._session
        empty = np.zeros((1, self._kv_heads, 0, self._head_dim), dtype=self._kv_dtype)
        past: list[Any] = [ort.OrtValue.ortvalue_from_numpy(empty) for _ in self._past_names]
        binding = session.io_binding()
        step_ids = ids
        pos = 0
        t_run_ms = 0.0
        for step in range(max_tokens):
            n = len(step_ids)
            binding.bind_cpu_input("input_ids", np.asarray([step_ids], dtype=np.int64))
            binding.bind_cpu_input("attention_mask", np.ones((1, pos + n), dtype=np.int64))
            if self._has_position_ids:
                binding.bind_cpu_input(
                    "position_ids", np.arange(pos, pos + n, dtype=np.int64)[None, :]
                )
            for name, value in zip(self._past_names, past, strict=True):
                binding.bind_ortvalue_input(name, value)
            binding.bind_output("logits", "cpu")
            for name in self._present_names:
                binding.bind_output(name, "cpu")
            t0 = time.monotonic_ns()
            session.run_with_iobinding(binding)
            t_run_ms += (time.monotonic_ns() - t0) / 1e6
            outs = binding.get_outputs()
            if step == 0:
                counters["t_prefill_ms"] = t_run_ms
                counters["n_prefill"] = n
            counters["t_run_ms"] = t_run_ms
            counters["n_runs"] = step + 1
            logits = outs[0].numpy()[0, -1]
            past = list(outs[1:])  # present.* become the next past_key_values.* in place
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
            token = sampler(logits)
            yield token, time.monotonic_ns()
            pos += n
            step_ids = [token]

    # ---------------------------------------------------------------------------- info

    def info(self) -> dict[str, Any]:
        """Describe the loaded model and the engine build."""
        import onnxruntime as ort

        engine = "onnxruntime-genai" if self._kind == "genai" else "onnxruntime"
        version = str(ort.__version__)
        if self._kind == "genai":
            import onnxruntime_genai as og

            version = f"{og.__version__} (onnxruntime {ort.__version__})"
        return {
            "backend": self.name,
            "engine": engine,
            "engine_version": version,
            "build_flags": f"providers={','.join(ort.get_available_providers())}; "
                           f"device={ort.get_device()}",
            "model_path": str(self._model.path) if self._model else None,
            "model_sha256": self._sha256,
            "format": "onnx-genai" if self._kind == "genai" else "onnx",
            "quantization": self._quantization,
            "context_tokens": self._n_ctx or None,
            "model_context_tokens": self._model_ctx,
            "threads": self._options.threads if self._options else None,
            "load_ms": self._load_ms,
            "tokenizer": "tokenizers (tokenizer.json)",
            "source_sha256": self._manifest.get("source_sha256"),
            "prepared_as": self._manifest.get("format"),
        }

    def close(self) -> None:
        """Drop the session/model; onnxruntime frees native memory with the last reference."""
        self._og_model = None
        self._session = None
        self._tok = None
        self._kind = None


def _genai_precision(folder: Path) -> str | None:
    """int4/int8/fp32 from the builder's genai_config, when it says (else None)."""
    cfg = read_json_object(folder / "genai_config.json")
    text = json.dumps(cfg.get("model", {}).get("decoder", {}))
    for word in ("int4", "int8", "fp16", "fp32"):
        if word in text:
            return word
    return None


def _quantization(onnx_file: Path) -> str | None:
    """Weight quantization guessed from the graph's operators (None when unknown)."""
    ops = _op_types(onnx_file)
    if "MatMulNBits" in ops:
        return "int4 (MatMulNBits)"
    if ops & {"MatMulInteger", "DynamicQuantizeLinear", "QLinearMatMul", "DynamicQuantizeMatMul"}:
        return "int8"
    return "fp32/fp16 (no quantized ops)" if ops else None


def _op_types(onnx_file: Path) -> set[str]:
    """Operator types of a graph's top-level nodes, read from the protobuf wire format.

    Only ``ModelProto.graph`` (field 7) → ``GraphProto.node`` (1) → ``NodeProto.op_type`` (4)
    is decoded, from a read-only memory map; initializers are skipped by their length prefix
    and never touched. ``onnx.load(..., load_external_data=False)`` still parses embedded
    weights: on the 652 MB optimum export without a manifest it took the load's peak RSS
    from 1.19 GB to 2.27 GB and the load from 4 s to 14 s. Empty set on any malformation.
    """
    import mmap

    def fields(buf: Any, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        """(field number, value start, value end) of length-delimited fields."""
        pos = start
        while pos < end:
            key, pos = _varint(buf, pos)
            wire = key & 7
            if wire == 0:
                _, pos = _varint(buf, pos)
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            elif wire == 2:
                size, pos = _varint(buf, pos)
                if pos + size > end:
                    raise ValueError("truncated field")
                yield key >> 3, pos, pos + size
                pos += size
            else:
                raise ValueError(f"wire type {wire}")

    try:
        with onnx_file.open("rb") as fh, \
                mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            ops: set[str] = set()
            for f_model, g0, g1 in fields(buf, 0, len(buf)):
                if f_model != 7:
                    continue
                for f_graph, n0, n1 in fields(buf, g0, g1):
                    if f_graph != 1:
                        continue
                    for f_node, o0, o1 in fields(buf, n0, n1):
                        if f_node == 4:
                            ops.add(bytes(buf[o0:o1]).decode("utf-8", "replace"))
            return ops
    except (OSError, ValueError, IndexError):
        return set()


def _varint(buf: Any, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


# A model.onnx this large carries its weights inside (external data keeps the graph ~1 MB).
_EMBEDDED_WEIGHTS_BYTES = 64 * 1024 * 1024
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
_MMAP_THRESHOLD_LOAD_BYTES = 128 * 1024  # glibc's initial value
_MMAP_THRESHOLD_RUN_BYTES = 32 * 1024 * 1024  # glibc's dynamic ceiling on 64-bit


@contextlib.contextmanager
def _mmap_threshold_pinned(active: bool) -> Iterator[None]:
    """Keep glibc's mmap threshold at 128 KiB while a session copies embedded weights.

    glibc raises the threshold to the size of each large block freed (up to 32 MiB), so
    after the first few-MB frees (the tokenizer's JSON, protobuf pieces) ONNX Runtime's
    weight copies land on the brk heap, whose freed holes are not returned to the OS, and
    peak RSS grows by a third (1.19 GB against 0.88 GB for the 652 MB fp32 SmolLM2 export;
    same with ``MALLOC_MMAP_THRESHOLD_=131072``). Afterwards the threshold is fixed at the
    dynamic ceiling, so per-step KV and logits buffers keep coming from the heap. A no-op
    where there is no glibc ``mallopt``.
    """
    libc: Any = None
    if active:
        try:
            import ctypes

            libc = ctypes.CDLL(None)
            if not libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_LOAD_BYTES):
                libc = None
        except (OSError, AttributeError):
            libc = None
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_RUN_BYTES)
            libc.mallopt(_M_TRIM_THRESHOLD, 2 * _MMAP_THRESHOLD_RUN_BYTES)
