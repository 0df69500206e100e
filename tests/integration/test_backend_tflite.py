"""The tflite backend on the REAL SmolLM2, converted by `agentctl models prepare --format
tflite` (litert-torch, dynamic int8, KV 1024, prefill 64/256 + decode signatures)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.base import BackendError, BackendOptions, GenerationRequest, ModelSpec
from backends.tflite import TfliteBackend
from tests.integration import backend_contract as c

pytestmark = pytest.mark.model

N_CTX = 256


@pytest.fixture(scope="module")
def tflite_file() -> Path:
    return c.prepared("tflite")


@pytest.fixture(scope="module")
def backend(tflite_file: Path) -> Iterator[TfliteBackend]:
    b = TfliteBackend()
    b.load(ModelSpec("smollm2-135m", tflite_file, "tflite"),
           BackendOptions(threads=2, context_tokens=N_CTX))
    yield b
    b.close()


def test_check_is_ok() -> None:
    assert TfliteBackend.check().ok


def test_greedy_is_fluent_and_deterministic(backend: TfliteBackend) -> None:
    c.check_greedy_fluent_deterministic(backend)


def test_ignore_eos_generates_exactly_max_tokens(backend: TfliteBackend) -> None:
    c.check_ignore_eos(backend)


def test_context_overflow_has_counts(backend: TfliteBackend) -> None:
    c.check_context_overflow(backend, N_CTX)


def test_max_tokens_capped_to_context(backend: TfliteBackend) -> None:
    # 245 prompt tokens: prefill_256 would not fit the 256 window, so this also covers
    # the chunking into prefill_64 calls and single decode steps for the tail
    c.check_effective_max_tokens(backend, N_CTX, [1] + [28] * (N_CTX - 11))


def test_utf8_split_characters_arrive_whole(backend: TfliteBackend) -> None:
    assert backend._tok is not None
    c.check_utf8_split(backend, backend._tok.decode)


def test_stop_strings(backend: TfliteBackend) -> None:
    c.check_stop_strings(backend)


def test_info(backend: TfliteBackend) -> None:
    info = c.check_info(backend, "tflite")
    assert info["prepared_as"] == "tflite"
    assert info["context_tokens"] == N_CTX and info["model_context_tokens"] == 1024
    assert info["prefill_lengths"] == [64, 256]
    assert "int8" in str(info["quantization"])


def test_state_does_not_leak_between_requests(backend: TfliteBackend) -> None:
    """The KV cache is reused in place: a long request must not change the next answer."""
    short = GenerationRequest(messages=({"role": "user", "content": "Say OK."},), max_tokens=8)
    before = c.text_of(c.run(backend, short))
    c.run(backend, GenerationRequest(messages=c.BENCH_MESSAGES, max_tokens=64, ignore_eos=True))
    assert c.text_of(c.run(backend, short)) == before


def test_one_generation_at_a_time(backend: TfliteBackend) -> None:
    """A second thread using the interpreter mid-generation is refused, not interleaved."""
    req = GenerationRequest(messages=c.BENCH_MESSAGES, max_tokens=4, ignore_eos=True)
    stream = backend.generate(req)
    next(stream)  # the first generation holds the model now
    errors: list[BackendError] = []

    def other() -> None:
        try:
            c.run(backend, req)
        except BackendError as exc:
            errors.append(exc)

    t = threading.Thread(target=other)
    t.start()
    t.join(60)
    assert errors and "one at a time" in errors[0].message
    assert c.final(list(stream)).completion_tokens == 4


def test_gguf_path_is_refused_with_the_prepare_command(model_path: Path) -> None:
    with pytest.raises(BackendError) as err:
        TfliteBackend().load(ModelSpec("smollm2-135m", model_path, "gguf"),
                             BackendOptions(threads=1))
    assert "agentctl models prepare smollm2-135m --format tflite" in err.value.message
