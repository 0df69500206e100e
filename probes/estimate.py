"""A labelled power model for boards with no power sensor.

``power = idle_mw + cpu_utilisation * (max_mw - idle_mw)``, with ``idle_mw`` and ``max_mw``
measured once by the operator (a metered plug at idle and under full load) and set in the
configuration. Utilisation is the busy share of all CPUs over the last interval, from
``/proc/stat`` (see :mod:`probes.cpu`).

The result is always published as source ``estimate:cpu_util`` with coverage ``estimate``, so
the energy integrator uses it only when nothing measures and marks every figure it yields as
estimated. Without configured values the probe is unavailable: it never invents defaults.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from probes.base import Availability, PowerCoverage, PowerReading, Probe, ProbeError
from probes.cpu import parse_proc_stat


@dataclass(frozen=True)
class EstimateReadings:
    """Modelled power.

    Attributes:
        util_pct: CPU busy share over the last interval, percent; None on the first sample.
        power_mw: Modelled power, mW; None on the first sample.
        idle_mw: Configured idle power, mW.
        max_mw: Configured full-load power, mW.
    """

    util_pct: float | None
    power_mw: float | None
    idle_mw: float
    max_mw: float


class EstimateProbe(Probe):
    """Power modelled from CPU utilisation (source ``estimate:cpu_util``).

    Args:
        root: Filesystem root (``/`` in production, a fixture tree in tests).
        idle_mw: Board power at idle, mW (measured by the operator).
        max_mw: Board power with all CPUs busy, mW.
    """

    name = "estimate"

    def __init__(
        self,
        root: str | os.PathLike[str] = "/",
        *,
        idle_mw: float | None = None,
        max_mw: float | None = None,
    ) -> None:
        super().__init__(root)
        self._idle_mw = idle_mw
        self._max_mw = max_mw
        self._prev: tuple[int, int] | None = None

    def check(self) -> Availability:
        """Available when both model values are configured and /proc/stat is readable."""
        if self._idle_mw is None or self._max_mw is None:
            return Availability(
                False, "no power model configured: set idle_mw and max_mw for the estimate probe"
            )
        if not 0 <= self._idle_mw <= self._max_mw:
            return Availability(False, "estimate probe needs 0 <= idle_mw <= max_mw")
        if self.fs.read_text("/proc/stat") is None:
            return Availability(False, "cannot read /proc/stat")
        return Availability(True, "power is modelled, not measured", degraded=True)

    def sample(self) -> EstimateReadings:
        """Model power from the CPU busy share since the previous sample.

        Raises:
            ProbeError: When the model is not configured or /proc/stat is unreadable.
        """
        if self._idle_mw is None or self._max_mw is None:
            raise ProbeError("estimate probe: idle_mw and max_mw are not configured")
        text = self.fs.read_text("/proc/stat")
        if text is None:
            raise ProbeError("cannot read /proc/stat")
        agg = parse_proc_stat(text).get("cpu")
        if agg is None:
            raise ProbeError("/proc/stat has no aggregate 'cpu' line")
        cur = (agg.busy, agg.total)
        prev, self._prev = self._prev, cur
        util: float | None = None
        if prev is not None and cur[1] > prev[1] and cur[0] >= prev[0]:
            util = min(1.0, (cur[0] - prev[0]) / (cur[1] - prev[1]))
        power = self._idle_mw + util * (self._max_mw - self._idle_mw) if util is not None else None
        return EstimateReadings(
            util_pct=util * 100.0 if util is not None else None,
            power_mw=power,
            idle_mw=self._idle_mw,
            max_mw=self._max_mw,
        )

    def power(self, readings: EstimateReadings) -> list[PowerReading]:
        """The modelled power, always labelled ``estimate``."""
        return [PowerReading("estimate:cpu_util", PowerCoverage.ESTIMATE, readings.power_mw)]
