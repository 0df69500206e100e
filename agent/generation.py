"""Run one generation through the worker and turn its event stream into a result.

Used by both ``agentctl bench``/``infer`` and the daemon, so every path measures the same way.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.metrics import RequestTimings, compute_timings
from agent.worker import InferenceWorker
from backends.base import GenerationRequest, TokenEvent


@dataclass
class GenerationResult:
    """Everything one generation produced, with its timings.

    Attributes:
        text: The whole generated text.
        prompt_tokens: Engine-counted prompt tokens.
        completion_tokens: Engine-counted generated tokens.
        finish_reason: ``stop`` or ``length``.
        timings: Metrics per DESIGN.md §5.
        accepted_ns / started_ns / prefill_start_ns / first_token_ns / last_token_ns:
            ``time.monotonic_ns()`` marks, kept for energy windows.
        token_times_ns: One timestamp per token event.
        engine: Engine-reported counters.
    """

    text: str
    prompt_tokens: int | None
    completion_tokens: int
    finish_reason: str
    timings: RequestTimings
    accepted_ns: int
    started_ns: int
    prefill_start_ns: int | None
    first_token_ns: int | None
    last_token_ns: int | None
    end_ns: int
    token_times_ns: list[int] = field(default_factory=list)
    engine: dict[str, Any] = field(default_factory=dict)


def run_generation(
    worker: InferenceWorker,
    request: GenerationRequest,
    *,
    accepted_ns: int | None = None,
    deadline_mono: float | None = None,
    on_event: Callable[[TokenEvent], None] | None = None,
    on_batch: Callable[[list[TokenEvent]], None] | None = None,
) -> GenerationResult:
    """Generate, calling ``on_event`` for each token event, and measure.

    ``on_batch``, when given, is called after the events of each worker message (see
    :meth:`agent.worker.InferenceWorker.generate_batches`), so a streamer can forward what
    arrived together as one message.

    Raises:
        backends.base.BackendError: From the worker (crash, deadline, context overflow).
    """
    accepted = accepted_ns if accepted_ns is not None else time.monotonic_ns()
    started = time.monotonic_ns()
    parts: list[str] = []
    times: list[int] = []
    prefill_start: int | None = None
    first_content: int | None = None
    prompt_tokens: int | None = None
    final: TokenEvent | None = None
    with contextlib.closing(
            worker.generate_batches(request, deadline_mono=deadline_mono)) as stream:
        for batch in stream:
            for event in batch:
                if event.prefill_start_ns is not None:
                    prefill_start = event.prefill_start_ns
                if event.prompt_tokens is not None:
                    prompt_tokens = event.prompt_tokens
                if event.token_ids:
                    times.append(event.t_ns)
                if event.text:
                    parts.append(event.text)
                    if first_content is None and event.token_ids:
                        first_content = event.t_ns
                if event.final:
                    final = event
                if on_event is not None:
                    on_event(event)
            if on_batch is not None:
                on_batch(batch)
    end = time.monotonic_ns()
    completion = final.completion_tokens if final and final.completion_tokens is not None else 0
    timings = compute_timings(
        accepted_ns=accepted,
        prefill_start_ns=prefill_start,
        token_times_ns=times,
        first_content_ns=first_content,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion,
        started_ns=started,
    )
    return GenerationResult(
        text="".join(parts),
        prompt_tokens=prompt_tokens,
        completion_tokens=completion,
        finish_reason=(final.finish_reason if final and final.finish_reason else "error"),
        timings=timings,
        accepted_ns=accepted,
        started_ns=started,
        prefill_start_ns=prefill_start,
        first_token_ns=times[0] if times else None,
        last_token_ns=times[-1] if times else None,
        end_ns=end,
        token_times_ns=times,
        engine=dict(final.engine) if final and final.engine else {},
    )
