"""The backend contract: one interface for every inference engine.

A backend loads one model and turns a :class:`GenerationRequest` into a stream of
:class:`TokenEvent` objects. Timestamps are ``time.monotonic_ns()`` values (CLOCK_MONOTONIC on
Linux), which are comparable across processes on the same machine, so the agent can time a
generation that runs in its worker process.

Token counts always come from the engine's tokenizer and sampler, never from counting stream
chunks: one chunk may carry several tokens, or none when a UTF-8 character is split.

Third-party backends register under the ``edgelm.backends`` entry-point group and need only
this module; nothing here imports from ``agent``.
"""

from __future__ import annotations

import abc
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

FinishReason = Literal["stop", "length", "error"]


class BackendError(Exception):
    """A backend failure with a stable, wire-visible error code.

    Attributes:
        code: One of the DESIGN.md §4 codes (``context_overflow``, ``backend_failed``,
            ``unknown_model``, ``bad_request``).
        details: Extra JSON-ready facts (e.g. token counts for ``context_overflow``).
    """

    def __init__(self, code: str, message: str, details: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = dict(details or {})

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.code, self.message, self.details))


@dataclass(frozen=True)
class Availability:
    """Whether a backend's engine can run here (library importable, build usable)."""

    ok: bool
    reason: str = ""


@dataclass(frozen=True)
class ModelSpec:
    """A model file or directory the backend should load.

    Attributes:
        name: The user-facing name (``smollm2-135m``) or the path given.
        path: The file (GGUF, .tflite, model.onnx) or folder (onnxruntime-genai).
        format: ``gguf``, ``onnx``, ``onnx-genai`` or ``tflite``.
        sha256: Hex digest of the file, when known (recomputed by the backend otherwise).
    """

    name: str
    path: Path
    format: str
    sha256: str | None = None


@dataclass(frozen=True)
class BackendOptions:
    """Load-time options common to all engines.

    Attributes:
        threads: Threads for decode and prefill; must be a positive count (resolve ``auto``
            with :func:`resolve_threads` first).
        context_tokens: Context window to allocate, in tokens (None: engine/model default,
            capped to keep memory bounded).
        seed: Sampler seed for non-greedy decoding.
        extra: Engine-specific options.
    """

    threads: int
    context_tokens: int | None = 2048
    seed: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GenerationRequest:
    """One generation.

    Exactly one of ``messages`` (chat, templated by the model's chat template), ``prompt``
    (raw text, no template) or ``prompt_token_ids`` (exact tokens, for synthetic benchmarks)
    is set.

    Attributes:
        max_tokens: Upper bound on generated tokens; the engine applies
            ``min(max_tokens, context - prompt_tokens)``.
        temperature: 0 means greedy.
        ignore_eos: Keep generating past end-of-generation tokens until ``max_tokens``.
        stop: Strings that end the generation (not included in the output).
    """

    max_tokens: int
    messages: tuple[Mapping[str, str], ...] | None = None
    prompt: str | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 40
    seed: int | None = None
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class TokenEvent:
    """One step of a generation stream.

    Non-final events carry the token id(s) sampled in this step and the text that became
    complete with them (possibly empty while a multi-byte character is still partial).
    The final event carries no new token and the engine's counts.

    Attributes:
        token_ids: Token ids produced in this step.
        text: UTF-8-complete text delta.
        t_ns: ``time.monotonic_ns()`` when the engine produced the token(s).
        final: True on the last event of a stream.
        prompt_tokens: Engine-counted prompt tokens (final event; also set on the first).
        completion_tokens: Engine-counted generated tokens (final event).
        finish_reason: ``stop``, ``length`` or ``error`` (final event).
        prefill_start_ns: When prompt evaluation started (set on the first token event).
        engine: Engine-reported counters (e.g. llama.cpp's perf context), final event only.
    """

    token_ids: tuple[int, ...] = ()
    text: str = ""
    t_ns: int = 0
    final: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: FinishReason | None = None
    prefill_start_ns: int | None = None
    engine: Mapping[str, Any] | None = None


class Backend(abc.ABC):
    """An inference engine. One instance holds at most one loaded model.

    Instances are not thread-safe: one generation at a time (the agent's worker guarantees it).
    """

    name: ClassVar[str]
    formats: ClassVar[tuple[str, ...]]

    @classmethod
    @abc.abstractmethod
    def check(cls) -> Availability:
        """Report whether the engine library is importable and usable. Never raises."""

    @abc.abstractmethod
    def load(self, model: ModelSpec, options: BackendOptions) -> None:
        """Load ``model``. Raises :class:`BackendError` on failure."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> Iterator[TokenEvent]:
        """Stream a generation; the last event has ``final=True``.

        Raises:
            BackendError: ``context_overflow`` (with ``prompt_tokens`` and
                ``context_tokens`` in details) before any token, or ``backend_failed``.
        """

    @abc.abstractmethod
    def info(self) -> dict[str, Any]:
        """Model hash, format, quantization, context, threads, engine version and build."""

    @abc.abstractmethod
    def close(self) -> None:
        """Free the model and engine resources."""


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (a 98 MB GGUF takes about 0.3 s)."""
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


class Utf8StreamDecoder:
    """Turns per-token byte pieces into complete UTF-8 text.

    Byte-level BPE vocabularies (GPT-2 style, as SmolLM2 uses) split multi-byte characters
    across tokens; decoding each token alone would emit U+FFFD. Bytes are held back until the
    character is complete.
    """

    def __init__(self) -> None:
        import codecs

        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        """Add bytes; return the text that is now complete."""
        return self._decoder.decode(data, final=False)

    def flush(self) -> str:
        """Return what is left at the end of the stream (invalid tails become U+FFFD)."""
        return self._decoder.decode(b"", final=True)


class StopMatcher:
    """Finds stop strings in streamed text, holding back possible partial matches.

    Text that could be the start of a stop string is not released until it is known not to
    be one, so a stop string never leaks to the client split across two chunks.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop string was reached)."""
        if not self._stops:
            return text, False
        buf = self._pending + text
        cut = min((i for i in (buf.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._pending = ""
            return buf[:cut], True
        hold = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        self._pending = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """Release held-back text at the end of the stream."""
        out, self._pending = self._pending, ""
        return out


def resolve_threads(
    requested: int | str | None, root: str | os.PathLike[str] = "/"
) -> tuple[int, str]:
    """Resolve a thread setting to a positive count, and say how it was chosen.

    ``auto`` (or None) is the minimum of the physical cores (SMT siblings count once, as
    extra hyper-threads slow llama.cpp's matmuls down), the cgroup v2 CPU quota
    (``cpu.max`` = ``"quota period"`` in µs, or ``"max"``) and the scheduler affinity mask.

    Args:
        requested: A positive int, a digit string, ``"auto"`` or None.
        root: Filesystem root for ``/sys`` and ``/proc`` reads (tests pass a fixture tree).

    Returns:
        (threads, how) where ``how`` explains the choice, e.g. ``"auto: min(physical=2, …)"``.

    Raises:
        ValueError: For zero, negative or non-numeric values other than ``auto``.
    """
    if requested is not None and str(requested).strip().lower() != "auto":
        try:
            if isinstance(requested, str) and not requested.strip().isascii():
                raise ValueError  # int() reads '٣' (Arabic-Indic digits) as 3
            n = int(requested)
        except (TypeError, ValueError):
            raise ValueError(
                f"threads must be a positive integer or 'auto', got {requested!r}"
            ) from None
        if n <= 0:
            raise ValueError(f"threads must be a positive integer or 'auto', got {n}")
        return n, "configured"
    base = Path(root)
    affinity = len(os.sched_getaffinity(0)) if str(root) == "/" else None
    physical = _physical_cores(base)
    quota = _cgroup_cpu_quota(base)
    parts = {"physical": physical, "cgroup_quota": quota, "affinity": affinity}
    known = [v for v in parts.values() if v]
    n = max(1, min(known)) if known else max(1, os.cpu_count() or 1)
    how = "auto: min(" + ", ".join(f"{k}={v}" for k, v in parts.items() if v) + ")"
    return n, how


def _physical_cores(root: Path) -> int | None:
    cpu_dir = root / "sys/devices/system/cpu"
    cores: set[str] = set()
    try:
        cpus = sorted(cpu_dir.glob("cpu[0-9]*"))
    except OSError:
        return None
    for cpu in cpus:
        try:
            online = (cpu / "online").read_text().strip()
            if online == "0":
                continue
        except OSError:
            pass  # cpu0 usually has no "online" file: it cannot be taken offline
        try:
            cores.add((cpu / "topology/thread_siblings_list").read_text().strip())
        except OSError:
            return None
    return len(cores) or None


def _cgroup_cpu_quota(root: Path) -> int | None:
    try:
        text = (root / "sys/fs/cgroup/cpu.max").read_text().split()
    except OSError:
        return None
    if len(text) != 2 or text[0] == "max":
        return None
    try:
        quota, period = int(text[0]), int(text[1])
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return max(1, -(-quota // period))  # ceil: a 1.5-CPU quota still runs 2 threads usefully


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object file's contents; ``{}`` when it is missing, unreadable or not an object.

    For optional side files (``manifest.json``, ``genai_config.json`` …) whose absence
    only means less is known about a model.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
