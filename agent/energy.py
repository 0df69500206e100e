"""Energy over a time window (a request, its prefill or decode, a bench run) from snapshots.

Two kinds of power source arrive in :attr:`Snapshot.power` (see ``probes.base.PowerReading``):

* **rails** (INA3221, PMIC, NVML power, smart plug) give instantaneous power, mW. Energy is the
  trapezoid rule between consecutive samples, with linear interpolation where a window edge
  falls between two samples. Two samples further apart than ``max_gap_factor`` times the
  sampling interval in force are a gap, not a line.
* **counters** (RAPL ``energy_uj``, NVML total energy) give the energy since the source's
  previous sample, mJ. Energy is the sum of those deltas; an interval that straddles a window
  edge is pro-rated by the share of it inside the window. An interval the probe marked invalid
  (it could hide a counter wrap) is a gap.

A source counts as a counter when any of its readings carries ``energy_mj``.

Sources are chosen by what they cover so nothing is counted twice (DESIGN.md section 3): one
``board_input`` source alone when there is one (it already contains CPU, GPU and DRAM);
otherwise the sum of the ``cpu_package``, ``gpu`` and ``dram`` sources; a labelled ``estimate``
only when nothing measures. Probes emit only non-overlapping sources within a class (RAPL
reports packages, not their core/uncore sub-domains).

Coverage is the fraction of the window spanned by valid intervals of the selected sources (the
smallest one when several are summed). Below ``min_coverage`` the energy is None with a reason;
at or above it the energy of the uncovered part is taken at the covered mean power, and the
result says so. No power source gives None values with a reason, never 0.
"""

from __future__ import annotations

import itertools
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from agent.sampler import Snapshot
from probes.base import PowerCoverage, PowerReading

logger = logging.getLogger(__name__)

_COMPONENTS = (PowerCoverage.CPU_PACKAGE, PowerCoverage.GPU, PowerCoverage.DRAM)


class SnapshotSource(Protocol):
    """Anything that keeps recent snapshots (the :class:`agent.sampler.Sampler`)."""

    def history(self, since_mono_s: float = ...) -> list[Snapshot]:
        """Snapshots with ``t_mono_s >= since_mono_s``, oldest first."""
        ...


@dataclass(frozen=True)
class SourceEnergy:
    """One power source over the window.

    Attributes:
        source: Source id, e.g. ``"rapl:package-0"``.
        covers: What the source measures (a :class:`PowerCoverage` value).
        method: ``"counter"`` (sum of energy deltas) or ``"trapezoid"`` (integrated power).
        covered_energy_mj: Energy over the covered part of the window, mJ.
        covered_s: Seconds of the window spanned by valid intervals.
        coverage: ``covered_s`` / window duration, 0-1.
        mean_power_mw: ``covered_energy_mj / covered_s``, mW; None when nothing is covered.
    """

    source: str
    covers: str
    method: str
    covered_energy_mj: float
    covered_s: float
    coverage: float
    mean_power_mw: float | None


@dataclass(frozen=True)
class IdleBaseline:
    """Mean power of an idle window, subtracted from later windows to give net energy.

    Attributes:
        power_mw: Mean idle power, mW.
        sources: Sources it was measured on; net energy is only computed on the same ones.
        t0_mono_s: Start of the idle window, monotonic s.
        t1_mono_s: End of the idle window, monotonic s.
        coverage: Coverage of the idle window, 0-1.
    """

    power_mw: float
    sources: tuple[str, ...]
    t0_mono_s: float
    t1_mono_s: float
    coverage: float


@dataclass(frozen=True)
class EnergyResult:
    """Energy over one window, labelled with where it came from.

    Attributes:
        t0_mono_s: Window start, monotonic s.
        t1_mono_s: Window end, monotonic s.
        duration_s: ``t1 - t0``, s.
        method: ``"board_input"``, ``"components"`` (CPU package + GPU + DRAM), ``"estimate"``
            or ``"none"``.
        sources: Source ids summed, e.g. ``("rapl:package-0", "rapl:dram-0")``.
        covers: Coverage classes of those sources.
        estimated: True when the value comes from a power model, not a sensor.
        sample_interval_s: Median spacing of the samples used, s.
        coverage: Fraction of the window covered by valid samples, 0-1 (the least-covered
            source when several are summed); None without a source.
        mean_power_mw: Gross mean power over the window, mW.
        gross_energy_mj: Energy over the window, mJ.
        baseline_power_mw: Idle power subtracted for the net figure, mW.
        net_energy_mj: ``gross - baseline * duration``, mJ; None without a matching baseline.
        tokens: Tokens produced in the window, when given.
        gross_mj_per_token: mJ per token, gross.
        net_mj_per_token: mJ per token, net of idle.
        gross_tokens_per_j: Tokens per joule, gross.
        net_tokens_per_j: Tokens per joule, net of idle.
        reason: Why values are None, and notes (extrapolation, skipped sources); empty if none.
        per_source: Detail for every source selected.
    """

    t0_mono_s: float
    t1_mono_s: float
    duration_s: float
    method: str
    sources: tuple[str, ...]
    covers: tuple[str, ...]
    estimated: bool
    sample_interval_s: float | None
    coverage: float | None
    mean_power_mw: float | None
    gross_energy_mj: float | None
    baseline_power_mw: float | None
    net_energy_mj: float | None
    tokens: int | None
    gross_mj_per_token: float | None
    net_mj_per_token: float | None
    gross_tokens_per_j: float | None
    net_tokens_per_j: float | None
    reason: str
    per_source: tuple[SourceEnergy, ...]


@dataclass(frozen=True)
class _Point:
    t: float
    interval_s: float
    reading: PowerReading


def _interp(ta: float, pa: float, tb: float, pb: float, t: float) -> float:
    if tb == ta:
        return pa
    return pa + (pb - pa) * (t - ta) / (tb - ta)


def _integrate_counter(points: Sequence[_Point], t0: float, t1: float) -> tuple[float, float]:
    """Pro-rated sum of energy deltas in [t0, t1]: (energy_mj, covered_s)."""
    energy = 0.0
    covered = 0.0
    for prev, cur in itertools.pairwise(points):
        a, b = prev.t, cur.t
        lo, hi = max(a, t0), min(b, t1)
        if hi <= lo or b <= a:
            continue
        r = cur.reading
        if not r.valid or r.energy_mj is None:
            continue
        share = (hi - lo) / (b - a)
        energy += r.energy_mj * share
        covered += hi - lo
    return energy, covered


def _integrate_rail(
    points: Sequence[_Point], t0: float, t1: float, max_gap_factor: float, fallback_gap_s: float
) -> tuple[float, float]:
    """Trapezoid over power in [t0, t1]: (energy_mj, covered_s)."""
    energy = 0.0
    covered = 0.0
    for prev, cur in itertools.pairwise(points):
        a, b = prev.t, cur.t
        lo, hi = max(a, t0), min(b, t1)
        if hi <= lo or b <= a:
            continue
        pa, pb = prev.reading.power_mw, cur.reading.power_mw
        if pa is None or pb is None or not prev.reading.valid or not cur.reading.valid:
            continue
        nominal = max(prev.interval_s, cur.interval_s)
        allowed = max_gap_factor * (nominal if nominal > 0 else fallback_gap_s)
        if b - a > allowed:
            continue
        p_lo = _interp(a, pa, b, pb, lo)
        p_hi = _interp(a, pa, b, pb, hi)
        energy += (p_lo + p_hi) / 2.0 * (hi - lo)  # mW * s = mJ
        covered += hi - lo
    return energy, covered


def _median_spacing(times: Sequence[float]) -> float | None:
    gaps = [b - a for a, b in itertools.pairwise(times) if b > a]
    return statistics.median(gaps) if gaps else None


def integrate(
    snapshots: Sequence[Snapshot],
    t0_mono_s: float,
    t1_mono_s: float,
    *,
    tokens: int | None = None,
    baseline: IdleBaseline | None = None,
    min_coverage: float = 0.9,
    max_gap_factor: float = 3.0,
) -> EnergyResult:
    """Energy over ``[t0_mono_s, t1_mono_s]`` from snapshots in time order.

    Args:
        snapshots: Snapshots around the window; include at least one before ``t0`` and one
            after ``t1`` for full coverage.
        t0_mono_s: Window start, monotonic s.
        t1_mono_s: Window end, monotonic s.
        tokens: Tokens produced in the window, for the per-token figures.
        baseline: Idle baseline to subtract.
        min_coverage: Smallest coverage for which an energy is reported.
        max_gap_factor: Rail samples further apart than this many sampling intervals are a gap.

    Returns:
        The labelled result; values are None (with ``reason``) rather than 0 when unknown.
    """
    t0, t1 = t0_mono_s, t1_mono_s
    duration = t1 - t0
    snaps = sorted(snapshots, key=lambda s: s.t_mono_s)

    def empty(
        reason: str,
        sources: tuple[str, ...] = (),
        covers: tuple[str, ...] = (),
        detail: tuple[SourceEnergy, ...] = (),
        coverage: float | None = None,
        interval: float | None = None,
    ) -> EnergyResult:
        return EnergyResult(
            t0_mono_s=t0,
            t1_mono_s=t1,
            duration_s=duration,
            method=_method_of(covers) if sources else "none",
            sources=sources,
            covers=covers,
            estimated=PowerCoverage.ESTIMATE.value in covers,
            sample_interval_s=interval,
            coverage=coverage,
            mean_power_mw=None,
            gross_energy_mj=None,
            baseline_power_mw=baseline.power_mw if baseline else None,
            net_energy_mj=None,
            tokens=tokens,
            gross_mj_per_token=None,
            net_mj_per_token=None,
            gross_tokens_per_j=None,
            net_tokens_per_j=None,
            reason=reason,
            per_source=detail,
        )

    if duration <= 0:
        return empty(f"empty window: t1 - t0 = {duration:.6f} s")

    by_source: dict[str, list[_Point]] = {}
    covers_of: dict[str, PowerCoverage] = {}
    for snap in snaps:
        for r in snap.power:
            by_source.setdefault(r.source, []).append(_Point(snap.t_mono_s, snap.interval_s, r))
            covers_of.setdefault(r.source, PowerCoverage(r.covers))
    if not by_source:
        return empty("no power source: no probe on this machine reports power or energy")

    all_times = [s.t_mono_s for s in snaps]
    fallback_gap = _median_spacing(all_times) or duration
    details: dict[str, SourceEnergy] = {}
    for source, points in by_source.items():
        is_counter = any(p.reading.energy_mj is not None for p in points)
        if is_counter:
            energy, covered = _integrate_counter(points, t0, t1)
        else:
            energy, covered = _integrate_rail(points, t0, t1, max_gap_factor, fallback_gap)
        details[source] = SourceEnergy(
            source=source,
            covers=covers_of[source].value,
            method="counter" if is_counter else "trapezoid",
            covered_energy_mj=energy,
            covered_s=covered,
            coverage=min(1.0, covered / duration),
            mean_power_mw=energy / covered if covered > 0 else None,
        )

    notes: list[str] = []
    selected = _select(details, notes)
    if not selected:
        seen = ", ".join(sorted(details))
        return empty(f"no valid power samples cover the window (sources seen: {seen})")

    sources = tuple(d.source for d in selected)
    covers = tuple(d.covers for d in selected)
    coverage = min(d.coverage for d in selected)
    used_times = sorted({p.t for d in selected for p in by_source[d.source]})
    inside = [t for t in used_times if t0 <= t <= t1]
    before = [t for t in used_times if t < t0][-1:]
    after = [t for t in used_times if t > t1][:1]
    interval = _median_spacing(before + inside + after)

    if coverage < min_coverage:
        return empty(
            f"coverage {coverage:.2f} < {min_coverage:.2f}: too few samples in the window "
            f"(sample after t1 not yet taken, or gaps); sources: {', '.join(sources)}",
            sources,
            covers,
            tuple(selected),
            coverage,
            interval,
        )

    gross = sum(d.covered_energy_mj / d.coverage for d in selected)
    if coverage < 1.0:
        notes.append(
            f"{(1.0 - coverage) * 100:.1f}% of the window had no valid sample and was taken at "
            "the covered mean power"
        )
    method = _method_of(covers)
    if method == "estimate":
        notes.append("estimated from a power model, not measured")

    net: float | None = None
    base_mw: float | None = None
    if baseline is not None:
        base_mw = baseline.power_mw
        if tuple(sorted(baseline.sources)) == tuple(sorted(sources)):
            net = gross - baseline.power_mw * duration
        else:
            notes.append(
                f"no net energy: baseline measured on {', '.join(baseline.sources)}, "
                f"window uses {', '.join(sources)}"
            )
    else:
        notes.append("no idle baseline: net energy unknown")

    def per_token(mj: float | None) -> float | None:
        return mj / tokens if mj is not None and tokens else None

    def tokens_per_j(mj: float | None) -> float | None:
        return tokens / (mj / 1000.0) if mj is not None and mj > 0 and tokens else None

    return EnergyResult(
        t0_mono_s=t0,
        t1_mono_s=t1,
        duration_s=duration,
        method=method,
        sources=sources,
        covers=covers,
        estimated=method == "estimate",
        sample_interval_s=interval,
        coverage=coverage,
        mean_power_mw=gross / duration,
        gross_energy_mj=gross,
        baseline_power_mw=base_mw,
        net_energy_mj=net,
        tokens=tokens,
        gross_mj_per_token=per_token(gross),
        net_mj_per_token=per_token(net),
        gross_tokens_per_j=tokens_per_j(gross),
        net_tokens_per_j=tokens_per_j(net),
        reason="; ".join(notes),
        per_source=tuple(selected),
    )


def _method_of(covers: Sequence[str]) -> str:
    if PowerCoverage.BOARD_INPUT.value in covers:
        return "board_input"
    if PowerCoverage.ESTIMATE.value in covers:
        return "estimate"
    return "components"


def _select(details: dict[str, SourceEnergy], notes: list[str]) -> list[SourceEnergy]:
    """Pick non-overlapping sources: one board input, else components, else the estimate."""
    usable = [d for d in details.values() if d.covered_s > 0]
    boards = sorted(
        (d for d in usable if d.covers == PowerCoverage.BOARD_INPUT.value),
        key=lambda d: (-d.coverage, d.source),
    )
    if boards:
        if len(boards) > 1:
            notes.append(
                "board input from "
                + boards[0].source
                + "; also seen, not added: "
                + ", ".join(d.source for d in boards[1:])
            )
        return [boards[0]]
    comps = sorted(
        (d for d in usable if d.covers in {c.value for c in _COMPONENTS}), key=lambda d: d.source
    )
    if comps:
        return comps
    estimates = sorted(
        (d for d in usable if d.covers == PowerCoverage.ESTIMATE.value),
        key=lambda d: (-d.coverage, d.source),
    )
    return estimates[:1]


class EnergyIntegrator:
    """Energy over windows of a sampler's history, with an idle baseline.

    Args:
        source: Keeps the snapshots (a :class:`agent.sampler.Sampler`).
        min_coverage: Smallest window coverage for which an energy is reported, 0-1.
        max_gap_factor: Rail samples further apart than this many intervals are a gap.
        lookback_s: How far before ``t0`` to fetch history, so the interval straddling ``t0``
            is known (at least one slow sampling interval).
        clock: Monotonic clock, s (for :meth:`measure`'s ``settle_timeout_s``).
        sleep: Sleep function (for :meth:`measure`'s ``settle_timeout_s``).
    """

    def __init__(
        self,
        source: SnapshotSource,
        *,
        min_coverage: float = 0.9,
        max_gap_factor: float = 3.0,
        lookback_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._source = source
        self._min_coverage = min_coverage
        self._max_gap_factor = max_gap_factor
        self._lookback_s = lookback_s
        self._clock = clock
        self._sleep = sleep
        self._baseline: IdleBaseline | None = None

    @property
    def baseline(self) -> IdleBaseline | None:
        """The idle baseline in use, if any."""
        return self._baseline

    @property
    def min_coverage(self) -> float:
        """Smallest window coverage for which an energy is reported, 0-1."""
        return self._min_coverage

    def set_min_coverage(self, min_coverage: float) -> None:
        """Change the coverage threshold (config reload); applies to the next window."""
        if not 0.0 <= min_coverage <= 1.0:
            raise ValueError("min_coverage must be in [0, 1]")
        self._min_coverage = min_coverage

    def set_baseline(self, baseline: IdleBaseline | None) -> None:
        """Use ``baseline`` for net energy (None: no net figures)."""
        self._baseline = baseline

    def measure_baseline(
        self, t0_mono_s: float, t1_mono_s: float, *, settle_timeout_s: float = 0.0
    ) -> IdleBaseline | None:
        """Measure mean power over an idle window and use it as the baseline.

        Returns:
            The new baseline, or None (baseline unchanged) when the window has no power value;
            the reason is logged.
        """
        res = self.measure(
            t0_mono_s, t1_mono_s, settle_timeout_s=settle_timeout_s, with_baseline=False
        )
        if res.mean_power_mw is None or res.coverage is None:
            logger.info("idle baseline not measured: %s", res.reason)
            return None
        self._baseline = IdleBaseline(
            power_mw=res.mean_power_mw,
            sources=res.sources,
            t0_mono_s=t0_mono_s,
            t1_mono_s=t1_mono_s,
            coverage=res.coverage,
        )
        return self._baseline

    def measure(
        self,
        t0_mono_s: float,
        t1_mono_s: float,
        *,
        tokens: int | None = None,
        settle_timeout_s: float = 0.0,
        with_baseline: bool = True,
    ) -> EnergyResult:
        """Energy over ``[t0_mono_s, t1_mono_s]``.

        Args:
            t0_mono_s: Window start, monotonic s.
            t1_mono_s: Window end, monotonic s.
            tokens: Tokens produced in the window (engine-counted), for per-token figures.
            settle_timeout_s: Wait up to this long for a snapshot after ``t1`` so the window's
                end is covered (call inside ``sampler.fast()`` to keep the wait short).
            with_baseline: Subtract the idle baseline when one is set.
        """
        if settle_timeout_s > 0:
            give_up = self._clock() + settle_timeout_s
            while not self._source.history(t1_mono_s):
                if self._clock() >= give_up:
                    break
                self._sleep(0.01)
        snaps = self._source.history(t0_mono_s - self._lookback_s)
        return integrate(
            snaps,
            t0_mono_s,
            t1_mono_s,
            tokens=tokens,
            baseline=self._baseline if with_baseline else None,
            min_coverage=self._min_coverage,
            max_gap_factor=self._max_gap_factor,
        )
