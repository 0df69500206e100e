"""The paper's combined metrics (arXiv 2505.16508, DESIGN.md §5).

- R, responsiveness in [0, 1] from TTFT. Default normalisation ``ratio``:
  ``min(1, ttft_ref_ms / ttft_ms)`` — 1 at or below the reference, halving as TTFT doubles.
  ``linear``: ``max(0, 1 - ttft_ms / ttft_max_ms)``.
- U = α·Q + (1 − α)·R, with Q the accuracy (GSM8K Pass@1) in [0, 1].
- CPR, cost per response: on the edge, energy (kWh) × electricity price; in the cloud, prompt
  and completion tokens × their prices (per million tokens, as providers list them).
- PCR = U / CPR, with CPR in cents (so PCR reads as "utility per cent").

Every function refuses meaningless input (negative energy, zero cost) with ``ValueError``
rather than returning ``inf`` or 0.
"""

from __future__ import annotations

MJ_PER_KWH = 3.6e9  # 1 kWh = 3.6 MJ = 3.6e9 mJ
DEFAULT_PRICE_PER_KWH = 0.25
DEFAULT_TTFT_REF_MS = 500.0


def responsiveness(ttft_ms: float, ttft_ref_ms: float = DEFAULT_TTFT_REF_MS,
                   method: str = "ratio", ttft_max_ms: float = 10_000.0) -> float:
    """R in [0, 1] from a TTFT in ms."""
    if ttft_ms <= 0:
        raise ValueError(f"TTFT must be positive, got {ttft_ms}")
    if method == "ratio":
        if ttft_ref_ms <= 0:
            raise ValueError("ttft_ref_ms must be positive")
        return min(1.0, ttft_ref_ms / ttft_ms)
    if method == "linear":
        if ttft_max_ms <= 0:
            raise ValueError("ttft_max_ms must be positive")
        return max(0.0, 1.0 - ttft_ms / ttft_max_ms)
    raise ValueError(f"unknown responsiveness normalisation {method!r} (ratio, linear)")


def utility(quality: float, responsiveness_r: float, alpha: float) -> float:
    """U = α·Q + (1 − α)·R."""
    for name, v in (("quality", quality), ("responsiveness", responsiveness_r), ("alpha", alpha)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {v}")
    return alpha * quality + (1.0 - alpha) * responsiveness_r


def edge_cpr_cents(energy_mj: float, price_per_kwh: float = DEFAULT_PRICE_PER_KWH) -> float:
    """Cost of one response on the edge, in cents: energy (mJ → kWh) × price per kWh × 100."""
    if energy_mj < 0:
        raise ValueError(f"energy must be non-negative, got {energy_mj} mJ")
    if price_per_kwh < 0:
        raise ValueError("price_per_kwh must be non-negative")
    return energy_mj / MJ_PER_KWH * price_per_kwh * 100.0


def cloud_cpr_cents(prompt_tokens: float, completion_tokens: float,
                    input_price_per_mtok: float, output_price_per_mtok: float) -> float:
    """Cost of one cloud response, in cents, from per-million-token prices (currency units)."""
    if min(prompt_tokens, completion_tokens, input_price_per_mtok, output_price_per_mtok) < 0:
        raise ValueError("token counts and prices must be non-negative")
    return (prompt_tokens * input_price_per_mtok
            + completion_tokens * output_price_per_mtok) / 1e6 * 100.0


def pcr(utility_u: float, cpr_cents: float) -> float:
    """PCR = U / CPR (CPR in cents)."""
    if cpr_cents <= 0:
        raise ValueError(f"CPR must be positive to form a ratio, got {cpr_cents}")
    return utility_u / cpr_cents
