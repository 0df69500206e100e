"""The openai backend against a REAL OpenAI-compatible server: llama-cpp-python's
``python -m llama_cpp.server`` on the bundled GGUF, on a free loopback port. No mocks."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from backends.base import BackendError, BackendOptions, GenerationRequest, ModelSpec
from backends.openai import OpenAIBackend
from tests.integration import backend_contract as c
from tests.support import free_port

pytestmark = pytest.mark.model

N_CTX = 256


@pytest.fixture(scope="module")
def server(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    for mod in ("uvicorn", "fastapi", "sse_starlette", "pydantic_settings", "starlette_context"):
        try:
            __import__(mod)
        except ImportError:
            pytest.fail(f"llama-cpp-python[server] needs {mod}: run ./install.sh --test",
                        pytrace=False)
    port = free_port()
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(model_path),
         "--host", "127.0.0.1", "--port", str(port), "--n_threads", "2",
         "--n_threads_batch", "2", "--n_ctx", str(N_CTX), "--seed", "0"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, env={**os.environ},
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        end = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > end:
                pytest.fail(f"llama_cpp.server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="module")
def backend(server: str) -> Iterator[OpenAIBackend]:
    b = OpenAIBackend()
    b.load(ModelSpec("smollm2-135m", Path(""), "openai"), BackendOptions(
        threads=2, extra={"base_url": server, "eog_token_ids": [0, 2], "context_tokens": N_CTX,
                          "extra_body": {"repeat_penalty": 1.0},
                          "prompt_price_per_mtok": 0.15, "completion_price_per_mtok": 0.6}))
    yield b
    b.close()


def test_greedy_is_fluent_and_deterministic(backend: OpenAIBackend) -> None:
    req = GenerationRequest(messages=c.BENCH_MESSAGES, max_tokens=48)
    a, b = c.run(backend, req), c.run(backend, req)
    text = c.text_of(a)
    assert text == c.text_of(b)
    assert len(text.split()) >= 15 and "\ufffd" not in text, text
    assert any(w in text.lower() for w in ("edge", "raspberry", "telemetry", "agent")), text
    f = c.final(a)
    assert f.completion_tokens is not None and 0 < f.completion_tokens <= 48
    assert f.engine is not None and f.engine["cost"] is not None and f.engine["cost"] > 0
    assert f.engine["token_counts"] in ("server usage", "stream chunks (no usage sent)")


def test_same_text_as_the_llamacpp_backend(backend: OpenAIBackend, model_path: Path) -> None:
    """The server runs the same engine on the same GGUF: greedy text must match."""
    from backends.llamacpp import LlamaCppBackend

    req = GenerationRequest(messages=c.BENCH_MESSAGES, max_tokens=32, ignore_eos=True)
    local = LlamaCppBackend()
    local.load(ModelSpec("smollm2-135m", model_path, "gguf"),
               BackendOptions(threads=2, context_tokens=N_CTX))
    try:
        expected = c.text_of(c.run(local, req))
    finally:
        local.close()
    assert c.text_of(c.run(backend, req)) == expected


def test_ignore_eos_generates_exactly_max_tokens(backend: OpenAIBackend) -> None:
    c.check_ignore_eos(backend)


def test_context_overflow_has_counts(backend: OpenAIBackend) -> None:
    c.check_context_overflow(backend, N_CTX)


def test_utf8_split_characters_arrive_whole(backend: OpenAIBackend) -> None:
    events = c.run(backend, GenerationRequest(prompt=c.UTF8_PROMPT, max_tokens=16))
    text = c.text_of(events)
    assert "\ufffd" not in text and any(ord(ch) > 0x2000 for ch in text), text


def test_stop_strings(backend: OpenAIBackend) -> None:
    c.check_stop_strings(backend)


def test_info_says_where_token_counts_came_from(backend: OpenAIBackend) -> None:
    c.run(backend, GenerationRequest(prompt="Hello", max_tokens=4))
    info = backend.info()
    assert info["format"] == "openai" and info["threads"] == 2
    # llama-cpp-python 0.3.36 ignores stream_options.include_usage: the backend must say so
    assert info["token_counts"] in ("server usage", "stream chunks (server sent no usage)")
    assert info["completion_price_per_mtok"] == 0.6


def test_unreachable_endpoint_is_backend_failed() -> None:
    b = OpenAIBackend()
    with pytest.raises(BackendError) as err:
        b.load(ModelSpec("m", Path(""), "openai"), BackendOptions(
            threads=1, extra={"base_url": f"http://127.0.0.1:{free_port()}/v1", "timeout_s": 2}))
    assert err.value.code == "backend_failed"
