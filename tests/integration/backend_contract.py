"""Shared real-model checks of the backend contract (DESIGN.md §3), used by every
tests/integration/test_backend_<name>.py, plus the prepared-model fixture.

Conversions are cached outside the repository in ``$EDGELM_TEST_MODELS`` (default
``~/.cache/edgelm/models``), keyed by source sha256 + tool pins + converter (see
agent/model_cache.py); ``./install.sh --test`` produces them. If a build is missing and the
tooling environment is absent, the tests FAIL with the reason; they never skip silently.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from backends.base import Backend, BackendError, GenerationRequest, TokenEvent

TEST_MODELS = Path(os.environ.get("EDGELM_TEST_MODELS", "~/.cache/edgelm/models")).expanduser()

BENCH_MESSAGES = (
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Explain in a few sentences what an edge AI agent running on a "
                                "Raspberry Pi does and why it reports telemetry."},
)
# Greedy SmolLM2 (every format) continues this with Japanese whose UTF-8 bytes (3 per
# character) span several byte-level BPE tokens.
UTF8_PROMPT = "日本語: こんにちは、世界。日本語: こんにちは、世界。日本語:"


def prepared(fmt: str) -> Path:
    """The cached build of smollm2-135m in ``fmt`` (converted once, lazily if needed)."""
    from agent.errors import ModelError
    from agent.model_cache import find_prepared, prepare

    found = find_prepared("smollm2-135m", fmt, home=TEST_MODELS)
    if found is None:
        try:
            found = prepare("smollm2-135m", fmt, home=TEST_MODELS)
        except ModelError as exc:
            pytest.fail(
                f"the {fmt} build of smollm2-135m is not in {TEST_MODELS} and cannot be made "
                f"here: {exc}. Run ./install.sh --test (it runs the conversions).",
                pytrace=False,
            )
    return found.entry


def run(backend: Backend, request: GenerationRequest) -> list[TokenEvent]:
    return list(backend.generate(request))


def text_of(events: Sequence[TokenEvent]) -> str:
    return "".join(e.text for e in events)


def final(events: Sequence[TokenEvent]) -> TokenEvent:
    assert events and events[-1].final
    assert sum(1 for e in events if e.final) == 1
    return events[-1]


def check_greedy_fluent_deterministic(backend: Backend, min_words: int = 15) -> str:
    req = GenerationRequest(messages=BENCH_MESSAGES, max_tokens=48)
    a, b = run(backend, req), run(backend, req)
    text = text_of(a)
    assert text == text_of(b), "greedy decoding must be deterministic"
    words = text.split()
    assert len(words) >= min_words, text
    letters = sum(c.isalpha() or c.isspace() for c in text) / max(1, len(text))
    assert letters > 0.8, text
    assert "\ufffd" not in text
    # on topic: the prompt's subject comes back
    assert any(w in text.lower() for w in ("edge", "raspberry", "telemetry", "agent")), text
    f = final(a)
    assert f.prompt_tokens is not None and f.prompt_tokens > 20
    assert f.completion_tokens is not None and 0 < f.completion_tokens <= 48
    assert f.finish_reason in ("stop", "length")
    first = next(e for e in a if e.token_ids)
    assert first.prefill_start_ns is not None and first.t_ns >= first.prefill_start_ns
    assert first.prompt_tokens == f.prompt_tokens
    times = [e.t_ns for e in a if e.token_ids]
    assert times == sorted(times)
    return text


def check_ignore_eos(backend: Backend, n: int = 40) -> None:
    # "Say OK." ends after a couple of tokens unless EOS is banned.
    req = GenerationRequest(messages=({"role": "user", "content": "Say OK."},), max_tokens=n,
                            ignore_eos=True)
    f = final(run(backend, req))
    assert f.completion_tokens == n
    assert f.finish_reason == "length"
    short = final(run(backend, GenerationRequest(
        messages=({"role": "user", "content": "Say OK."},), max_tokens=n)))
    if short.finish_reason == "stop":  # EOS ends it early when not banned
        assert short.completion_tokens is not None and short.completion_tokens < n


def check_context_overflow(backend: Backend, n_ctx: int) -> None:
    too_long = GenerationRequest(prompt="hello " * (n_ctx + 50), max_tokens=8)
    with pytest.raises(BackendError) as err:
        run(backend, too_long)
    assert err.value.code == "context_overflow"
    assert err.value.details["context_tokens"] == n_ctx
    assert err.value.details["prompt_tokens"] > n_ctx


def check_effective_max_tokens(backend: Backend, n_ctx: int, prompt_ids: Sequence[int]) -> None:
    """max_tokens is capped to context − prompt."""
    room = n_ctx - len(prompt_ids)
    assert 0 < room < 32
    f = final(run(backend, GenerationRequest(prompt_token_ids=tuple(prompt_ids), max_tokens=500,
                                             ignore_eos=True)))
    assert f.completion_tokens == room
    assert f.finish_reason == "length"


def check_utf8_split(backend: Backend, decode: object = None) -> None:
    events = run(backend, GenerationRequest(prompt=UTF8_PROMPT, max_tokens=16))
    text = text_of(events)
    assert "\ufffd" not in text, text
    assert any(ord(c) > 0x2000 for c in text), f"expected CJK output, got {text!r}"
    token_events = [e for e in events if e.token_ids]
    # at least one character arrived split across tokens: a token step with no text
    assert any(e.text == "" for e in token_events), text
    if callable(decode):
        ids = [t for e in token_events for t in e.token_ids]
        assert text == decode(ids)


def check_stop_strings(backend: Backend) -> None:
    base = text_of(run(backend, GenerationRequest(messages=BENCH_MESSAGES, max_tokens=40)))
    words = base.split()
    assert len(words) > 8, base
    stop = " " + words[6]  # a word in the middle, with its leading space
    idx = base.find(stop)
    assert idx > 0
    events = run(backend, GenerationRequest(messages=BENCH_MESSAGES, max_tokens=40,
                                            stop=(stop,)))
    assert text_of(events) == base[:idx]
    assert final(events).finish_reason == "stop"
    assert stop not in text_of(events)


def check_info(backend: Backend, fmt: str, threads: int = 2) -> dict[str, object]:
    info = backend.info()
    for key in ("model_sha256", "format", "quantization", "context_tokens", "threads",
                "engine_version", "build_flags"):
        assert key in info, key
    assert info["format"] == fmt
    assert info["threads"] == threads
    assert info["engine_version"]
    sha = info["model_sha256"]
    assert isinstance(sha, str) and len(sha) == 64
    return info
