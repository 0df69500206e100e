from __future__ import annotations

import pytest

from agent.metrics import MetricError, compute_timings, percentile, summarize

MS = 1_000_000


def test_scripted_stream_metrics() -> None:
    # accepted at 0, prefill starts at 10 ms, tokens at 50, 60, 70, 80 ms
    t = compute_timings(
        accepted_ns=0,
        prefill_start_ns=10 * MS,
        token_times_ns=[50 * MS, 60 * MS, 70 * MS, 80 * MS],
        first_content_ns=50 * MS,
        prompt_tokens=40,
        completion_tokens=4,
        started_ns=5 * MS,
    )
    assert t.ttft_ms == pytest.approx(50.0)
    assert t.prefill_tok_s == pytest.approx(40 / 0.040)
    assert t.decode_tok_s == pytest.approx(3 / 0.030)  # first token excluded
    assert t.itl_ms == pytest.approx(10.0)
    assert t.e2e_ms == pytest.approx(80.0)
    assert t.tpot_ms == pytest.approx(20.0)
    assert t.queue_ms == pytest.approx(5.0)


def test_ttft_is_first_non_empty_content_token() -> None:
    t = compute_timings(
        accepted_ns=0,
        prefill_start_ns=0,
        token_times_ns=[10 * MS, 20 * MS],
        first_content_ns=20 * MS,
        prompt_tokens=1,
        completion_tokens=2,
    )
    assert t.ttft_ms == pytest.approx(20.0)


def test_single_token_has_no_decode_rate() -> None:
    t = compute_timings(
        accepted_ns=0,
        prefill_start_ns=0,
        token_times_ns=[10 * MS],
        first_content_ns=10 * MS,
        prompt_tokens=3,
        completion_tokens=1,
    )
    assert t.decode_tok_s is None and t.itl_ms is None and t.ttft_ms == pytest.approx(10.0)


def test_no_tokens() -> None:
    t = compute_timings(
        accepted_ns=0,
        prefill_start_ns=None,
        token_times_ns=[],
        first_content_ns=None,
        prompt_tokens=3,
        completion_tokens=0,
    )
    assert t.ttft_ms is None and t.e2e_ms is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"token_times_ns": [10 * MS, 10 * MS], "completion_tokens": 2},  # zero decode span
        {"token_times_ns": [20 * MS, 10 * MS], "completion_tokens": 2},  # out of order
        {"token_times_ns": [10 * MS], "completion_tokens": 1, "prefill_start_ns": 10 * MS},
    ],
)
def test_zero_or_negative_durations_are_errors_not_inf(kwargs: dict[str, object]) -> None:
    base: dict[str, object] = {
        "accepted_ns": 0,
        "prefill_start_ns": 0,
        "first_content_ns": None,
        "prompt_tokens": 5,
    }
    base.update(kwargs)
    with pytest.raises(MetricError):
        compute_timings(**base)  # type: ignore[arg-type]


def test_summary_and_percentiles() -> None:
    s = summarize([1.0, 2.0, 3.0, 4.0, None])
    assert s is not None
    assert (s.n, s.mean, s.min, s.max, s.p50) == (4, 2.5, 1.0, 4.0, 2.5)
    assert s.p90 == pytest.approx(3.7)
    assert s.stdev == pytest.approx(1.2909944)
    assert s.samples == (1.0, 2.0, 3.0, 4.0)
    assert summarize([None]) is None
    assert percentile([5.0], 99) == 5.0
    with pytest.raises(MetricError):
        percentile([], 50)
