"""The agent's error tree. Only the CLI turns these into exit codes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters.

    The full length is named; a 100,000-character value would otherwise fill a terminal or
    a log line.
    """
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


class ConfigError(AgentError):
    """A configuration value or flag is wrong; the message names it. Exit code 78 (EX_CONFIG).

    Attributes:
        problems: Every problem found, one line each, each naming its origin and key; the
            message is the single problem, or a count followed by all of them.
        partial: The configuration with the bad values left at their defaults, when the
            file could be read (so later checks can still judge the keys that were fine);
            None otherwise. Typed loosely to keep this module free of imports.
        bad_keys: ``section.key`` names whose values were refused.
    """

    def __init__(self, message: str, problems: list[str] | None = None, *,
                 partial: Any = None, bad_keys: frozenset[str] = frozenset()) -> None:
        self.problems = list(problems) if problems else [message]
        self.partial = partial
        self.bad_keys = bad_keys
        super().__init__(message)

    @classmethod
    def of(cls, problems: list[str], *, partial: Any = None,
           bad_keys: frozenset[str] = frozenset()) -> ConfigError:
        """One error reporting every problem (so a user fixes them all in one round)."""
        unique = list(dict.fromkeys(problems))
        if len(unique) == 1:
            return cls(unique[0], partial=partial, bad_keys=bad_keys)
        lines = "\n".join(f"  - {p}" for p in unique)
        return cls(f"{len(unique)} configuration problems:\n{lines}", unique,
                   partial=partial, bad_keys=bad_keys)


class ModelError(AgentError):
    """A model name or path cannot be resolved to a usable file."""


class PublishError(AgentError):
    """An MQTT publish could not be completed."""


class RequestError(AgentError):
    """A request was refused with a stable wire error code (DESIGN.md §4).

    Attributes:
        code: ``bad_request``, ``too_large``, ``context_overflow``, ``unknown_model``,
            ``overloaded``, ``deadline_exceeded`` or ``backend_failed``.
        request_id: The request's id when it could be read, so the error can be answered.
        details: JSON-ready facts about the failure.
    """

    def __init__(
        self,
        code: str,
        message: str,
        request_id: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.details = dict(details or {})
