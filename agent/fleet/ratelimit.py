"""Per-device sliding-window budgets of requests and tokens, shared by router and simulator.

The paper's fleet model (arXiv 2505.16508, §fleet) caps what each device accepts within a sliding
window so that one device is never driven past its sustainable rate; requests beyond every
device's budget go to the cloud. A budget holds the admissions of the last ``window_s`` seconds
(time stamps from any monotonic clock: ``time.monotonic()`` in the router, simulated seconds in
the simulator). Admission is O(1) amortised: expired entries are pruned from the left of a deque
while a running token sum is kept.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WindowLimits:
    """The budget of one device.

    Attributes:
        window_s: Length of the sliding window, in seconds.
        max_requests: Requests admitted per window (``None``: unlimited).
        max_tokens: Tokens (prompt + completion) admitted per window (``None``: unlimited).
    """

    window_s: float = 60.0
    max_requests: int | None = None
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if not self.window_s > 0:
            raise ValueError("window_s must be > 0")
        if self.max_requests is not None and self.max_requests < 1:
            raise ValueError("max_requests must be >= 1 or None")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1 or None")


class SlidingWindowBudget:
    """Admissions of one device within the last ``limits.window_s`` seconds."""

    __slots__ = ("_entries", "_tokens", "limits")

    def __init__(self, limits: WindowLimits) -> None:
        self.limits = limits
        self._entries: collections.deque[tuple[float, int]] = collections.deque()
        self._tokens = 0

    def _prune(self, now: float) -> None:
        horizon = now - self.limits.window_s
        entries = self._entries
        while entries and entries[0][0] <= horizon:
            self._tokens -= entries.popleft()[1]

    def allows(self, now: float, tokens: int) -> bool:
        """Whether ``tokens`` more (one more request) fit in the window ending at ``now``.

        A single request larger than the whole token budget is admitted into an empty window,
        so that an oversized request is not starved forever.
        """
        self._prune(now)
        lim = self.limits
        if lim.max_requests is not None and len(self._entries) >= lim.max_requests:
            return False
        if lim.max_tokens is not None and self._tokens + tokens > lim.max_tokens:
            return not self._entries
        return True

    def admit(self, now: float, tokens: int) -> None:
        """Record an admission (call after :meth:`allows`; it does not check)."""
        self._entries.append((now, tokens))
        self._tokens += tokens

    def refund(self, now: float, tokens: int) -> None:
        """Cancel the most recent admission that charged exactly ``tokens``.

        Used when an admitted request never ran (the device died or refused it), so its budget is
        not charged twice.
        """
        for i in range(len(self._entries) - 1, -1, -1):
            _t, n = self._entries[i]
            if n == tokens:
                del self._entries[i]
                self._tokens -= n
                return
        self._prune(now)

    def next_allowed_at(self, now: float, tokens: int) -> float:
        """Earliest time at which :meth:`allows` can become true for ``tokens`` (≥ ``now``)."""
        if self.allows(now, tokens):
            return now
        lim = self.limits
        at = now
        if lim.max_requests is not None and len(self._entries) >= lim.max_requests:
            at = max(at, self._entries[len(self._entries) - lim.max_requests][0] + lim.window_s)
        if lim.max_tokens is not None and self._tokens + tokens > lim.max_tokens:
            need = self._tokens + tokens - lim.max_tokens
            freed = 0
            for t, n in self._entries:
                freed += n
                if freed >= need:
                    at = max(at, t + lim.window_s)
                    break
            else:
                at = max(at, self._entries[-1][0] + lim.window_s)
        return math.nextafter(at, math.inf)

    def remaining_fraction(self, now: float) -> float:
        """The smaller of the unused request and token shares of the window, in [0, 1]."""
        self._prune(now)
        lim = self.limits
        frac = 1.0
        if lim.max_requests is not None:
            frac = min(frac, 1.0 - len(self._entries) / lim.max_requests)
        if lim.max_tokens is not None:
            frac = min(frac, 1.0 - self._tokens / lim.max_tokens)
        return max(0.0, frac)

    def used(self, now: float) -> tuple[int, int]:
        """``(requests, tokens)`` admitted within the window ending at ``now``."""
        self._prune(now)
        return len(self._entries), self._tokens


class RateLimiter:
    """One :class:`SlidingWindowBudget` per device, created on first use.

    Args:
        default: Limits for devices without their own.
        per_device: Limits for named devices.
    """

    def __init__(self, default: WindowLimits,
                 per_device: dict[str, WindowLimits] | None = None) -> None:
        self.default = default
        self._per_device = dict(per_device or {})
        self._budgets: dict[str, SlidingWindowBudget] = {}

    def set_limits(self, device: str, limits: WindowLimits) -> None:
        """Give ``device`` its own limits (keeps what it has admitted so far)."""
        self._per_device[device] = limits
        budget = self._budgets.get(device)
        if budget is not None:
            budget.limits = limits

    def budget(self, device: str) -> SlidingWindowBudget:
        """The budget of ``device``."""
        b = self._budgets.get(device)
        if b is None:
            b = self._budgets[device] = SlidingWindowBudget(
                self._per_device.get(device, self.default))
        return b

    def allows(self, device: str, now: float, tokens: int) -> bool:
        """See :meth:`SlidingWindowBudget.allows`."""
        return self.budget(device).allows(now, tokens)

    def admit(self, device: str, now: float, tokens: int) -> None:
        """See :meth:`SlidingWindowBudget.admit`."""
        self.budget(device).admit(now, tokens)
