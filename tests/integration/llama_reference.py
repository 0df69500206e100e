"""A transformers-free reference for the Llama architecture (SmolLM2), in numpy fp32.

Used to check an exported ONNX graph and the backend's past-KV loop against an
implementation that shares none of their code: not transformers' modelling code (which
optimum traces), not the exporter, not onnxruntime. It reads the fp32 weights straight from
the HF folder's ``model.safetensors`` (parsed here: an 8-byte little-endian header length, a
JSON header of name → dtype/shape/byte offsets, then raw little-endian data) and the
architecture from its ``config.json``, including the RoPE base in the transformers-5 spelling
(``rope_parameters.rope_theta``) that transformers 4.57 does not read.

The maths is the published Llama decoder (Touvron et al. 2023): RMSNorm, rotary position
embeddings on the half-split layout HF checkpoints use, grouped-query attention with a causal
mask, a SiLU-gated MLP, and (SmolLM2) the output projection tied to the token embedding.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """name → array (memory-mapped, fp32 or fp16) for every tensor in ``path``."""
    with path.open("rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out: dict[str, np.ndarray] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(meta["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: unsupported dtype {meta['dtype']} for {name}")
        start, end = meta["data_offsets"]
        out[name] = raw[start:end].view(dtype).reshape(meta["shape"])
    return out


class LlamaReference:
    """Greedy/logit reference for an HF Llama folder (fp32 safetensors + config.json)."""

    def __init__(self, folder: Path) -> None:
        cfg: dict[str, Any] = json.loads((folder / "config.json").read_text())
        self.w = read_safetensors(folder / "model.safetensors")
        self.n_layers = int(cfg["num_hidden_layers"])
        self.n_heads = int(cfg["num_attention_heads"])
        self.n_kv = int(cfg.get("num_key_value_heads") or self.n_heads)
        self.head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // self.n_heads)
        self.eps = float(cfg.get("rms_norm_eps", 1e-6))
        rope = cfg.get("rope_parameters") or {}
        self.rope_theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        if rope.get("rope_type", "default") != "default" or cfg.get("rope_scaling"):
            raise ValueError("only default RoPE is implemented in the reference")
        self._aligned: dict[str, np.ndarray] = {}
        self.embed = self._p("model.embed_tokens.weight")
        self.lm_head = self._p("lm_head.weight") if "lm_head.weight" in self.w else self.embed
        self.k_cache: list[np.ndarray] = []
        self.v_cache: list[np.ndarray] = []

    def _p(self, name: str) -> np.ndarray:
        # a copy: the memory-mapped data after the JSON header is not 4-byte aligned, and
        # numpy's matmul falls back from BLAS to a slow loop on unaligned arrays
        if name not in self._aligned:
            self._aligned[name] = np.array(self.w[name], dtype=np.float32)
        return self._aligned[name]

    def _rms(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        var = np.mean(x * x, axis=-1, keepdims=True)
        return (x / np.sqrt(var + self.eps)) * weight

    def _rope(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        # x: (heads, n, head_dim); HF layout rotates the two halves of each head.
        half = self.head_dim // 2
        inv_freq = 1.0 / (self.rope_theta ** (np.arange(0, half, dtype=np.float64) / half))
        ang = positions[:, None].astype(np.float64) * inv_freq[None, :]
        cos = np.cos(ang).astype(np.float32)
        sin = np.sin(ang).astype(np.float32)
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    def reset(self) -> None:
        """Forget the KV cache (start a new sequence)."""
        self.k_cache, self.v_cache = [], []

    def forward(self, ids: list[int]) -> np.ndarray:
        """Logits (n, vocab) for ``ids`` appended to the cached sequence."""
        pos0 = self.k_cache[0].shape[1] if self.k_cache else 0
        n = len(ids)
        positions = np.arange(pos0, pos0 + n)
        x = self.embed[np.asarray(ids)]
        group = self.n_heads // self.n_kv
        scale = 1.0 / np.sqrt(self.head_dim)
        total = pos0 + n
        # query i (absolute position pos0+i) sees keys 0..pos0+i
        mask = np.arange(total)[None, :] > (pos0 + np.arange(n))[:, None]
        for i in range(self.n_layers):
            pre = f"model.layers.{i}."
            h = self._rms(x, self._p(pre + "input_layernorm.weight"))
            q = (h @ self._p(pre + "self_attn.q_proj.weight").T).reshape(n, self.n_heads, -1)
            k = (h @ self._p(pre + "self_attn.k_proj.weight").T).reshape(n, self.n_kv, -1)
            v = (h @ self._p(pre + "self_attn.v_proj.weight").T).reshape(n, self.n_kv, -1)
            q = self._rope(q.transpose(1, 0, 2), positions)
            k = self._rope(k.transpose(1, 0, 2), positions)
            v = v.transpose(1, 0, 2)
            if len(self.k_cache) > i:
                k = np.concatenate([self.k_cache[i], k], axis=1)
                v = np.concatenate([self.v_cache[i], v], axis=1)
                self.k_cache[i], self.v_cache[i] = k, v
            else:
                self.k_cache.append(k)
                self.v_cache.append(v)
            k_full = np.repeat(k, group, axis=0)
            v_full = np.repeat(v, group, axis=0)
            scores = (q @ k_full.transpose(0, 2, 1)) * scale
            scores = np.where(mask[None], -np.inf, scores)
            scores = scores - scores.max(axis=-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(axis=-1, keepdims=True)
            attn = (probs @ v_full).transpose(1, 0, 2).reshape(n, -1)
            x = x + attn @ self._p(pre + "self_attn.o_proj.weight").T
            h = self._rms(x, self._p(pre + "post_attention_layernorm.weight"))
            gate = h @ self._p(pre + "mlp.gate_proj.weight").T
            up = h @ self._p(pre + "mlp.up_proj.weight").T
            x = x + ((gate / (1.0 + np.exp(-gate))) * up) @ self._p(pre + "mlp.down_proj.weight").T
        x = self._rms(x, self._p("model.norm.weight"))
        logits: np.ndarray = x @ self.lm_head.T
        return logits

    def greedy(self, ids: list[int], n_new: int, margin: float) -> list[int]:
        """Greedy continuation, stopped early at the first step whose top-2 logits are
        within ``margin`` (a near-tie that fp32 rounding in another engine may flip)."""
        self.reset()
        logits = self.forward(ids)[-1]
        out: list[int] = []
        for _ in range(n_new):
            top2 = np.partition(logits, -2)[-2:]
            if abs(float(top2[1] - top2[0])) < margin:
                break
            token = int(np.argmax(logits))
            out.append(token)
            logits = self.forward([token])[-1]
        return out
