"""Pace steering (ODP's and Bonawitz et al. 2019's): every refusal tells the device when to come back, sized by
the live check-in rate of its population against what its open rounds need.

The base windows are the settings' (short: the round is full or the result is not needed; long: nothing for
this device at all). For a population whose check-ins over the last minute would bring back more devices
within one base window than its open rounds' cohorts hold, the window is stretched by that ratio (at most
``MAX_STRETCH``), so about one cohort's worth returns per window: a large population spreads out, a small one
bunches up. Each replica measures its own traffic; the suggested windows go to a metrics histogram.
"""

from __future__ import annotations

import random
import threading
from collections import deque
from collections.abc import Callable

from prometheus_client import Histogram

from fedcompute.server.assignment import Refusal, Rejection

HORIZON_S = 60.0
MAX_STRETCH = 20.0
MAX_POPULATIONS = 10_000
SHORT = (Rejection.NO_TASK_AVAILABLE, Rejection.RESULT_NOT_NEEDED)


class PaceSteering:
    def __init__(
        self,
        short: tuple[float, float],
        long: tuple[float, float],
        rng: random.Random,
        monotonic: Callable[[], float],
        windows: Histogram | None = None,
    ) -> None:
        self._short = short
        self._long = long
        self._rng = rng
        self._now = monotonic
        self._windows = windows
        # per population, check-ins counted in whole-second buckets [second, count] over the last HORIZON_S:
        # at most 61 buckets whatever the rate, so observing and reading the rate are O(1) in the traffic
        self._seen: dict[str, deque[list[int]]] = {}
        self._lock = threading.Lock()

    def observe(self, population: str) -> None:
        """Count one check-in of ``population`` (call on every CreateTaskAssignment)."""
        now = self._now()
        with self._lock:
            if population not in self._seen and len(self._seen) >= MAX_POPULATIONS:
                self._seen.clear()  # bounded memory under a flood of made-up population names
            seen = self._seen.setdefault(population, deque())
            second = int(now)
            if seen and seen[-1][0] == second:
                seen[-1][1] += 1
            else:
                seen.append([second, 1])
            _trim(seen, now)

    def rate(self, population: str) -> float:
        """Check-ins per second over the last minute (to the second)."""
        now = self._now()
        with self._lock:
            seen = self._seen.get(population)
            if not seen:
                return 0.0
            _trim(seen, now)
            return sum(count for _, count in seen) / HORIZON_S

    def window(self, refusal: Refusal, population: str) -> tuple[float, float]:
        low, high = self._short if refusal.reason in SHORT else self._long
        arrivals = self.rate(population) * high
        stretch = min(max(arrivals / max(refusal.cohort, 1), 1.0), MAX_STRETCH)
        low, high = low * stretch, high * stretch
        start = self._rng.uniform(low, (low + high) / 2)  # jitter so a fleet does not come back at once
        if self._windows is not None:
            self._windows.labels(refusal.reason.value).observe(high)
        return start, high


def _trim(seen: deque[list[int]], now: float) -> None:
    """Drop the buckets wholly older than the horizon."""
    while seen and seen[0][0] + 1 <= now - HORIZON_S:
        seen.popleft()
