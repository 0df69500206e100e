"""The part of a generation loop every Python-driven engine shares.

An engine loop yields ``(token_id, t_ns)`` pairs as it samples; :func:`token_events` turns
them into the :class:`backends.base.TokenEvent` stream of the contract: it stops on an
end-of-generation id (unless ``ignore_eos``), on a stop string or at the effective
``max_tokens``, emits only UTF-8-complete text, and ends with one final event carrying the
engine-counted prompt and completion tokens. Closing the engine generator on exit lets the
engine loop release per-request state (``GeneratorExit`` inside it).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from backends.base import (
    BackendError,
    FinishReason,
    GenerationRequest,
    StopMatcher,
    TokenEvent,
    Utf8StreamDecoder,
)


def check_context(n_prompt: int, n_ctx: int, requested: int) -> int:
    """Validate the prompt length and return the effective ``max_tokens``.

    Returns:
        ``min(requested, n_ctx - n_prompt)``.

    Raises:
        BackendError: ``bad_request`` for an empty prompt; ``context_overflow`` (with
            ``prompt_tokens`` and ``context_tokens``) when the prompt leaves no room.
    """
    if n_prompt == 0:
        raise BackendError("bad_request", "the prompt is empty after tokenization")
    if n_prompt >= n_ctx:
        raise BackendError(
            "context_overflow",
            f"prompt has {n_prompt} tokens; the context holds {n_ctx}",
            {"prompt_tokens": n_prompt, "context_tokens": n_ctx},
        )
    return min(requested, n_ctx - n_prompt)


def token_events(
    engine_tokens: Iterator[tuple[int, int]],
    *,
    request: GenerationRequest,
    token_bytes: Callable[[int], bytes],
    eog_ids: frozenset[int],
    n_prompt: int,
    max_tokens: int,
    prefill_start_ns: int,
    engine_counters: Callable[[], Mapping[str, Any]],
    engine_name: str,
) -> Iterator[TokenEvent]:
    """Wrap an engine's ``(token_id, t_ns)`` stream into contract events.

    Raises:
        BackendError: ``backend_failed`` when the engine loop raises anything but a
            :class:`BackendError`.
    """
    decoder = Utf8StreamDecoder()
    stopper = StopMatcher(request.stop)
    generated = 0
    finish: FinishReason = "length"
    hit_stop_string = False
    first = True
    with contextlib.closing(engine_tokens) as stream:  # type: ignore[type-var]
        try:
            for token, t_ns in stream:
                if token in eog_ids and not request.ignore_eos:
                    finish = "stop"
                    break
                generated += 1
                text, stopped = stopper.feed(decoder.feed(token_bytes(token)))
                yield TokenEvent(
                    token_ids=(token,),
                    text=text,
                    t_ns=t_ns,
                    prompt_tokens=n_prompt if first else None,
                    prefill_start_ns=prefill_start_ns if first else None,
                )
                first = False
                if stopped:
                    finish = "stop"
                    hit_stop_string = True
                    break
                if generated >= max_tokens:
                    finish = "length"
                    break
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(
                "backend_failed", f"{engine_name} generation failed: {type(exc).__name__}: {exc}"
            ) from exc
    tail = ""
    if not hit_stop_string:
        rest, hit = stopper.feed(decoder.flush())
        tail = rest if hit else rest + stopper.flush()
    yield TokenEvent(
        text=tail,
        t_ns=time.monotonic_ns(),
        final=True,
        prompt_tokens=n_prompt,
        completion_tokens=generated,
        finish_reason=finish,
        engine={"engine": engine_name, **engine_counters()},
    )
