"""Device selection for the edge-first router and the simulator (one implementation for both).

The paper (arXiv 2505.16508) compares three ways to pick the device for a request:

- ``random``: uniform over the devices that are online and can serve the model;
- ``weighted``: random, weighted by measured decode throughput (tok/s from bench records or
  observed results), so faster devices get proportionally more work;
- ``load_aware``: the device that is expected to finish the request soonest, from live state:
  its backlog (queue depth × service time), utilisation, throttling and the share of its
  sliding-window budget that is left.

``random`` and ``weighted`` are oblivious: they draw a device and then ask it (its rate-limit
budget and its backlog) whether it can take the request; after ``attempts`` refusals the request
falls back to the cloud. ``load_aware`` looks at every device's state. Both the router
(:mod:`agent.fleet.router`) and the simulator (:mod:`agent.fleet.simulator`) drive the same
:class:`FleetState` and the same policy objects, with wall-clock or simulated seconds.

``load_aware`` keeps its devices in a heap keyed by expected finish time so that one selection
costs O(log n) rather than a scan (the simulator routes a million requests over 100 devices);
devices refused for their budget or backlog wait in a second heap until they can be asked again.
"""

from __future__ import annotations

import bisect
import heapq
import random
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from agent.fleet.ratelimit import RateLimiter

# Refusal reasons of one device for one request.
OFFLINE = "offline"
UNKNOWN_MODEL = "unknown_model"
CONTEXT = "context_overflow"
RATE_LIMITED = "rate_limited"
BUSY = "busy"

# Why a request went to the cloud (or nowhere).
NO_MODEL = "no_model"  # no online device serves the model
NO_CONTEXT = "context_overflow"  # the prompt exceeds every device's context
NO_CAPACITY = "no_capacity"  # no device can take it within its budget and in time

POLICIES = ("random", "weighted", "load_aware")


class Demand(NamedTuple):
    """What a request asks of a device (a named tuple: the simulator makes millions).

    Attributes:
        prompt_tokens: Prompt length (the router estimates it; the simulator knows it).
        completion_tokens: Expected completion length (``max_tokens`` in the router).
        model: Requested model, or ``None`` for any.
    """

    prompt_tokens: int
    completion_tokens: int
    model: str | None = None

    @property
    def tokens(self) -> int:
        """Tokens charged against a device's window budget."""
        return self.prompt_tokens + self.completion_tokens


@dataclass(eq=False)
class DeviceState:
    """What the router (or the simulator) knows about one device.

    Attributes:
        name: Device id.
        decode_tok_s / prefill_tok_s: Measured throughput (bench records, results or presets).
        context_tokens: Context window of the loaded model.
        models: Names (and hashes) of the models it serves; empty means any.
        online: False as soon as its LWT (or an offline status) arrives.
        free_at: When its known backlog is expected to be done (same clock as ``now``).
        outstanding: Requests sent to it and not yet finished.
        max_outstanding: More outstanding requests than this are refused (``busy``).
        utilisation: Live busy share in [0, 1] (telemetry); 0 when unknown.
        throttled: Thermal or power throttling reported by telemetry.
        power_w / idle_power_w: Power while serving and idle (energy accounting).
        version: Bumped by :meth:`FleetState.changed`; policies use it to spot stale entries.
    """

    name: str
    decode_tok_s: float
    prefill_tok_s: float
    context_tokens: int
    models: frozenset[str] = frozenset()
    online: bool = True
    free_at: float = 0.0
    outstanding: int = 0
    max_outstanding: int = 16
    utilisation: float = 0.0
    throttled: bool = False
    power_w: float = 0.0
    idle_power_w: float = 0.0
    version: int = 0
    extra: dict[str, object] = field(default_factory=dict)

    def service_s(self, demand: Demand) -> float:
        """Expected service time: prefill plus decode."""
        return (demand.prompt_tokens / self.prefill_tok_s
                + demand.completion_tokens / self.decode_tok_s)

    def serves(self, model: str | None) -> bool:
        """Whether this device has ``model`` loaded."""
        return model is None or not self.models or model in self.models


@dataclass(frozen=True)
class Decision:
    """Where one request goes: a device, or ``None`` with the fallback reason."""

    device: DeviceState | None
    reason: str | None = None


class FleetState:
    """Devices, their budgets and the admission rule, shared by every policy.

    Args:
        limiter: Per-device sliding-window budgets.
        max_wait_s: A device whose backlog would delay the request longer than this refuses it
            (``busy``): the "in time" of the edge-first rule.
    """

    def __init__(self, limiter: RateLimiter, max_wait_s: float = 10.0) -> None:
        self.limiter = limiter
        self.max_wait_s = max_wait_s
        self.devices: dict[str, DeviceState] = {}
        self.membership = 0  # bumped when a device joins, leaves, goes on- or offline
        self._listeners: list[SelectionPolicy] = []
        self._static_cache: dict[str | None, int] = {}
        self._static_membership = -1

    def attach(self, policy: SelectionPolicy) -> None:
        """Let ``policy`` hear about every change."""
        self._listeners.append(policy)
        for dev in self.devices.values():
            policy.on_change(dev, 0.0)

    def add(self, device: DeviceState, now: float = 0.0) -> None:
        """Add (or replace) a device."""
        self.devices[device.name] = device
        self.membership += 1
        self.changed(device, now)

    def set_online(self, name: str, online: bool, now: float) -> DeviceState | None:
        """Mark a device on- or offline (offline leaves every selection at once)."""
        dev = self.devices.get(name)
        if dev is None or dev.online == online:
            return dev
        dev.online = online
        if online:
            dev.free_at = now
            dev.outstanding = 0
        self.membership += 1
        self.changed(dev, now)
        return dev

    def changed(self, dev: DeviceState, now: float) -> None:
        """Tell the policies that ``dev``'s state changed."""
        dev.version += 1
        for policy in self._listeners:
            policy.on_change(dev, now)

    def online(self) -> list[DeviceState]:
        """Devices currently online."""
        return [d for d in self.devices.values() if d.online]

    def static_reason(self, demand: Demand) -> str | None:
        """Why no device at all could serve ``demand`` (``no_model``, ``context_overflow``)."""
        if self._static_membership != self.membership:
            self._static_cache.clear()
            self._static_membership = self.membership
        best = self._static_cache.get(demand.model)
        if best is None:
            best = max((d.context_tokens for d in self.devices.values()
                        if d.online and d.serves(demand.model)), default=-1)
            self._static_cache[demand.model] = best
        if best < 0:
            return NO_MODEL
        if demand.prompt_tokens >= best:
            return NO_CONTEXT
        return None

    def refusal(self, dev: DeviceState, now: float, demand: Demand) -> str | None:
        """Why ``dev`` cannot take ``demand`` now, or ``None`` if it can."""
        if not dev.online:
            return OFFLINE
        if not dev.serves(demand.model):
            return UNKNOWN_MODEL
        if demand.prompt_tokens >= dev.context_tokens:
            return CONTEXT
        if dev.outstanding >= dev.max_outstanding or dev.free_at - now > self.max_wait_s:
            return BUSY
        if not self.limiter.allows(dev.name, now, demand.tokens):
            return RATE_LIMITED
        return None

    def retry_at(self, dev: DeviceState, now: float, demand: Demand, reason: str) -> float:
        """When a device refused as ``busy`` or ``rate_limited`` is worth asking again."""
        if reason == RATE_LIMITED:
            return self.limiter.budget(dev.name).next_allowed_at(now, demand.tokens)
        if dev.free_at - now > self.max_wait_s:
            return dev.free_at - self.max_wait_s
        return now + dev.service_s(demand)

    def commit(self, dev: DeviceState, now: float, demand: Demand) -> float:
        """Charge ``demand`` to ``dev``; return the expected service time."""
        service = dev.service_s(demand)
        self.limiter.admit(dev.name, now, demand.tokens)
        dev.free_at = max(dev.free_at, now) + service
        dev.outstanding += 1
        self.changed(dev, now)
        return service

    def finish(self, dev: DeviceState, now: float) -> None:
        """One outstanding request of ``dev`` finished (or was abandoned)."""
        dev.outstanding = max(0, dev.outstanding - 1)
        if dev.outstanding == 0:
            dev.free_at = min(dev.free_at, now)
        self.changed(dev, now)

    def route(self, policy: SelectionPolicy, now: float, demand: Demand,
              exclude: Iterable[str] = ()) -> Decision:
        """Pick a device for ``demand`` with ``policy`` and charge it, or say why not."""
        reason = self.static_reason(demand)
        if reason is not None:
            return Decision(None, reason)
        dev = policy.select(now, demand, frozenset(exclude))
        if dev is None:
            return Decision(None, NO_CAPACITY)
        self.commit(dev, now, demand)
        return Decision(dev)


class SelectionPolicy(ABC):
    """A device-selection rule bound to one :class:`FleetState`."""

    name = "abstract"

    def __init__(self, fleet: FleetState, rng: random.Random | None = None) -> None:
        self.fleet = fleet
        self.rng = rng or random.Random()
        fleet.attach(self)

    def on_change(self, dev: DeviceState, now: float) -> None:  # noqa: B027 - optional hook
        """Called by the fleet whenever ``dev`` changed."""

    @abstractmethod
    def select(self, now: float, demand: Demand, exclude: frozenset[str]) -> DeviceState | None:
        """A device that can take ``demand`` now, or ``None`` (the request falls back)."""


class RandomPolicy(SelectionPolicy):
    """Uniform draw among online devices; up to ``attempts`` devices are asked."""

    name = "random"

    def __init__(self, fleet: FleetState, rng: random.Random | None = None,
                 attempts: int = 2) -> None:
        self.attempts = attempts
        self._members: list[DeviceState] = []
        self._membership = -1
        super().__init__(fleet, rng)

    def _refresh(self) -> None:
        if self._membership != self.fleet.membership:
            self._members = self.fleet.online()
            self._membership = self.fleet.membership
            self._rebuilt()

    def _rebuilt(self) -> None:
        """Hook for subclasses: the member list changed."""

    def _draw(self, members: list[DeviceState], filtered: bool) -> DeviceState:
        return members[int(self.rng.random() * len(members))]

    def select(self, now: float, demand: Demand, exclude: frozenset[str]) -> DeviceState | None:
        """Ask up to ``attempts`` distinct randomly drawn devices (excluded ones never drawn)."""
        self._refresh()
        members = self._members
        filtered = False
        if exclude:
            members = [d for d in members if d.name not in exclude]
            filtered = True
        if not members:
            return None
        want = min(self.attempts, len(members))
        asked: set[str] = set()
        for _ in range(want * 8):  # repeated draws of an asked device are redrawn, bounded
            dev = self._draw(members, filtered)
            if dev.name in asked:
                continue
            asked.add(dev.name)
            if self.fleet.refusal(dev, now, demand) is None:
                return dev
            if len(asked) >= want:
                break
        return None


class WeightedPolicy(RandomPolicy):
    """Draw weighted by measured decode tok/s; up to ``attempts`` devices are asked."""

    name = "weighted"

    def __init__(self, fleet: FleetState, rng: random.Random | None = None,
                 attempts: int = 2) -> None:
        self._cumulative: list[float] = []
        self._weights_key: tuple[float, ...] = ()
        self._index: dict[str, int] = {}
        super().__init__(fleet, rng, attempts)

    def _rebuilt(self) -> None:
        total = 0.0
        self._cumulative = []
        for d in self._members:
            total += max(d.decode_tok_s, 1e-9)
            self._cumulative.append(total)
        self._weights_key = tuple(d.decode_tok_s for d in self._members)
        self._index = {d.name: i for i, d in enumerate(self._members)}

    def on_change(self, dev: DeviceState, now: float) -> None:
        """Rebuild the weights when a member's measured throughput changed."""
        i = self._index.get(dev.name)
        if i is not None and self._weights_key[i] != dev.decode_tok_s:
            self._rebuilt()

    def _draw(self, members: list[DeviceState], filtered: bool) -> DeviceState:
        if filtered:  # a retry that excludes devices: weigh the rest on the fly
            x = self.rng.random() * sum(max(d.decode_tok_s, 1e-9) for d in members)
            for d in members:
                x -= max(d.decode_tok_s, 1e-9)
                if x <= 0:
                    return d
            return members[-1]
        x = self.rng.random() * self._cumulative[-1]
        i = bisect.bisect_right(self._cumulative, x)
        return members[min(i, len(members) - 1)]


class LoadAwarePolicy(SelectionPolicy):
    """The device expected to finish soonest, from live backlog, load, throttling and budget.

    Args:
        fleet: The shared fleet state.
        rng: Unused (ties break by name); accepted for a uniform constructor.
        ref_demand: The request used to compare devices' speed in the score.
    """

    name = "load_aware"

    def __init__(self, fleet: FleetState, rng: random.Random | None = None,
                 ref_demand: Demand | None = None) -> None:
        self.ref_demand = ref_demand or Demand(256, 128)
        self._ready: list[tuple[float, str, int]] = []
        self._blocked: list[tuple[float, str, int]] = []
        super().__init__(fleet, rng)

    def score(self, dev: DeviceState, now: float) -> float:
        """Expected finish time of a reference request on ``dev`` (lower is better).

        The reference service time is stretched by live utilisation (a busy CPU serves slower),
        by throttling (×2) and by how little of the window budget is left (×1 … ×2), so devices
        near their budget are used last.
        """
        penalty = 1.0 + dev.utilisation
        if dev.throttled:
            penalty *= 2.0
        penalty *= 2.0 - self.fleet.limiter.budget(dev.name).remaining_fraction(now)
        return max(dev.free_at, now) + dev.service_s(self.ref_demand) * penalty

    def on_change(self, dev: DeviceState, now: float) -> None:
        """Re-key ``dev`` (stale entries are skipped by version)."""
        if dev.online:
            heapq.heappush(self._ready, (self.score(dev, now), dev.name, dev.version))
        if len(self._ready) > 8 * len(self.fleet.devices) + 64:
            self._ready = [(self.score(d, now), d.name, d.version)
                           for d in self.fleet.devices.values() if d.online]
            heapq.heapify(self._ready)

    def select(self, now: float, demand: Demand, exclude: frozenset[str]) -> DeviceState | None:
        """Pop devices in score order until one accepts; park refused ones until they can."""
        devices = self.fleet.devices
        blocked = self._blocked
        while blocked and blocked[0][0] <= now:
            _t, name, version = heapq.heappop(blocked)
            dev = devices.get(name)
            if dev is not None and dev.version == version and dev.online:
                heapq.heappush(self._ready, (self.score(dev, now), name, version))
        aside: list[tuple[float, str, int]] = []
        chosen: DeviceState | None = None
        ready = self._ready
        while ready:
            entry = heapq.heappop(ready)
            dev = devices.get(entry[1])
            if dev is None or dev.version != entry[2] or not dev.online:
                continue  # stale: a newer entry exists, or the device left
            if dev.name in exclude:
                aside.append(entry)
                continue
            why = self.fleet.refusal(dev, now, demand)
            if why is None:
                chosen = dev
                aside.append(entry)
                break
            if why in (BUSY, RATE_LIMITED):
                heapq.heappush(blocked, (self.fleet.retry_at(dev, now, demand, why),
                                         dev.name, dev.version))
            else:
                aside.append(entry)
        for entry in aside:
            heapq.heappush(ready, entry)
        return chosen


def make_policy(name: str, fleet: FleetState, rng: random.Random | None = None,
                attempts: int = 2) -> SelectionPolicy:
    """Build a policy by name (``random``, ``weighted``, ``load_aware``).

    Raises:
        ValueError: Unknown name.
    """
    if name == "random":
        return RandomPolicy(fleet, rng, attempts)
    if name == "weighted":
        return WeightedPolicy(fleet, rng, attempts)
    if name == "load_aware":
        return LoadAwarePolicy(fleet, rng)
    raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")


def jain_index(values: Iterable[float]) -> float:
    """Jain's fairness index (Σx)² / (n·Σx²): 1 when all equal, 1/n when one takes all.

    Returns 1.0 for an empty or all-zero input (nothing is unfair about no load).
    """
    xs = list(values)
    sq = sum(x * x for x in xs)
    if not xs or sq == 0:
        return 1.0
    return sum(xs) ** 2 / (len(xs) * sq)
