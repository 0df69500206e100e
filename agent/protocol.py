"""The MQTT wire contract (DESIGN.md §4): topics, request parsing, payload envelopes.

Topics live under ``edgelm/v1/{fleet}/{device}``. Every payload is a UTF-8 JSON object with
``schema``, ``device``, ``ts_unix_ms`` and a per-device monotonically increasing ``seq``
(receivers deduplicate by ``(device, seq)``). JSON Schemas for each payload are shipped in
``agent/schemas/`` and the tests validate every published message against them.

Request fields (``edgelm.infer.request/1``):

- ``id`` (string, 1–128 chars): the idempotency key; echoed on every reply.
- ``messages`` (list of ``{role, content}``) or ``prompt`` (string): exactly one.
- ``max_tokens`` (int ≥ 1; clamped to the context left after the prompt).
- ``temperature`` (≥ 0, 0 = greedy), ``top_p`` (0–1], ``top_k`` (≥ 0), ``seed``, ``stop``
  (string or list of strings), ``ignore_eos`` (bool), ``stream`` (bool, default true).
- ``deadline_ms`` (int > 0): budget from receipt, in ms, relative so that clock skew between
  client and device (a Pi without RTC) cannot expire requests early.
- ``model`` (optional): must name the loaded model (name or sha256), else ``unknown_model``.
- ``client_id`` (optional string): the key of the per-client rate limit (else the reply topic).

Operator commands arrive on ``cmd/{bench,reload,drain}`` (authorised by broker ACLs) as a JSON
object with an optional ``id`` and the command's options; the answer
(``edgelm.cmd.result/1``) goes to the v5 response topic or ``cmd/{name}/result``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.errors import RequestError, short_repr

TOPIC_ROOT = "edgelm/v1"
REQUEST_SCHEMA = "edgelm.infer.request/1"
CHUNK_SCHEMA = "edgelm.infer.chunk/1"
RESULT_SCHEMA = "edgelm.infer.result/1"
STATUS_SCHEMA = "edgelm.status/1"
TELEMETRY_SCHEMA = "edgelm.telemetry/1"
CMD_RESULT_SCHEMA = "edgelm.cmd.result/1"
COMMANDS = ("bench", "reload", "drain")

_SEGMENT = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_MAX_ID_CHARS = 128
MAX_TOKENS_LIMIT = 1 << 20
_ROLES = frozenset({"system", "user", "assistant", "tool"})


def validate_segment(kind: str, value: str) -> str:
    """Check a fleet or device id: 1–64 of ``[A-Za-z0-9_.:-]`` (no MQTT wildcards or ``/``).

    Raises:
        ValueError: Naming the bad value.
    """
    if not _SEGMENT.fullmatch(value):  # match() with `$` would accept a trailing newline
        raise ValueError(
            f"{kind} {short_repr(value)} must be 1-64 characters of letters, digits, "
            "'_', '.', ':' or '-'"
        )
    return value


@dataclass(frozen=True)
class Topics:
    """Topic names for one device."""

    fleet: str
    device: str

    @property
    def prefix(self) -> str:
        """``edgelm/v1/{fleet}/{device}``."""
        return f"{TOPIC_ROOT}/{self.fleet}/{self.device}"

    @property
    def status(self) -> str:
        """Retained online/offline status."""
        return f"{self.prefix}/status"

    @property
    def telemetry(self) -> str:
        """Periodic readings."""
        return f"{self.prefix}/telemetry"

    @property
    def request(self) -> str:
        """Requests addressed to this device."""
        return f"{self.prefix}/infer/request"

    @property
    def fleet_request(self) -> str:
        """Fleet-wide requests (consumed through a shared subscription)."""
        return f"{TOPIC_ROOT}/{self.fleet}/infer/request"

    def response(self, request_id: str) -> str:
        """Reply topic for clients without MQTT v5 response topics."""
        return f"{self.prefix}/infer/response/{request_id}"

    @property
    def bench_result(self) -> str:
        """Bench records."""
        return f"{self.prefix}/bench/result"


@dataclass(frozen=True)
class InferRequest:
    """A validated inference request."""

    id: str
    max_tokens: int
    messages: tuple[Mapping[str, str], ...] | None
    prompt: str | None
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    ignore_eos: bool
    stream: bool
    deadline_ms: int | None
    model: str | None
    client_id: str | None = None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(float(value)))


_ID_PEEK = re.compile(rb'"id"\s*:\s*"([^"\\/+#]{1,128})"')


def peek_request_id(payload: bytes, max_parse_bytes: int = 1 << 20) -> str | None:
    """Best-effort id of a request that failed validation, so its error can be answered.

    A payload over ``max_parse_bytes`` is not JSON-decoded (that would cost memory and CPU on
    exactly the messages the limit exists for); its first 4 KiB are searched for ``"id"``.
    """
    if len(payload) > max_parse_bytes:
        m = _ID_PEEK.search(payload[:4096])
        if m is None:
            return None
        try:
            return m.group(1).decode("utf-8")
        except UnicodeDecodeError:
            return None
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if isinstance(obj, dict):
        rid = obj.get("id")
        if (isinstance(rid, str) and 0 < len(rid) <= _MAX_ID_CHARS
                and not set(rid) & {"/", "+", "#"}):
            return rid
    return None


def parse_command(name: str, payload: bytes, max_bytes: int = 64 * 1024) -> dict[str, Any]:
    """Validate an operator command (``cmd/{name}``) and return its options.

    Raises:
        RequestError: ``bad_request`` naming the problem (unknown command, bad option).
    """
    if name not in COMMANDS:
        raise RequestError("bad_request", f"unknown command {name!r}; known: {', '.join(COMMANDS)}")
    if len(payload) > max_bytes:
        raise RequestError("too_large", f"command payload over {max_bytes} bytes")
    obj: Any = {}
    if payload.strip():
        try:
            obj = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise RequestError("bad_request", f"command payload is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise RequestError("bad_request", "command payload must be a JSON object")
    cid = obj.get("id")
    if cid is not None and (not isinstance(cid, str) or not 0 < len(cid) <= _MAX_ID_CHARS):
        raise RequestError("bad_request", "'id' must be a string of 1-128 characters")
    allowed: dict[str, tuple[type, int, int]] = {
        "bench": {"max_tokens": (int, 1, 512), "runs": (int, 1, 20), "warmup": (int, 0, 5)},
        "reload": {},
        "drain": {},
    }[name]  # type: ignore[assignment]
    flags = {"bench": {"ignore_eos"}, "drain": {"resume"}, "reload": set()}[name]
    for key, value in obj.items():
        if key == "id":
            continue
        if key in flags:
            if not isinstance(value, bool):
                raise RequestError("bad_request", f"'{key}' must be a boolean", cid)
            continue
        if key not in allowed:
            raise RequestError("bad_request", f"unknown option {key!r} for cmd/{name}", cid)
        _, lo, hi = allowed[key]
        if not _is_int(value) or not lo <= value <= hi:
            raise RequestError("bad_request", f"'{key}' must be an integer in {lo}..{hi}", cid)
    return obj


def parse_request(payload: bytes, max_payload_bytes: int) -> InferRequest:
    """Validate a request payload.

    Raises:
        RequestError: ``too_large`` or ``bad_request`` with a message naming the field, and the
            request id when it could be read.
    """
    rid = None
    if len(payload) > max_payload_bytes:
        raise RequestError(
            "too_large",
            f"payload is {len(payload)} bytes; the limit is {max_payload_bytes}",
            None,
            {"payload_bytes": len(payload), "limit_bytes": max_payload_bytes},
        )
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError("bad_request", f"payload is not valid UTF-8: {exc}") from None
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise RequestError("bad_request", f"payload is not JSON: {exc}") from None
    except RecursionError:
        raise RequestError("bad_request", "payload is not JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise RequestError("bad_request", "payload must be a JSON object")
    rid = obj.get("id")
    if not isinstance(rid, str) or not rid:
        raise RequestError("bad_request", "'id' must be a non-empty string")
    if len(rid) > _MAX_ID_CHARS or "/" in rid or "+" in rid or "#" in rid:
        raise RequestError("bad_request", "'id' must be at most 128 characters, without / + #")

    def bad(message: str) -> RequestError:
        return RequestError("bad_request", message, rid)

    known = {"schema", "id", "messages", "prompt", "max_tokens", "temperature", "top_p", "top_k",
             "seed", "stop", "ignore_eos", "stream", "deadline_ms", "model", "client_id"}
    unknown = sorted(set(obj) - known)
    if unknown:
        raise bad(f"unknown field(s): {', '.join(unknown)}")
    # The schema allows null nowhere; "null = default" would make a request valid for this
    # parser but not for the schema every other consumer validates with.
    nulls = sorted(k for k, v in obj.items() if v is None)
    if nulls:
        raise bad(f"field(s) {', '.join(nulls)} must not be null (leave a field out for its "
                  "default)")
    schema = obj.get("schema", REQUEST_SCHEMA)
    if schema != REQUEST_SCHEMA:
        raise bad(f"unsupported schema {schema!r}; this agent speaks {REQUEST_SCHEMA}")
    messages = obj.get("messages")
    prompt = obj.get("prompt")
    if (messages is None) == (prompt is None):
        raise bad("exactly one of 'messages' or 'prompt' is required")
    parsed_messages: tuple[Mapping[str, str], ...] | None = None
    if messages is not None:
        if not isinstance(messages, list) or not messages:
            raise bad("'messages' must be a non-empty list")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or set(m) - {"role", "content", "name"}:
                raise bad(f"messages[{i}] must be an object with 'role' and 'content'")
            role, content = m.get("role"), m.get("content")
            if role not in _ROLES:
                raise bad(f"messages[{i}].role must be one of {sorted(_ROLES)}")
            if not isinstance(content, str):
                raise bad(f"messages[{i}].content must be a string")
            out.append({"role": role, "content": content})
        parsed_messages = tuple(out)
    if prompt is not None and (not isinstance(prompt, str) or not prompt):
        raise bad("'prompt' must be a non-empty string")
    max_tokens = obj.get("max_tokens", 256)
    if not _is_int(max_tokens) or max_tokens < 1 or max_tokens > MAX_TOKENS_LIMIT:
        raise bad(f"'max_tokens' must be an integer in 1..{MAX_TOKENS_LIMIT}")
    temperature = obj.get("temperature", 0.0)
    if not _is_number(temperature) or not 0 <= temperature <= 10:
        raise bad("'temperature' must be a number in [0, 10]")
    top_p = obj.get("top_p", 1.0)
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise bad("'top_p' must be a number in (0, 1]")
    top_k = obj.get("top_k", 40)
    if not _is_int(top_k) or top_k < 0:
        raise bad("'top_k' must be a non-negative integer")
    seed = obj.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**32):
        raise bad("'seed' must be an integer in [0, 2^32)")
    stop = obj.get("stop", [])
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 8 or not all(
        isinstance(s, str) and s for s in stop
    ):
        raise bad("'stop' must be a string or a list of at most 8 non-empty strings")
    for flag in ("ignore_eos", "stream"):
        if flag in obj and not isinstance(obj[flag], bool):
            raise bad(f"'{flag}' must be a boolean")
    deadline = obj.get("deadline_ms")
    if deadline is not None and (not _is_int(deadline) or deadline <= 0):
        raise bad("'deadline_ms' must be a positive integer (milliseconds from receipt)")
    model = obj.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise bad("'model' must be a non-empty string")
    if "client_id" in obj and not isinstance(obj["client_id"], str):
        raise bad("'client_id' must be a string")
    return InferRequest(
        id=rid, max_tokens=int(max_tokens), messages=parsed_messages, prompt=prompt,
        temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
        seed=int(seed) if seed is not None else None, stop=tuple(stop),
        ignore_eos=bool(obj.get("ignore_eos", False)), stream=bool(obj.get("stream", True)),
        deadline_ms=int(deadline) if deadline is not None else None, model=model,
        client_id=obj.get("client_id"),
    )
