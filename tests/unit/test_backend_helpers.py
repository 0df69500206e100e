"""The shared backend pieces: GPT-2 byte table, sampler, token-event wrapper (no engine)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from backends.base import BackendError, GenerationRequest
from backends.hf_tokenizer import _byte_decoder
from backends.sampling import LogitsSampler
from backends.streaming import check_context, token_events


def test_gpt2_byte_table_is_a_bijection() -> None:
    table = _byte_decoder()
    assert len(table) == 256 and sorted(table.values()) == list(range(256))
    assert table["Ġ"] == 0x20 and table["Ċ"] == 0x0A and table["a"] == ord("a")


def test_sampler_greedy_bans_and_seeds() -> None:
    logits = np.array([0.0, 5.0, 1.0, 4.0], dtype=np.float32)
    assert LogitsSampler(0.0, 40, 1.0, 0)(logits) == 1
    assert LogitsSampler(0.0, 40, 1.0, 0, banned={1})(logits) == 3
    draws = [LogitsSampler(1.0, 2, 1.0, seed=7)(logits) for _ in range(3)]
    assert len(set(draws)) == 1 and draws[0] in (1, 3)


def test_check_context() -> None:
    assert check_context(10, 100, 500) == 90
    with pytest.raises(BackendError) as err:
        check_context(100, 100, 5)
    assert err.value.code == "context_overflow"
    assert err.value.details == {"prompt_tokens": 100, "context_tokens": 100}


def _engine(pieces: list[int]) -> Iterator[tuple[int, int]]:
    yield from ((p, i + 1) for i, p in enumerate(pieces))


BYTES = {1: "é".encode()[:1], 2: "é".encode()[1:], 3: b" stop", 4: b"x", 9: b""}


def _events(ids: list[int], **kw: object) -> list:  # type: ignore[type-arg]
    req = GenerationRequest(prompt="p", max_tokens=int(kw.pop("max_tokens", 10)), **kw)  # type: ignore[arg-type]
    return list(token_events(_engine(ids), request=req, token_bytes=BYTES.__getitem__,
                             eog_ids=frozenset({9}), n_prompt=3, max_tokens=req.max_tokens,
                             prefill_start_ns=0, engine_counters=dict, engine_name="fake"))


def test_split_character_and_counts() -> None:
    ev = _events([1, 2, 4, 9, 4])
    assert [e.text for e in ev[:-1]] == ["", "é", "x"]
    assert ev[-1].final and ev[-1].completion_tokens == 3 and ev[-1].finish_reason == "stop"


def test_ignore_eos_and_max_tokens() -> None:
    ev = _events([4, 9, 4, 4], ignore_eos=True, max_tokens=3)
    assert ev[-1].completion_tokens == 3 and ev[-1].finish_reason == "length"


def test_stop_string_is_cut() -> None:
    ev = _events([4, 3, 4], stop=(" st",))
    assert "".join(e.text for e in ev) == "x" and ev[-1].finish_reason == "stop"


class _HostBuffer:
    """Stands in for a LiteRT TensorBuffer: ``read`` copies its float32 contents out."""

    def __init__(self, data: np.ndarray) -> None:
        self.data = data

    def read(self, count: int, dtype: object) -> np.ndarray:
        return np.array(self.data.reshape(-1)[:count], dtype=dtype)


def test_tflite_kv_zeroing_covers_exactly_the_dirty_prefix() -> None:
    """Fresh KV buffers are zeroed only up to their last non-zero word (NaN included), so
    pages still on the kernel's zero page are never written (backends/tflite.py)."""
    from backends.tflite import _dirty_prefix

    shape = [1, 16, 3, 4]
    clean = np.zeros(shape, dtype=np.float32)
    assert _dirty_prefix(_HostBuffer(clean), shape, np) == 0
    stray = clean.copy()
    stray.reshape(-1)[6] = 1e-42  # allocator bookkeeping read as a denormal float
    assert _dirty_prefix(_HostBuffer(stray), shape, np) == 7
    nan = clean.copy()
    nan.reshape(-1)[[3, 150]] = np.nan
    assert _dirty_prefix(_HostBuffer(nan), shape, np) == 151
