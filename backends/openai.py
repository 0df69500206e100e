"""OpenAI-compatible backend: any ``/v1/chat/completions`` endpoint, streamed over SSE.

This is the cloud fallback of DESIGN.md §6 and a way to compare against a local server
(llama-cpp-python's ``python -m llama_cpp.server`` on the same GGUF). It speaks the OpenAI
wire protocol with ``httpx``:

- ``stream: true`` answers with Server-Sent Events, one ``data: {json}`` line per chunk and a
  final ``data: [DONE]`` (OpenAI API reference, "Chat completions → streaming").
- ``stream_options: {"include_usage": true}`` asks for one extra chunk with ``usage``
  (``prompt_tokens``, ``completion_tokens``) counted by the server's tokenizer. Servers that
  ignore it (llama-cpp-python 0.3.36 does) leave the counts to a fallback, and ``info()`` /
  the final event say which one was used (``token_counts``).
- Token ids are not part of the protocol, so each content chunk is reported with the
  sentinel id ``-1`` (one chunk per sampled token on llama-cpp-python and vLLM); counts never
  come from those ids when the server reports usage.
- ``ignore_eos`` becomes ``logit_bias`` −100 on the configured end-of-generation ids
  (``eog_token_ids``), which the OpenAI API and llama-cpp-python honour; without ids it is
  sent as the vLLM / llama.cpp-server extension field ``ignore_eos``.
- llama-cpp-python's server applies ``repeat_penalty=1.1`` by default even at temperature 0
  (``llama_cpp/server/types.py``), so its greedy text differs from plain greedy decoding;
  ``extra_body={"repeat_penalty": 1.0}`` turns it off. ``extra_body`` is merged into every
  request body, for such server-specific fields.

Configuration (``BackendOptions.extra``): ``base_url`` (e.g. ``http://127.0.0.1:8080/v1``),
``api_key_env`` (the NAME of the environment variable holding the key; never the key itself),
``model`` (the server's model id; default: the model spec's name), ``prompt_price_per_mtok`` /
``completion_price_per_mtok`` (currency per million tokens, for CPR), ``context_tokens`` (the
server's window, when known; reported), ``timeout_s``, ``eog_token_ids``, ``extra_body``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterator
from typing import Any, ClassVar

from backends.base import (
    Availability,
    Backend,
    BackendError,
    BackendOptions,
    FinishReason,
    GenerationRequest,
    ModelSpec,
    StopMatcher,
    TokenEvent,
)

logger = logging.getLogger(__name__)

# "Requested tokens (5000) exceed context window of 2048" (llama-cpp-python),
# "This model's maximum context length is 4097 tokens. However, you requested 5000 tokens"
# (OpenAI), "... maximum context length is 2048 tokens ... (5000 in the messages" (vLLM).
_OVERFLOW_PATTERNS = (
    re.compile(r"Requested tokens \((\d+)\) exceed context window of (\d+)"),
    re.compile(
        r"maximum context length is (\d+) tokens.*?\((\d+) in (?:the messages|your prompt)", re.S
    ),
    re.compile(r"maximum context length is (\d+) tokens.*?requested (\d+) tokens", re.S),
)


def _requested_completion(text: str) -> int | None:
    m = re.search(r"(\d+) in the completion", text)
    return int(m.group(1)) if m else None


class OpenAIBackend(Backend):
    """A remote (or local) OpenAI-compatible server."""

    name: ClassVar[str] = "openai"
    formats: ClassVar[tuple[str, ...]] = ("openai",)

    def __init__(self) -> None:
        self._client: Any = None
        self._base_url = ""
        self._model_id = ""
        self._options: BackendOptions | None = None
        self._extra: dict[str, Any] = {}
        self._server_usage: bool | None = None
        self._server_info: dict[str, Any] = {}
        self._load_ms: float | None = None

    @classmethod
    def check(cls) -> Availability:
        """Check that httpx imports."""
        try:
            import httpx  # noqa: F401
        except Exception as exc:
            return Availability(False, f"httpx is not usable: {exc}; install the 'openai' extra")
        return Availability(True)

    def load(self, model: ModelSpec, options: BackendOptions) -> None:
        """Connect: check the endpoint answers ``GET /models`` and knows the model."""
        try:
            import httpx
        except ImportError as exc:
            raise BackendError("backend_failed", f"httpx is not installed: {exc}") from exc
        extra = dict(options.extra)
        base_url = str(extra.get("base_url") or os.environ.get("EDGELM_OPENAI_BASE_URL", ""))
        if not base_url:
            raise BackendError(
                "bad_request", "the openai backend needs base_url (e.g. http://127.0.0.1:8080/v1)"
            )
        headers = {"Accept": "text/event-stream"}
        key_env = extra.get("api_key_env")
        if key_env:
            key = os.environ.get(str(key_env))
            if not key:
                raise BackendError(
                    "bad_request", f"api_key_env names {key_env!r}, which is not set"
                )
            headers["Authorization"] = f"Bearer {key}"
        timeout = float(extra.get("timeout_s", 120.0))
        t0 = time.monotonic()
        self._client = httpx.Client(
            base_url=base_url.rstrip("/"), headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
        )
        self._base_url = base_url.rstrip("/")
        self._model_id = str(extra.get("model") or model.name)
        self._options, self._extra = options, extra
        try:
            resp = self._client.get("/models")
            resp.raise_for_status()
            ids = [str(m.get("id")) for m in resp.json().get("data", [])]
        except Exception as exc:
            self.close()
            raise BackendError(
                "backend_failed", f"OpenAI endpoint {self._base_url} is not reachable: {exc}"
            ) from exc
        if ids and self._model_id not in ids and not extra.get("model"):
            # A single-model server (llama-cpp-python) names its model by path: use that.
            self._model_id = ids[0]
        self._server_info = {"models": ids}
        self._load_ms = (time.monotonic() - t0) * 1000.0

    def _body(self, request: GenerationRequest, max_tokens: int) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {
            "model": self._model_id,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
        }
        if request.temperature > 0 and request.top_k > 0:
            body["top_k"] = request.top_k  # an extension (vLLM, llama.cpp); others ignore it
        if request.seed is not None:
            body["seed"] = request.seed
        elif self._options is not None:
            body["seed"] = self._options.seed
        if request.stop:
            body["stop"] = list(request.stop)
        if request.ignore_eos:
            eog = self._extra.get("eog_token_ids") or []
            if eog:
                body["logit_bias"] = {str(int(t)): -100 for t in eog}
            else:
                body["ignore_eos"] = True  # vLLM / llama.cpp-server extension
        body.update(self._extra.get("extra_body") or {})
        if request.messages is not None:
            body["messages"] = [dict(m) for m in request.messages]
            return "/chat/completions", body
        if request.prompt is not None:
            body["prompt"] = request.prompt
        elif request.prompt_token_ids is not None:
            body["prompt"] = list(request.prompt_token_ids)
        else:
            raise BackendError("bad_request", "a request needs messages, prompt or token ids")
        return "/completions", body

    def generate(self, request: GenerationRequest) -> Iterator[TokenEvent]:
        """Stream the server's SSE chunks as token events."""
        if self._client is None:
            raise BackendError("backend_failed", "no endpoint loaded")
        ctx = self._extra.get("context_tokens")
        max_tokens = request.max_tokens
        path, body = self._body(request, max_tokens)
        return self._stream(path, body, request, int(ctx) if ctx else None)

    def _stream(
        self, path: str, body: dict[str, Any], request: GenerationRequest, ctx: int | None
    ) -> Iterator[TokenEvent]:
        import httpx

        stopper = StopMatcher(request.stop)
        chunks = 0
        usage: dict[str, Any] | None = None
        finish: FinishReason = "length"
        server_finish: str | None = None
        hit_stop = False
        done = False
        first = True
        prefill_start_ns = time.monotonic_ns()
        try:
            with self._client.stream("POST", path, json=body) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise self._http_error(resp.status_code, resp.text, ctx)
                for line in resp.iter_lines():
                    if not line.startswith("data:"):
                        continue  # SSE comments (": ping") and blank separators
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if chunk.get("error"):
                        raise self._http_error(400, json.dumps(chunk["error"]), ctx)
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for choice in chunk.get("choices") or []:
                        delta = choice.get("delta") or {}
                        text = delta.get("content") if "delta" in choice else choice.get("text")
                        if choice.get("finish_reason"):
                            server_finish = str(choice["finish_reason"])
                        if not text:
                            continue
                        t_ns = time.monotonic_ns()
                        chunks += 1
                        out, stopped = stopper.feed(str(text))
                        yield TokenEvent(
                            token_ids=(-1,),
                            text=out,
                            t_ns=t_ns,
                            prefill_start_ns=prefill_start_ns if first else None,
                        )
                        first = False
                        if stopped:
                            hit_stop = True
                            break
                    if hit_stop:
                        break
        except BackendError:
            raise
        except (httpx.HTTPError, ValueError) as exc:
            raise BackendError(
                "backend_failed", f"OpenAI endpoint {self._base_url}: {type(exc).__name__}: {exc}"
            ) from exc
        if not done and not hit_stop and chunks == 0:
            # llama-cpp-python answers an oversized streamed prompt with "200 OK" and an
            # aborted, empty stream (the ValueError is only logged server-side). Ask once
            # without streaming, which returns the OpenAI-style 400 with the counts.
            raise self._probe_error(path, body, ctx)
        if hit_stop or server_finish == "stop":
            finish = "stop"
        tail = "" if hit_stop else stopper.flush()
        self._server_usage = usage is not None
        prompt_tokens = int(usage["prompt_tokens"]) if usage else None
        completion = int(usage["completion_tokens"]) if usage else chunks
        if usage and hit_stop:
            completion = min(completion, chunks)  # the server went on after our stop string
        yield TokenEvent(
            text=tail,
            t_ns=time.monotonic_ns(),
            final=True,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion,
            finish_reason=finish,
            engine={
                "engine": "openai-compatible",
                "token_counts": "server usage" if usage else "stream chunks (no usage sent)",
                "server_finish_reason": server_finish,
                "stream_chunks": chunks,
                "cost": self._cost(prompt_tokens or 0, completion),
            },
        )

    def _cost(self, prompt_tokens: int, completion_tokens: int) -> float | None:
        p_in = self._extra.get("prompt_price_per_mtok")
        p_out = self._extra.get("completion_price_per_mtok")
        if p_in is None and p_out is None:
            return None
        return (prompt_tokens * float(p_in or 0) + completion_tokens * float(p_out or 0)) / 1e6

    def _probe_error(self, path: str, body: dict[str, Any], ctx: int | None) -> BackendError:
        probe = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        probe["max_tokens"] = 1
        last: Exception | None = None
        resp = None
        for _attempt in range(2):  # the aborted stream may have left a dead pooled connection
            try:
                resp = self._client.post(path, json=probe)
                break
            except Exception as exc:
                last = exc
        if resp is None:
            return BackendError("backend_failed", f"the stream ended without [DONE]: {last}")
        if resp.status_code >= 400:
            return self._http_error(resp.status_code, resp.text, ctx)
        return BackendError("backend_failed", "the server ended the stream without [DONE]")

    def _http_error(self, status: int, text: str, ctx: int | None) -> BackendError:
        for pattern in _OVERFLOW_PATTERNS:
            m = pattern.search(text)
            if m:
                a, b = int(m.group(1)), int(m.group(2))
                prompt, context = (a, b) if pattern is _OVERFLOW_PATTERNS[0] else (b, a)
                if pattern is _OVERFLOW_PATTERNS[2]:
                    prompt = b - int(body_max) if (body_max := _requested_completion(text)) else b
                return BackendError(
                    "context_overflow",
                    f"prompt has {prompt} tokens; the server's context holds {context}",
                    {"prompt_tokens": prompt, "context_tokens": context},
                )
        if "context" in text.lower() and status == 400:
            return BackendError(
                "context_overflow", f"the server refused the prompt: {text[:300]}",
                {"context_tokens": ctx} if ctx else {},
            )
        code = "bad_request" if 400 <= status < 500 else "backend_failed"
        return BackendError(code, f"OpenAI endpoint answered HTTP {status}: {text[:300]}")

    def info(self) -> dict[str, Any]:
        """Describe the endpoint and how tokens were counted."""
        import httpx

        counts = {None: "unknown (no request yet)", True: "server usage",
                  False: "stream chunks (server sent no usage)"}[self._server_usage]
        return {
            "backend": self.name,
            "engine": "openai-compatible",
            "engine_version": f"httpx {httpx.__version__}",
            "build_flags": "",
            "base_url": self._base_url,
            "model": self._model_id,
            "model_path": None,
            "model_sha256": None,
            "format": "openai",
            "quantization": None,
            "context_tokens": self._extra.get("context_tokens"),
            "threads": self._options.threads if self._options else None,
            "load_ms": self._load_ms,
            "token_counts": counts,
            "prompt_price_per_mtok": self._extra.get("prompt_price_per_mtok"),
            "completion_price_per_mtok": self._extra.get("completion_price_per_mtok"),
            "server": self._server_info,
        }

    def close(self) -> None:
        """Close the HTTP connection pool."""
        if self._client is not None:
            self._client.close()
            self._client = None
