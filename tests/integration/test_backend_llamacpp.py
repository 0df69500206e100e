"""The llamacpp backend against the shared contract checks, on the bundled GGUF."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.base import BackendOptions, ModelSpec
from backends.llamacpp import LlamaCppBackend
from tests.integration import backend_contract as c

pytestmark = pytest.mark.model

N_CTX = 256


@pytest.fixture(scope="module")
def backend(model_path: Path) -> Iterator[LlamaCppBackend]:
    b = LlamaCppBackend()
    b.load(ModelSpec("smollm2-135m", model_path, "gguf"),
           BackendOptions(threads=2, context_tokens=N_CTX))
    yield b
    b.close()


def test_greedy_is_fluent_and_deterministic(backend: LlamaCppBackend) -> None:
    c.check_greedy_fluent_deterministic(backend)


def test_ignore_eos_generates_exactly_max_tokens(backend: LlamaCppBackend) -> None:
    c.check_ignore_eos(backend)


def test_context_overflow_has_counts(backend: LlamaCppBackend) -> None:
    c.check_context_overflow(backend, N_CTX)


def test_max_tokens_capped_to_context(backend: LlamaCppBackend) -> None:
    c.check_effective_max_tokens(backend, N_CTX, [1] + [28] * (N_CTX - 11))


def test_utf8_split_characters_arrive_whole(backend: LlamaCppBackend) -> None:
    def decode(ids: list[int]) -> str:
        return bytes(backend._llm.detokenize(ids)).decode("utf-8")

    c.check_utf8_split(backend, decode)


def test_stop_strings(backend: LlamaCppBackend) -> None:
    c.check_stop_strings(backend)


def test_info(backend: LlamaCppBackend) -> None:
    info = c.check_info(backend, "gguf")
    assert info["quantization"] == "Q4_1"
