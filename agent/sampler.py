"""Fixed-rate sampling of every probe on one background thread.

Ticks are scheduled on absolute monotonic deadlines (``t_k = t_0 + k * interval``), so the
rate does not drift by the time a tick takes. A tick that ends after the next deadline has
passed skips the deadlines it missed (they are counted in :attr:`SamplerStats.skipped_ticks`)
rather than sampling in a burst to catch up: a burst would put several samples at almost the
same instant and make the counters' per-interval power meaningless.

Each probe is sampled inside its own ``try``: an exception from one probe is recorded in that
snapshot's ``errors`` and, after ``degrade_after`` consecutive failures, marks the probe degraded
in :meth:`Sampler.health`; the other probes go on. Probes whose ``check()`` fails are not
sampled; every probe is re-checked every ``recheck_s`` seconds so a source that appears later
(a worker process, a jtop service) is picked up and a fallback shows in health.

The sampler does no network I/O and takes no lock a publisher could hold for long: listeners
run on the sampler thread and must hand snapshots off quickly (e.g. to a bounded queue).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from probes.base import Availability, PowerCoverage, PowerReading, Probe, readings_as_dict

logger = logging.getLogger(__name__)

Listener = Callable[["Snapshot"], None]


@dataclass(frozen=True)
class Snapshot:
    """All probes' readings at one tick.

    Attributes:
        ts_unix_ms: Wall-clock time of the tick, ms since the Unix epoch (for publishing).
        t_mono_s: Monotonic time of the tick, s (for windows and integration).
        readings: Probe name -> readings as JSON-ready primitives (units in the key names).
        power: Every power source the probes reported at this tick.
        errors: Probe name -> error text for probes that failed at this tick.
        interval_s: Sampling interval in force when the tick was taken, s.
        seq: Tick number since the sampler started (gaps are skipped ticks); an on-demand
            snapshot carries the number of the tick before it.
        partial: An on-demand power sample (:meth:`Sampler.sample_power_now`): ``readings``
            and ``power`` hold the power sources only.
    """

    ts_unix_ms: int
    t_mono_s: float
    readings: dict[str, dict[str, Any]]
    power: tuple[PowerReading, ...]
    errors: dict[str, str]
    interval_s: float = 0.0
    seq: int = 0
    partial: bool = False


@dataclass(frozen=True)
class SamplerStats:
    """Counters about the sampler itself.

    Attributes:
        ticks: Ticks taken.
        skipped_ticks: Deadlines skipped because a tick overran.
        listener_errors: Exceptions raised by listeners.
        probe_errors: Probe name -> total exceptions raised by ``sample()``/``power()``.
        last_tick_cost_s: Wall time the last tick took, s.
        on_demand_samples: Snapshots taken by :meth:`Sampler.sample_power_now`.
    """

    ticks: int
    skipped_ticks: int
    listener_errors: int
    probe_errors: dict[str, int]
    last_tick_cost_s: float | None
    on_demand_samples: int = 0


def next_deadline(deadline: float, now: float, interval_s: float) -> tuple[float, int]:
    """Next tick deadline after ``deadline`` that is not in the past, and how many were skipped.

    Args:
        deadline: Deadline of the tick just taken, monotonic s.
        now: Current monotonic time, s.
        interval_s: Sampling interval, s.

    Returns:
        ``(next, skipped)`` where ``next = deadline + (skipped + 1) * interval_s`` and
        ``next > now`` unless ``now`` is exactly on a deadline.
    """
    nxt = deadline + interval_s
    if now <= nxt:
        return nxt, 0
    skipped = math.ceil((now - nxt) / interval_s)
    nxt += skipped * interval_s
    if nxt < now:  # float rounding
        nxt += interval_s
        skipped += 1
    return nxt, skipped


@dataclass
class _ProbeState:
    key: str
    probe: Probe
    availability: Availability = field(default_factory=lambda: Availability(False, "not checked"))
    checked_at: float | None = None
    consecutive_errors: int = 0
    total_errors: int = 0
    last_error: str = ""
    # Inside fast() windows only power sources need the high rate; the others keep their
    # base-rate reading, carried forward (see sample_once).
    gives_power: bool = False
    # A power model over a rate (the estimate probe): never sampled on demand.
    rate_based: bool = False
    # Wall time of the last successful sample()+power(), s (for sample_power_now's max_cost_s).
    last_cost_s: float | None = None
    samples: int = 0
    last_sample_mono: float | None = None
    last_readings: dict[str, Any] | None = None


class Sampler:
    """Samples probes at a fixed rate on a daemon thread.

    Args:
        probes: Probes to sample; keyed by ``probe.name`` (a repeated name gets ``#2``, ``#3``).
        interval_s: Base sampling interval, s (1 s by default).
        degrade_after: Consecutive failures after which a probe is reported degraded.
        history_len: Snapshots kept for :meth:`history` (4096 is ~6.8 min at 10 Hz).
        recheck_s: How often every probe's ``check()`` runs again, s.
        clock: Monotonic clock, s (injectable for tests).
        wall_clock: Wall clock, s since the epoch (injectable for tests).
    """

    def __init__(
        self,
        probes: Sequence[Probe],
        interval_s: float = 1.0,
        *,
        degrade_after: int = 3,
        history_len: int = 4096,
        recheck_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        if degrade_after < 1:
            raise ValueError("degrade_after must be >= 1")
        self._base_interval_s = interval_s
        self._degrade_after = degrade_after
        self._recheck_s = recheck_s
        self._clock = clock
        self._wall_clock = wall_clock
        self._states: list[_ProbeState] = []
        seen: dict[str, int] = {}
        for probe in probes:
            n = seen.get(probe.name, 0) + 1
            seen[probe.name] = n
            key = probe.name if n == 1 else f"{probe.name}#{n}"
            self._states.append(_ProbeState(key=key, probe=probe))

        self._cond = threading.Condition()
        self._fast_intervals: list[float] = []
        self._stopping = False
        self._thread: threading.Thread | None = None

        # Held around power probes' reads, by the sampler thread and sample_power_now().
        self._power_lock = threading.Lock()
        self._on_demand = 0
        self._data_lock = threading.Lock()
        self._history: collections.deque[Snapshot] = collections.deque(maxlen=history_len)
        self._latest: Snapshot | None = None
        self._listeners: list[Listener] = []
        self._ticks = 0
        self._skipped = 0
        self._listener_errors = 0
        self._last_cost: float | None = None
        self._seq = 0

    # -- configuration ---------------------------------------------------------------------

    @property
    def interval_s(self) -> float:
        """Interval in force now: the base interval, or the fastest active :meth:`fast` one."""
        with self._cond:
            return min([self._base_interval_s, *self._fast_intervals])

    def set_interval(self, interval_s: float) -> None:
        """Change the base interval (config reload); the thread picks it up at once."""
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        with self._cond:
            self._base_interval_s = interval_s
            self._cond.notify_all()

    def add_listener(self, fn: Listener) -> None:
        """Call ``fn(snapshot)`` on the sampler thread after every tick; it must not block."""
        with self._data_lock:
            self._listeners.append(fn)

    def remove_listener(self, fn: Listener) -> None:
        """Stop calling ``fn``; unknown listeners are ignored."""
        with self._data_lock, contextlib.suppress(ValueError):
            self._listeners.remove(fn)

    @contextlib.contextmanager
    def fast(self, interval_s: float = 0.1) -> Iterator[None]:
        """Sample at least every ``interval_s`` inside the ``with`` block (nestable).

        Windows are reference-counted: the interval in force is the smallest one requested by
        any open window, and the base rate returns when the last window closes. The sampler is
        woken so the faster rate starts at once rather than after the current slow interval.
        """
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        with self._cond:
            self._fast_intervals.append(interval_s)
            self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self._fast_intervals.remove(interval_s)
                self._cond.notify_all()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the sampling thread (no-op when running). Probes are checked on the thread."""
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="edgelm-sampler", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 1.0) -> None:
        """Stop the thread and wait for it up to ``timeout_s`` (a probe stuck in I/O is left)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)
            if thread.is_alive():
                logger.warning("sampler thread did not stop within %.1f s", timeout_s)
        with self._cond:
            if self._thread is thread and (thread is None or not thread.is_alive()):
                self._thread = None

    @property
    def running(self) -> bool:
        """True while the sampling thread is alive."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    # -- results ---------------------------------------------------------------------------

    def latest(self) -> Snapshot | None:
        """The most recent snapshot, or None before the first tick."""
        with self._data_lock:
            return self._latest

    def history(self, since_mono_s: float = float("-inf")) -> list[Snapshot]:
        """Snapshots with ``t_mono_s >= since_mono_s`` still in the ring buffer, oldest first."""
        with self._data_lock:
            return [s for s in self._history if s.t_mono_s >= since_mono_s]

    def health(self) -> dict[str, Availability]:
        """Probe name -> availability: the probe's ``check()``, or degraded by repeated errors."""
        with self._data_lock:
            return {st.key: self._health_of(st) for st in self._states}

    def stats(self) -> SamplerStats:
        """Tick, skip and error counters."""
        with self._data_lock:
            return SamplerStats(
                ticks=self._ticks,
                skipped_ticks=self._skipped,
                listener_errors=self._listener_errors,
                probe_errors={st.key: st.total_errors for st in self._states},
                last_tick_cost_s=self._last_cost,
                on_demand_samples=self._on_demand,
            )

    def _health_of(self, st: _ProbeState) -> Availability:
        if st.consecutive_errors >= self._degrade_after:
            return Availability(
                ok=st.availability.ok,
                reason=f"{st.consecutive_errors} consecutive sample errors; last: {st.last_error}",
                degraded=True,
            )
        return st.availability

    # -- sampling --------------------------------------------------------------------------

    def check_probes(self, *, force: bool = False) -> None:
        """Run ``check()`` on probes never checked or last checked ``recheck_s`` ago (or all).

        Every probe is re-checked, not only unavailable ones, so a probe that fell back to a
        degraded source while sampling (jtop service gone) shows it in :meth:`health`.
        """
        now = self._clock()
        for st in self._states:
            due = force or st.checked_at is None or now - st.checked_at >= self._recheck_s
            if not due:
                continue
            try:
                avail = st.probe.check()
            except Exception as exc:  # check() must not raise; a plugin that does is degraded
                avail = Availability(False, f"check() raised {type(exc).__name__}: {exc}")
            with self._data_lock:
                if avail != st.availability and st.checked_at is not None:
                    logger.info("probe %s availability: %s", st.key, avail)
                st.availability = avail
                st.checked_at = now

    def _sample_probe(self, st: _ProbeState, t_mono: float, readings: dict[str, dict[str, Any]],
                      power: list[PowerReading], errors: dict[str, str]) -> None:
        """Sample one probe into the tick's dicts, isolating whatever it raises."""
        started = time.perf_counter()
        try:
            raw = st.probe.sample()
            as_dict = readings_as_dict(raw)
            pw = st.probe.power(raw)
        except Exception as exc:  # isolate every probe, whatever it raises
            msg = f"{type(exc).__name__}: {exc}"
            errors[st.key] = msg
            with self._data_lock:
                st.consecutive_errors += 1
                st.total_errors += 1
                st.last_error = msg
                if st.consecutive_errors == self._degrade_after:
                    logger.warning("probe %s degraded: %s", st.key, msg)
            return
        st.last_cost_s = time.perf_counter() - started
        readings[st.key] = as_dict
        power.extend(pw)
        st.last_readings = as_dict
        st.last_sample_mono = t_mono
        st.samples += 1
        st.gives_power = st.gives_power or bool(pw)
        st.rate_based = st.rate_based or any(
            r.covers == PowerCoverage.ESTIMATE for r in pw)
        if st.consecutive_errors:
            with self._data_lock:
                if st.consecutive_errors >= self._degrade_after:
                    logger.info("probe %s recovered", st.key)
                st.consecutive_errors = 0

    def _append_locked(self, snap: Snapshot) -> None:
        """Add ``snap`` to the history in time order.

        An on-demand power sample can be taken while a tick samples its other probes, so the
        tick may arrive second.
        """
        hist = self._history
        if not hist or hist[-1].t_mono_s <= snap.t_mono_s:
            hist.append(snap)
            return
        if len(hist) == hist.maxlen:
            hist.popleft()
        i = len(hist)
        while i > 0 and hist[i - 1].t_mono_s > snap.t_mono_s:
            i -= 1
        hist.insert(i, snap)

    def sample_once(self) -> Snapshot:
        """Take one tick synchronously: check due probes, sample, store, notify listeners."""
        self.check_probes()
        readings: dict[str, dict[str, Any]] = {}
        power: list[PowerReading] = []
        errors: dict[str, str] = {}
        fast = self.interval_s < self._base_interval_s
        active = [st for st in self._states if st.availability.ok]
        # A rate-based power source (the estimate probe) reports no power on its first
        # sample, so a probe counts as "no power" only after two samples without any.
        power_first = [st for st in active if st.gives_power or st.samples < 2]
        others = [st for st in active if not (st.gives_power or st.samples < 2)]
        # Power sources first, under the lock sample_power_now() takes: the tick's time is
        # the time of its power readings, and a counter's delta is never split between two
        # threads out of order.
        with self._power_lock:
            t_mono = self._clock()
            ts_ms = int(self._wall_clock() * 1000)
            for st in power_first:
                self._sample_probe(st, t_mono, readings, power, errors)
        for st in others:
            if (fast and st.last_readings is not None and st.last_sample_mono is not None
                    and t_mono - st.last_sample_mono < self._base_interval_s * 0.95):
                # Energy windows need power at >= 10 Hz, not CPU or thermal readings: sampling
                # every probe that fast cost ~3 % of a core on a 2-core board (measured by
                # benchmarks/sampler_cost.py) and slowed the very inference being measured.
                readings[st.key] = st.last_readings
                continue
            self._sample_probe(st, t_mono, readings, power, errors)
        readings = {st.key: readings[st.key] for st in self._states if st.key in readings}
        cost = self._clock() - t_mono
        interval_s = self.interval_s
        with self._data_lock:
            self._seq += 1
            snap = Snapshot(
                ts_unix_ms=ts_ms,
                t_mono_s=t_mono,
                readings=readings,
                power=tuple(power),
                errors=errors,
                interval_s=interval_s,
                seq=self._seq,
            )
            self._latest = snap
            self._append_locked(snap)
            self._ticks += 1
            self._last_cost = cost
            listeners = list(self._listeners)
        for fn in listeners:
            try:
                fn(snap)
            except Exception:
                with self._data_lock:
                    self._listener_errors += 1
                logger.exception("sampler listener %r failed", fn)
        return snap

    def sample_power_now(self, max_age_s: float | None = None,
                         max_cost_s: float | None = None) -> Snapshot | None:
        """Sample the power sources now, from the calling thread, into the history only.

        Per-request energy calls this at the start and at the end of the execution window, so
        the window is bracketed by samples however short it is and whatever the sampler
        thread's phase (with 1 Hz ticks a 0.3 s request could start just after one and end
        before the next). It runs only probes that gave power and are not rate-based: a
        counter (RAPL, NVML energy) or a rail read twice in a few ms is still exact, while
        a power *model* over a CPU-time rate (the estimate probe) needs the full interval and
        keeps its state on the sampler thread. Thread-safe with the sampler thread: the two
        take the same lock around power probes, so each counter delta covers the interval
        since the other's read, in time order.

        The snapshot is ``partial`` (power probes' readings only): it goes to :meth:`history`
        for the energy integrator but is not :meth:`latest` and reaches no listener, so
        telemetry never sees it. Errors are not counted towards degrading the probe either
        (the sampler thread's ticks do that).

        Args:
            max_age_s: Return the newest snapshot with power instead of sampling when it is at
                most this old (a window start inside a fast-rate stretch needs no extra read).
            max_cost_s: Leave out probes whose last sample took longer than this (wall time),
                e.g. a Raspberry Pi PMIC read through a ``vcgencmd`` fork, when the caller
                must not wait (a request about to start).

        Returns:
            The snapshot, or None when no such power source is known (yet).
        """
        states = [st for st in self._states
                  if st.availability.ok and st.gives_power and not st.rate_based
                  and (max_cost_s is None or (st.last_cost_s or 0.0) <= max_cost_s)]
        if not states:
            return None
        if max_age_s is not None:
            with self._data_lock:
                recent = next((h for h in reversed(self._history) if h.power), None)
            if recent is not None and self._clock() - recent.t_mono_s <= max_age_s:
                return recent
        readings: dict[str, dict[str, Any]] = {}
        power: list[PowerReading] = []
        with self._power_lock:
            t_mono = self._clock()
            ts_ms = int(self._wall_clock() * 1000)
            for st in states:
                started = time.perf_counter()
                try:
                    raw = st.probe.sample()
                    readings[st.key] = readings_as_dict(raw)
                    power.extend(st.probe.power(raw))
                    st.last_cost_s = time.perf_counter() - started
                except Exception as exc:
                    logger.debug("on-demand power sample of %s failed: %s", st.key, exc)
        if not power:
            return None
        with self._data_lock:
            snap = Snapshot(ts_unix_ms=ts_ms, t_mono_s=t_mono, readings=readings,
                            power=tuple(power), errors={}, interval_s=self.interval_s,
                            seq=self._seq, partial=True)
            self._append_locked(snap)
            self._on_demand += 1
        return snap

    def _run(self) -> None:
        deadline = self._clock()
        while True:
            with self._cond:
                if self._stopping:
                    return
            try:
                self.sample_once()
            except Exception:  # sample_once isolates probes; this guards the bookkeeping
                logger.exception("sampler tick failed")
            with self._cond:
                interval = min([self._base_interval_s, *self._fast_intervals])
                nxt, skipped = next_deadline(deadline, self._clock(), interval)
                while not self._stopping:
                    now = self._clock()
                    if now >= nxt:
                        break
                    if self._cond.wait(nxt - now):
                        # Woken by fast() or stop(): recompute the deadline from the last tick
                        # with the interval now in force. Deadlines that passed meanwhile are a
                        # rate change, not an overrun, so they are not counted as skipped.
                        interval = min([self._base_interval_s, *self._fast_intervals])
                        nxt, _ = next_deadline(deadline, self._clock(), interval)
                if self._stopping:
                    return
            if skipped:
                with self._data_lock:
                    self._skipped += skipped
            deadline = nxt
