"""The onnxruntime backend's plain past-KV loop on a REAL optimum export of SmolLM2.

`agentctl models prepare smollm2-135m --format onnx-optimum` exports the dequantised fp32 HF
folder with optimum-onnx (transformers 4.57, in .venv-tools-optimum) to a plain ``model.onnx``
with ``past_key_values.*`` inputs. This runs the shared backend contract on it and checks it
against a transformers-free numpy reference of the same fp32 weights
(tests/integration/llama_reference.py).

What is NOT asserted, and why: equality with the onnxruntime-genai int4 text or llama.cpp's
Q4_1 text. Both re-quantise the weights (int4 MatMulNBits blocks, Q4_1 blocks with Q8_1
activations), which moves logits enough to flip a greedy choice after a few tokens; no
token-level agreement with fp32 is guaranteed, so such a test could fail on a correct export.
The fp32 numpy reference has the same weights and precision, so agreement there is sound.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from backends.base import BackendOptions, GenerationRequest, ModelSpec
from backends.onnxruntime import OnnxRuntimeBackend
from tests.integration import backend_contract as c
from tests.integration.llama_reference import LlamaReference

pytestmark = pytest.mark.model

N_CTX = 256


@pytest.fixture(scope="module")
def optimum_onnx() -> Path:
    return c.prepared("onnx-optimum")


@pytest.fixture(scope="module")
def backend(optimum_onnx: Path) -> Iterator[OnnxRuntimeBackend]:
    b = OnnxRuntimeBackend()
    b.load(ModelSpec("smollm2-135m", optimum_onnx, "onnx"),
           BackendOptions(threads=2, context_tokens=N_CTX))
    yield b
    b.close()


@pytest.fixture(scope="module")
def reference(optimum_onnx: Path) -> LlamaReference:
    manifest = json.loads((optimum_onnx.parent / "manifest.json").read_text())
    hf = Path(manifest["intermediate_hf"])
    if not (hf / "model.safetensors").is_file():
        pytest.fail(f"the HF folder the export was made from is gone ({hf}); "
                    "run ./install.sh --test", pytrace=False)
    return LlamaReference(hf)


def test_it_is_the_plain_loop_on_a_past_kv_graph(backend: OnnxRuntimeBackend) -> None:
    assert backend._kind == "plain"
    assert len(backend._past_names) == 2 * 30  # key + value for each of SmolLM2's 30 layers
    info = c.check_info(backend, "onnx")
    assert info["prepared_as"] == "onnx-optimum"
    assert info["engine"] == "onnxruntime"
    assert info["context_tokens"] == N_CTX and info["model_context_tokens"] == 8192
    assert "fp32" in str(info["quantization"])


def test_manifest_records_the_export(optimum_onnx: Path) -> None:
    m = json.loads((optimum_onnx.parent / "manifest.json").read_text())
    assert m["format"] == "onnx-optimum" and m["model_format"] == "onnx"
    assert m["source_sha256"] == (
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
    assert m["tools"]["optimum-onnx"] and m["tools"]["transformers"].startswith("4.57")
    check = m["steps"][0]["check"]
    assert check["rope_theta"] == 100000.0 and check["eos_token_id"] == 2


def test_eos_is_im_end_id_2(backend: OnnxRuntimeBackend, optimum_onnx: Path) -> None:
    assert backend._tok is not None and 2 in backend._tok.eog_ids
    gen = json.loads((optimum_onnx.parent / "generation_config.json").read_text())
    assert gen["eos_token_id"] in (2, [2]) or 2 in gen["eos_token_id"]
    # a short answer ends on <|im_end|> (finish "stop"), well before max_tokens
    events = c.run(backend, GenerationRequest(
        messages=({"role": "user", "content": "Say OK."},), max_tokens=40))
    f = c.final(events)
    assert f.finish_reason == "stop" and f.completion_tokens is not None
    assert f.completion_tokens < 40


def test_prompt_matches_llamacpp_tokenization(backend: OnnxRuntimeBackend) -> None:
    assert backend.count_tokens(GenerationRequest(messages=c.BENCH_MESSAGES, max_tokens=1)) == 43


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


def test_prefill_logits_match_the_numpy_reference(
    backend: OnnxRuntimeBackend, reference: LlamaReference
) -> None:
    """Every prompt position's logits, graph vs reference: the RoPE base, the attention
    mask, position ids and the tied head all show up here if any of them is wrong."""
    import onnxruntime as ort

    assert backend._tok is not None
    ids = backend._tok.prompt_ids(c.BENCH_MESSAGES, None, None)
    session = backend._session
    feeds: dict[str, np.ndarray] = {
        "input_ids": np.asarray([ids], dtype=np.int64),
        "attention_mask": np.ones((1, len(ids)), dtype=np.int64),
    }
    if backend._has_position_ids:
        feeds["position_ids"] = np.arange(len(ids), dtype=np.int64)[None, :]
    empty = np.zeros((1, backend._kv_heads, 0, backend._head_dim), dtype=np.float32)
    feeds.update({name: empty for name in backend._past_names})
    got = session.run(["logits"], feeds)[0][0]
    reference.reset()
    want = reference.forward(ids)
    assert got.shape == want.shape
    scale = float(np.abs(want).max())
    assert float(np.abs(got - want).max()) < 1e-3 * scale
    assert (got.argmax(-1) == want.argmax(-1)).all()
    assert ort.__version__


def test_greedy_tokens_match_the_numpy_reference(
    backend: OnnxRuntimeBackend, reference: LlamaReference
) -> None:
    """The backend's past-KV loop (IOBinding, present → past) reproduces the reference's
    greedy continuation up to the first near-tie (top-2 logits within 0.05)."""
    assert backend._tok is not None
    ids = backend._tok.prompt_ids(c.BENCH_MESSAGES, None, None)
    want = reference.greedy(ids, 24, margin=0.05)
    # ignore_eos below bans end-of-generation ids; the reference does not, so stop there
    cut = [i for i, t in enumerate(want) if t in backend._tok.eog_ids]
    want = want[:cut[0]] if cut else want
    assert len(want) >= 8, "the reference hit a near-tie too early to compare"
    events = c.run(backend, GenerationRequest(messages=c.BENCH_MESSAGES, max_tokens=len(want),
                                              ignore_eos=True))
    got = [t for e in events for t in e.token_ids]
    assert got == want


def test_op_scan_reads_the_graph_without_parsing_weights(optimum_onnx: Path,
                                                         tmp_path: Path) -> None:
    """The backend's wire-format op scan agrees with the onnx package, on the real export
    (weights external) and on a small graph with its weights embedded."""
    onnx = pytest.importorskip("onnx", reason="the onnx package is the reference parser")
    from onnx import TensorProto, helper, numpy_helper

    from backends.onnxruntime import _op_types, _quantization

    def onnx_ops(path: Path) -> set[str]:
        return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}

    assert _op_types(optimum_onnx) == onnx_ops(optimum_onnx)
    assert {"MatMul", "Softmax"} <= _op_types(optimum_onnx)
    weights = numpy_helper.from_array(np.ones((64, 64), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "embedded",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        initializer=[weights],
    )
    embedded = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(embedded))
    assert _op_types(embedded) == onnx_ops(embedded) == {"MatMul", "Relu"}
    assert _quantization(embedded) == "fp32/fp16 (no quantized ops)"
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff" * 64)
    assert _op_types(garbage) == set()
