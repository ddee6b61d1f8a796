"""Pace steering: retry windows follow the live check-in rate against what the open rounds need."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Histogram

from fedcompute.server.assignment import Refusal, Rejection
from fedcompute.server.pace import MAX_STRETCH, PaceSteering


class Ticks:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _pace(ticks: Ticks, windows: Histogram | None = None) -> PaceSteering:
    return PaceSteering((1.0, 10.0), (10.0, 100.0), random.Random(0), ticks, windows)


def test_a_small_population_bunches_up_and_a_large_one_spreads_out() -> None:
    ticks = Ticks()
    pace = _pace(ticks)
    full = Refusal(Rejection.NO_TASK_AVAILABLE, "full", cohort=50)
    for _ in range(30):  # 0.5 check-ins per second: 5 would come back per 10 s window, the round takes 50
        pace.observe("small")
    _, small = pace.window(full, "small")
    assert small == 10.0
    for _ in range(6000):  # 100 per second: 1,000 per window for a cohort of 50 -> stretched 20x (the cap)
        pace.observe("large")
    start, large = pace.window(full, "large")
    assert large == 10.0 * MAX_STRETCH
    assert 1.0 * MAX_STRETCH <= start <= large


def test_the_rate_forgets_check_ins_older_than_the_horizon_and_windows_are_measured() -> None:
    ticks = Ticks()
    registry = CollectorRegistry()
    windows = Histogram("fedcompute_server_retry_window_seconds", "w", ["reason"], registry=registry)
    pace = _pace(ticks, windows)
    for _ in range(600):
        pace.observe("pop")
    assert pace.rate("pop") == 10.0
    ticks.now += 61
    assert pace.rate("pop") == 0.0
    _, high = pace.window(Refusal(Rejection.NO_ACTIVE_TASK, "none"), "pop")
    assert high == 100.0  # the long window, unstretched
    count = registry.get_sample_value("fedcompute_server_retry_window_seconds_count", {"reason": "NO_ACTIVE_TASK"})
    assert count == 1


def test_a_busy_population_costs_a_bucket_per_second_not_an_entry_per_check_in() -> None:
    ticks = Ticks()
    pace = _pace(ticks)
    for _ in range(1200):  # two minutes at 10,000 check-ins per second
        for _ in range(1000):
            pace.observe("busy")
        ticks.now += 0.1
    assert 9_800 <= pace.rate("busy") <= 10_200  # 10,000 per second, to the second
    assert len(pace._seen["busy"]) <= 61  # the bound is the point
