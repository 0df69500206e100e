"""The onnxruntime backend on the REAL SmolLM2, converted by `agentctl models prepare --format
onnx` (onnxruntime-genai int4). The same graph also runs through the plain-onnxruntime
past-KV loop (``extra={"plain_ort": True}``): both engines must agree token for token."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.base import BackendError, BackendOptions, GenerationRequest, ModelSpec
from backends.onnxruntime import OnnxRuntimeBackend
from tests.integration import backend_contract as c

pytestmark = pytest.mark.model

N_CTX = 256


@pytest.fixture(scope="module")
def onnx_dir() -> Path:
    return c.prepared("onnx")


def _load(path: Path, plain: bool) -> OnnxRuntimeBackend:
    b = OnnxRuntimeBackend()
    b.load(ModelSpec("smollm2-135m", path, "onnx-genai"),
           BackendOptions(threads=2, context_tokens=N_CTX, extra={"plain_ort": plain}))
    return b


@pytest.fixture(scope="module", params=["genai", "plain"])
def backend(request: pytest.FixtureRequest, onnx_dir: Path) -> Iterator[OnnxRuntimeBackend]:
    b = _load(onnx_dir, request.param == "plain")
    yield b
    b.close()


def test_check_is_ok() -> None:
    assert OnnxRuntimeBackend.check().ok


def test_greedy_is_fluent_and_deterministic(backend: OnnxRuntimeBackend) -> None:
    c.check_greedy_fluent_deterministic(backend)


def test_ignore_eos_generates_exactly_max_tokens(backend: OnnxRuntimeBackend) -> None:
    c.check_ignore_eos(backend)


def test_context_overflow_has_counts(backend: OnnxRuntimeBackend) -> None:
    c.check_context_overflow(backend, N_CTX)


def test_max_tokens_capped_to_context(backend: OnnxRuntimeBackend) -> None:
    c.check_effective_max_tokens(backend, N_CTX, [1] + [28] * (N_CTX - 11))


def test_utf8_split_characters_arrive_whole(backend: OnnxRuntimeBackend) -> None:
    assert backend._tok is not None
    c.check_utf8_split(backend, backend._tok.decode)


def test_stop_strings(backend: OnnxRuntimeBackend) -> None:
    c.check_stop_strings(backend)


def test_info(backend: OnnxRuntimeBackend) -> None:
    info = c.check_info(backend, "onnx" if backend._kind == "plain" else "onnx-genai")
    assert info["context_tokens"] == N_CTX
    assert info["model_context_tokens"] == 8192
    assert info["engine"] in ("onnxruntime", "onnxruntime-genai")
    assert info["prepared_as"] == "onnx"  # both loops serve the `models prepare onnx` build


def test_genai_and_plain_loops_agree(onnx_dir: Path) -> None:
    req = GenerationRequest(messages=c.BENCH_MESSAGES, max_tokens=24, ignore_eos=True)
    texts = []
    for plain in (False, True):
        b = _load(onnx_dir, plain)
        try:
            texts.append(c.text_of(c.run(b, req)))
        finally:
            b.close()
    assert texts[0] == texts[1]


def test_prompt_matches_llamacpp_tokenization(onnx_dir: Path) -> None:
    b = _load(onnx_dir, False)
    try:
        n = b.count_tokens(GenerationRequest(messages=c.BENCH_MESSAGES, max_tokens=1))
    finally:
        b.close()
    assert n == 43  # llama.cpp's count for the same ChatML prompt (feasibility.md §3)


def test_model_without_kv_cache_is_refused(tmp_path: Path, onnx_dir: Path) -> None:
    """A graph with no past_key_values inputs is refused with the reason."""
    import shutil

    import numpy as np
    import onnxruntime  # noqa: F401  (the runtime must be there for this test)

    onnx = pytest.importorskip("onnx", reason="the onnx package builds the no-KV graph")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["logits"], to=TensorProto.FLOAT)],
        "no_kv",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "n"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "n"])],
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "model.onnx"))
    shutil.copy(onnx_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    b = OnnxRuntimeBackend()
    with pytest.raises(BackendError) as err:
        b.load(ModelSpec("nokv", tmp_path / "model.onnx", "onnx"), BackendOptions(threads=1))
    assert "past_key_values" in err.value.message
    assert np is not None


def test_gguf_path_is_refused_with_the_prepare_command(model_path: Path) -> None:
    with pytest.raises(BackendError) as err:
        OnnxRuntimeBackend().load(ModelSpec("smollm2-135m", model_path, "gguf"),
                                  BackendOptions(threads=1))
    assert "agentctl models prepare smollm2-135m --format onnx" in err.value.message
