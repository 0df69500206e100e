"""The agent's error tree. Only the CLI turns these into exit codes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """A configuration value or flag is wrong; the message names it. Exit code 78 (EX_CONFIG)."""


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
