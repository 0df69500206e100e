"""Cloud fallback: an OpenAI-compatible endpoint through the ``openai`` backend.

DESIGN.md §2/§6: the fleet side never loads a local engine; for fallback it uses
:class:`backends.openai.OpenAIBackend`, which streams ``/v1/chat/completions`` (or
``/v1/completions`` for raw prompts) over SSE with httpx and reports server-counted usage.
Prices are per million tokens (DESIGN.md §5 CPR, cloud side).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends.base import BackendError, BackendOptions, GenerationRequest, ModelSpec


@dataclass(frozen=True)
class CloudConfig:
    """Where the cloud is and what it costs.

    Attributes:
        base_url: e.g. ``https://api.example.com/v1`` or ``http://127.0.0.1:8080/v1``.
        model: The endpoint's model id (None: the server's first model).
        api_key_env: Name of the environment variable holding the API key (never the key).
        prompt_price_per_mtok / completion_price_per_mtok: USD per million tokens.
        timeout_s: HTTP timeout.
    """

    base_url: str
    model: str | None = None
    api_key_env: str | None = None
    prompt_price_per_mtok: float = 0.15
    completion_price_per_mtok: float = 0.60
    timeout_s: float = 120.0

    def cost_usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        """Price of one request."""
        return (prompt_tokens * self.prompt_price_per_mtok
                + completion_tokens * self.completion_price_per_mtok) / 1e6


@dataclass(frozen=True)
class CloudResult:
    """What the cloud returned for one request (text was also streamed to ``on_text``)."""

    text: str
    prompt_tokens: int | None
    completion_tokens: int
    finish_reason: str
    model: str
    cost_usd: float


class CloudClient:
    """A lazily connected :class:`OpenAIBackend` (httpx's client is thread-safe)."""

    def __init__(self, config: CloudConfig) -> None:
        self.config = config
        self._backend: Any = None
        self._lock = threading.Lock()

    def _connect(self) -> Any:
        with self._lock:
            if self._backend is None:
                from backends.openai import OpenAIBackend

                backend = OpenAIBackend()
                extra: dict[str, Any] = {
                    "base_url": self.config.base_url, "timeout_s": self.config.timeout_s,
                    "prompt_price_per_mtok": self.config.prompt_price_per_mtok,
                    "completion_price_per_mtok": self.config.completion_price_per_mtok,
                }
                if self.config.model:
                    extra["model"] = self.config.model
                if self.config.api_key_env:
                    extra["api_key_env"] = self.config.api_key_env
                backend.load(ModelSpec(self.config.model or "cloud", Path("."), "openai"),
                             BackendOptions(threads=1, context_tokens=None, extra=extra))
                self._backend = backend
            return self._backend

    def generate(self, request: Mapping[str, Any], on_text: Callable[[str], None]
                 ) -> CloudResult:
        """Run one request (wire-format fields of ``edgelm.infer.request/1``).

        Raises:
            BackendError: The endpoint failed or refused the request.
        """
        backend = self._connect()
        messages = request.get("messages")
        stop = request.get("stop") or ()
        gen = GenerationRequest(
            max_tokens=int(request.get("max_tokens", 256)),
            messages=tuple(dict(m) for m in messages) if messages else None,
            prompt=request.get("prompt") if not messages else None,
            temperature=float(request.get("temperature", 0.0)),
            top_p=float(request.get("top_p", 1.0)), top_k=int(request.get("top_k", 40)),
            seed=request.get("seed"), ignore_eos=bool(request.get("ignore_eos", False)),
            stop=(stop,) if isinstance(stop, str) else tuple(stop),
        )
        parts: list[str] = []
        prompt_tokens: int | None = None
        completion = 0
        finish = "length"
        for event in backend.generate(gen):
            if event.text:
                parts.append(event.text)
                on_text(event.text)
            if event.final:
                prompt_tokens = event.prompt_tokens
                completion = int(event.completion_tokens or 0)
                finish = str(event.finish_reason or "length")
        info_model = str(getattr(backend, "_model_id", "") or self.config.model or "cloud")
        return CloudResult(
            text="".join(parts), prompt_tokens=prompt_tokens, completion_tokens=completion,
            finish_reason=finish, model=info_model,
            cost_usd=self.config.cost_usd(prompt_tokens or 0, completion),
        )

    def close(self) -> None:
        """Close the HTTP pool."""
        with self._lock:
            if self._backend is not None:
                self._backend.close()
                self._backend = None


__all__ = ["BackendError", "CloudClient", "CloudConfig", "CloudResult"]
