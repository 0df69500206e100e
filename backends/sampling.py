"""Token selection from a logits row, for engines that hand logits back to Python.

llama.cpp and onnxruntime-genai sample natively; the plain-onnxruntime and LiteRT loops get
a logits vector per step and choose here. Greedy is ``argmax`` (ties → lowest id, as numpy
defines it), so greedy output is deterministic. Non-greedy follows the usual order:
temperature, then top-k, then top-p (nucleus), then a draw from a seeded generator.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any


class LogitsSampler:
    """Chooses the next token id from one logits row.

    Args:
        temperature: 0 (or less) means greedy.
        top_k: Keep the k most likely tokens (0 or less: all).
        top_p: Keep the smallest set whose probability reaches p (1.0: all).
        seed: Seed of the random generator for non-greedy sampling.
        banned: Token ids never chosen (end-of-generation ids with ``ignore_eos``).
    """

    def __init__(
        self,
        temperature: float,
        top_k: int,
        top_p: float,
        seed: int,
        banned: Collection[int] = (),
    ) -> None:
        import numpy as np

        self._np: Any = np
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self._rng: Any = np.random.default_rng(seed)
        self._banned: Any = np.array(sorted(banned), dtype=np.int64) if banned else None

    def __call__(self, logits: Any) -> int:
        """Return the chosen id for a 1-D logits array (it may be modified in place)."""
        np = self._np
        if self._banned is not None:
            logits = np.array(logits, dtype=np.float32, copy=True)
            logits[self._banned[self._banned < logits.shape[0]]] = -np.inf
        if self.temperature <= 0.0:
            return int(np.argmax(logits))
        scaled = np.asarray(logits, dtype=np.float64) / self.temperature
        order = np.argsort(-scaled)
        if self.top_k > 0:
            order = order[: self.top_k]
        top = scaled[order]
        probs = np.exp(top - top.max())
        probs /= probs.sum()
        if self.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), self.top_p) + 1)
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        return int(order[self._rng.choice(len(order), p=probs)])
