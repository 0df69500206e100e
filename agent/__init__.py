"""edgelm-agent: serve small language models on edge devices, with telemetry and energy."""

from __future__ import annotations

__version__ = "0.1.0"
