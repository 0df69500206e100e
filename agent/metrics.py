"""Per-request latency and throughput metrics (DESIGN.md §5), and summary statistics.

All inputs are ``time.monotonic_ns()`` timestamps. Definitions:

- TTFT: request accepted → first generated token with non-empty text (templating,
  tokenization and prefill included; model load excluded).
- prefill tok/s: prompt_tokens / (first token time − prefill start).
- decode tok/s (TGS): (completion_tokens − 1) / (t_last_token − t_first_token); the first
  token is excluded because prefill produced it.
- ITL: mean gap between consecutive token events, the first excluded.
- TPOT: e2e / completion_tokens.
- e2e: request accepted → last token.

A duration that is zero or negative where it divides is a :class:`MetricError` (a clock or
instrumentation bug), never ``inf``. A rate that needs two tokens is ``None`` with one.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


class MetricError(ValueError):
    """Timestamps that cannot yield a metric (non-positive durations, out of order)."""


@dataclass(frozen=True)
class RequestTimings:
    """Timing metrics of one generation. ``None`` means not defined for this request."""

    ttft_ms: float | None
    prefill_tok_s: float | None
    decode_tok_s: float | None
    itl_ms: float | None
    tpot_ms: float | None
    e2e_ms: float | None
    queue_ms: float | None = None


def compute_timings(
    *,
    accepted_ns: int,
    prefill_start_ns: int | None,
    token_times_ns: Sequence[int],
    first_content_ns: int | None,
    prompt_tokens: int | None,
    completion_tokens: int,
    started_ns: int | None = None,
) -> RequestTimings:
    """Compute :class:`RequestTimings` from one request's timestamps.

    Args:
        accepted_ns: When the agent accepted the request.
        prefill_start_ns: When the engine started evaluating the prompt.
        token_times_ns: One timestamp per token event, in order.
        first_content_ns: Timestamp of the first event with non-empty text (TTFT's end).
        prompt_tokens: Engine-counted prompt tokens.
        completion_tokens: Engine-counted generated tokens.
        started_ns: When the request left the queue (for ``queue_ms``).

    Raises:
        MetricError: On out-of-order timestamps or zero durations used as divisors.
    """
    if completion_tokens < 0:
        raise MetricError(f"completion_tokens is negative ({completion_tokens})")
    if any(b < a for a, b in itertools.pairwise(token_times_ns)):
        raise MetricError("token timestamps are not in order")
    queue_ms = None
    if started_ns is not None:
        if started_ns < accepted_ns:
            raise MetricError("request started before it was accepted")
        queue_ms = (started_ns - accepted_ns) / 1e6
    if not token_times_ns:
        return RequestTimings(None, None, None, None, None, None, queue_ms)
    first_tok, last_tok = token_times_ns[0], token_times_ns[-1]
    if first_tok < accepted_ns:
        raise MetricError("first token precedes acceptance")
    ttft_end = first_content_ns if first_content_ns is not None else first_tok
    ttft_ms = (ttft_end - accepted_ns) / 1e6
    e2e_ms = (last_tok - accepted_ns) / 1e6
    prefill = None
    if prefill_start_ns is not None and prompt_tokens:
        span = first_tok - prefill_start_ns
        if span <= 0:
            raise MetricError(f"prefill duration is {span} ns")
        prefill = prompt_tokens / (span / 1e9)
    decode = itl = None
    if completion_tokens >= 2 and len(token_times_ns) >= 2:
        span = last_tok - first_tok
        if span <= 0:
            raise MetricError(f"decode duration is {span} ns for {completion_tokens} tokens")
        decode = (completion_tokens - 1) / (span / 1e9)
        itl = span / 1e6 / (len(token_times_ns) - 1)
    tpot = e2e_ms / completion_tokens if completion_tokens > 0 and e2e_ms > 0 else None
    return RequestTimings(ttft_ms, prefill, decode, itl, tpot, e2e_ms, queue_ms)


@dataclass(frozen=True)
class Summary:
    """Summary statistics over repeated runs; raw samples are kept for re-analysis."""

    n: int
    mean: float
    stdev: float
    min: float
    max: float
    p50: float
    p90: float
    p95: float
    p99: float
    samples: tuple[float, ...]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method) of sorted values, q in [0, 100]."""
    if not sorted_values:
        raise MetricError("percentile of no values")
    if not 0 <= q <= 100:
        raise MetricError(f"percentile {q} outside [0, 100]")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(values: Sequence[float | None]) -> Summary | None:
    """Summary of the defined values; None when none is defined."""
    vals = sorted(float(v) for v in values if v is not None)
    if not vals:
        return None
    return Summary(
        n=len(vals),
        mean=statistics.fmean(vals),
        stdev=statistics.stdev(vals) if len(vals) > 1 else 0.0,
        min=vals[0],
        max=vals[-1],
        p50=percentile(vals, 50),
        p90=percentile(vals, 90),
        p95=percentile(vals, 95),
        p99=percentile(vals, 99),
        samples=tuple(float(v) for v in values if v is not None),
    )
