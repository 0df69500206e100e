"""Discover probe classes through the ``edgelm.probes`` entry-point group.

Built-in probes register through the same group as third-party ones (pyproject.toml), so
there is no directory scan and no special case. Each entry point is loaded inside its own
``try``: a plugin that fails to import (a missing optional library, a syntax error) is reported
in the errors mapping and the other probes still load.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from importlib.metadata import entry_points
from typing import Any, Protocol

from probes.base import Probe, ProbeError

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "edgelm.probes"


class EntryPointLike(Protocol):
    """The part of :class:`importlib.metadata.EntryPoint` the registry uses."""

    @property
    def name(self) -> str:
        """Entry-point name, used as the probe name."""
        ...

    def load(self) -> Any:
        """Import and return the object the entry point names."""
        ...


def available_probe_classes(
    eps: Iterable[EntryPointLike] | None = None,
) -> tuple[dict[str, type[Probe]], dict[str, str]]:
    """Load every registered probe class.

    Args:
        eps: Entry points to load; defaults to the installed ``edgelm.probes`` group.

    Returns:
        ``(classes, errors)``: probe name → class for the plugins that loaded, and probe name →
        reason for those that did not (import error, not a :class:`Probe` subclass). Names are
        sorted; a duplicate name keeps the first entry point and reports the others.
    """
    if eps is None:
        eps = entry_points(group=ENTRY_POINT_GROUP)
    classes: dict[str, type[Probe]] = {}
    errors: dict[str, str] = {}
    for ep in sorted(eps, key=lambda e: e.name):
        if ep.name in classes:
            errors[ep.name] = "duplicate entry point name; the first one registered is used"
            continue
        try:
            obj = ep.load()
        except Exception as exc:  # one broken plugin must not disable the others
            logger.warning("probe plugin %s failed to load: %s", ep.name, exc)
            errors[ep.name] = f"failed to load: {type(exc).__name__}: {exc}"
            continue
        if not (isinstance(obj, type) and issubclass(obj, Probe)):
            errors[ep.name] = f"{obj!r} is not a Probe subclass"
            continue
        classes[ep.name] = obj
    return classes, errors


def create_probes(
    names: Sequence[str] | None,
    root: str | os.PathLike[str] = "/",
    *,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    eps: Iterable[EntryPointLike] | None = None,
) -> list[Probe]:
    """Instantiate probes by name (constructors do no I/O; call ``check()`` afterwards).

    Args:
        names: Probes to create, in this order; None creates every probe that loads.
        root: Filesystem root handed to every probe.
        options: Per-probe keyword arguments, e.g. ``{"estimate": {"idle_mw": 2500}}``.
        eps: Entry points to use instead of the installed group (tests).

    Returns:
        The probes, in the order requested (sorted by name when ``names`` is None).

    Raises:
        ProbeError: When an explicitly named probe is unknown, failed to load or failed to
            construct. With ``names=None`` such probes are logged and skipped.
    """
    classes, errors = available_probe_classes(eps)
    opts = options or {}
    explicit = names is not None
    wanted = list(names) if names is not None else sorted(classes)
    probes: list[Probe] = []
    for name in wanted:
        cls = classes.get(name)
        if cls is None:
            reason = errors.get(name) or (
                f"unknown probe; known: {', '.join(sorted(classes)) or 'none'}"
            )
            raise ProbeError(f"probe {name!r}: {reason}")
        try:
            probes.append(cls(root, **dict(opts.get(name, {}))))
        except Exception as exc:
            if explicit:
                raise ProbeError(f"probe {name!r} could not be created: {exc}") from exc
            logger.warning("probe %s could not be created: %s", name, exc)
    return probes
