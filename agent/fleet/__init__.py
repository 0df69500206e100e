"""The fleet side (DESIGN.md §6): collector, edge-first router, simulator.

Everything here speaks the wire contract of :mod:`agent.protocol` and, for cloud fallback, an
OpenAI-compatible endpoint; nothing loads a local engine or a probe.
"""
