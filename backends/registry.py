"""Discovery of backends registered under the ``edgelm.backends`` entry-point group.

Each plugin is loaded inside its own try/except, so one broken plugin is reported and
disabled instead of taking the agent down. Loading a backend class imports only its module;
the engine library itself is imported in ``check()``/``load()``.
"""

from __future__ import annotations

import importlib.metadata
import logging

from backends.base import Backend, BackendError

logger = logging.getLogger(__name__)

GROUP = "edgelm.backends"


def backend_classes() -> tuple[dict[str, type[Backend]], dict[str, str]]:
    """Return (name → class, name → load error) for every registered backend."""
    found: dict[str, type[Backend]] = {}
    errors: dict[str, str] = {}
    for ep in importlib.metadata.entry_points(group=GROUP):
        try:
            cls = ep.load()
        except Exception as exc:  # a plugin's import error must not stop the agent
            errors[ep.name] = f"{type(exc).__name__}: {exc}"
            logger.warning("backend plugin %s failed to load: %s", ep.name, exc)
            continue
        if not (isinstance(cls, type) and issubclass(cls, Backend)):
            errors[ep.name] = f"{ep.value} is not a backends.base.Backend subclass"
            continue
        found[ep.name] = cls
    return found, errors


def create_backend(name: str) -> Backend:
    """Instantiate the backend registered as ``name``.

    Raises:
        BackendError: ``unknown_backend`` when no such plugin is registered or it failed to load.
    """
    classes, errors = backend_classes()
    if name in classes:
        return classes[name]()
    if name in errors:
        raise BackendError("backend_failed", f"backend {name!r} failed to load: {errors[name]}")
    known = ", ".join(sorted(classes)) or "none"
    raise BackendError("unknown_backend", f"unknown backend {name!r} (registered: {known})")
