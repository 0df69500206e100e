"""The probe contract: how hardware counters become readings.

A probe reads one hardware source (``/proc/stat``, a powercap zone, an INA3221 rail, …) and
turns it into a frozen dataclass of readings whose field names carry their units (``_pct``,
``_bytes``, ``_mw``, ``_mj``, ``_c``, ``_mhz``). ``None`` always means "cannot be measured here"
and is never replaced by 0 or a guess.

Every filesystem read goes through :class:`SysfsReader`, rooted at an injectable directory
(``/`` in production, a fixture tree in tests), so no test ever patches ``open``.

Third-party probes register under the ``edgelm.probes`` entry-point group and need only this
module: nothing here imports from ``agent``.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import errno
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

_T = TypeVar("_T")


@dataclass(frozen=True)
class Availability:
    """Whether a probe can measure on this machine, and why not.

    Attributes:
        ok: True when ``sample()`` can produce at least some readings.
        reason: Human-readable, actionable explanation; empty only when ``ok`` and not degraded.
        degraded: True when the probe works but with reduced fidelity (a fallback source).
    """

    ok: bool
    reason: str = ""
    degraded: bool = False


class PowerCoverage(enum.StrEnum):
    """What part of the machine a power source measures.

    The energy integrator uses this to avoid double counting nested rails: a board-input
    rail already contains the CPU package, GPU and DRAM; a CPU package already contains its
    core/uncore sub-domains.
    """

    BOARD_INPUT = "board_input"
    CPU_PACKAGE = "cpu_package"
    GPU = "gpu"
    DRAM = "dram"
    ESTIMATE = "estimate"


@dataclass(frozen=True)
class PowerReading:
    """One power source's value at one sample.

    Attributes:
        source: Stable identifier, e.g. ``"rapl:package-0"`` or ``"ina3221:VDD_IN"``.
        covers: What the source measures (see :class:`PowerCoverage`).
        power_mw: Mean power since the previous sample (counters) or instantaneous (rails), mW.
        energy_mj: Energy since the previous sample when the source is a counter, mJ; None for
            instantaneous power rails and for the first sample of a counter.
        valid: False when the interval could hide a counter wrap and the value was discarded.
    """

    source: str
    covers: PowerCoverage
    power_mw: float | None
    energy_mj: float | None = None
    valid: bool = True


class ProbeError(Exception):
    """A probe failed in a way its caller should report (the sampler marks it degraded)."""


class SysfsReader:
    """Reads small text files below an injectable root.

    Args:
        root: Directory that stands in for ``/``. Absolute paths passed to the methods are
            resolved below it, so ``read_text("/proc/stat")`` reads ``<root>/proc/stat``.
    """

    def __init__(self, root: str | os.PathLike[str] = "/") -> None:
        self.root = Path(root)

    def path(self, path: str | os.PathLike[str]) -> Path:
        """Map an absolute machine path to its location below the root."""
        rel = str(path).lstrip("/")
        return self.root / rel

    def machine_path(self, real: str | os.PathLike[str]) -> str:
        """Inverse of :meth:`path`: the absolute machine path of a real path below the root.

        :meth:`glob` returns real paths; pass them through this before reading them again, or
        before showing them to a user as the path the kernel exposes.
        """
        try:
            rel = Path(real).relative_to(self.root).as_posix()
        except ValueError:
            return str(real)
        return "/" if rel == "." else "/" + rel.lstrip("/")

    def read_text(self, path: str | os.PathLike[str]) -> str | None:
        """Return the stripped file content, or None when missing or unreadable."""
        try:
            return self.path(path).read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            return None

    def read_text_or_errno(self, path: str | os.PathLike[str]) -> tuple[str | None, int | None]:
        """Like :meth:`read_text` but also return the errno, to tell EACCES from ENOENT."""
        try:
            return self.path(path).read_text(encoding="utf-8", errors="replace").strip(), None
        except OSError as exc:
            return None, exc.errno if exc.errno is not None else errno.EIO

    def read_int(self, path: str | os.PathLike[str]) -> int | None:
        """Return the file's integer content, or None when missing, unreadable or malformed."""
        text = self.read_text(path)
        if text is None:
            return None
        try:
            return int(text.split()[0]) if text else None
        except ValueError:
            return None

    def exists(self, path: str | os.PathLike[str]) -> bool:
        """True when the path exists below the root."""
        return self.path(path).exists()

    def glob(self, directory: str | os.PathLike[str], pattern: str) -> list[Path]:
        """Sorted matches of ``pattern`` in ``directory`` (below the root), as real paths."""
        base = self.path(directory)
        try:
            return sorted(base.glob(pattern))
        except OSError:
            return []


class LayoutCache(Generic[_T]):
    """A discovered sysfs layout (which files to read), rebuilt only now and then.

    Discovery (globbing ``/sys/class/hwmon``, reading every I2C device's ``name``) costs far
    more than reading the values it finds: on a Jetson it was most of a tick. Hotplug is rare
    (an NVMe drive, a USB power meter), so the layout is kept for ``max_age_s`` and rebuilt
    sooner only when a probe calls :meth:`invalidate` because a cached file vanished.

    Args:
        discover: Builds the layout; called lazily on the first :meth:`get`.
        max_age_s: Age after which the next :meth:`get` rediscovers, s.
        clock: Monotonic clock, s.
    """

    def __init__(self, discover: Callable[[], _T], max_age_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._discover = discover
        self._max_age_s = max_age_s
        self._clock = clock
        self._value: _T | None = None
        self._built_at = 0.0

    def get(self) -> _T:
        """The cached layout, rediscovered when stale or invalidated."""
        now = self._clock()
        if self._value is None or now - self._built_at >= self._max_age_s:
            self._value = self._discover()
            self._built_at = now
        return self._value

    def invalidate(self) -> None:
        """Forget the layout; the next :meth:`get` rediscovers it."""
        self._value = None


class Probe(abc.ABC):
    """One hardware source.

    Subclasses set ``name`` and implement :meth:`check` and :meth:`sample`. Constructors take
    ``root`` (the filesystem root) plus keyword options and must not touch hardware: all I/O
    happens in ``check``/``sample``.
    """

    name: ClassVar[str]

    def __init__(self, root: str | os.PathLike[str] = "/") -> None:
        self.fs = SysfsReader(root)

    @abc.abstractmethod
    def check(self) -> Availability:
        """Report whether this probe can measure here. Cheap, and never raises."""

    @abc.abstractmethod
    def sample(self) -> Any:
        """Return a frozen dataclass of readings (units in field names, None if unmeasurable).

        Rates and counters are deltas against the previous call; the first call returns None
        for them. May raise :class:`ProbeError`; the sampler isolates each probe.
        """

    def power(self, readings: Any) -> list[PowerReading]:
        """Power sources contained in ``readings`` (default: none)."""
        return []

    def close(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Release resources (subprocesses, library handles)."""


def readings_as_dict(readings: Any) -> dict[str, Any]:
    """Turn a readings dataclass (possibly nested) into JSON-ready primitives."""
    if readings is None:
        return {}
    if dataclasses.is_dataclass(readings) and not isinstance(readings, type):
        return _jsonable(dataclasses.asdict(readings))  # type: ignore[no-any-return]
    if isinstance(readings, Mapping):
        return _jsonable(dict(readings))  # type: ignore[no-any-return]
    raise TypeError(f"readings must be a dataclass or mapping, got {type(readings).__name__}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and value != value:  # NaN is not JSON; it is "unknown"
        return None
    return value
