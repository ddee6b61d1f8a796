"""Selection among a population's open tasks: traffic weights and the minimum separation between rounds."""

from __future__ import annotations

import random
from datetime import UTC, datetime

from fedcompute.core.records import TaskRecord
from fedcompute.core.tasks import TaskSpec
from fedcompute.server.assignment import too_soon, weighted_order


def _task(task_id: str, weight: float = 1.0, separation: int = 1) -> TaskRecord:
    spec = TaskSpec("pop", "digits-linear-v1", 5, 2, 3, traffic_weight=weight, min_separation_rounds=separation)
    return TaskRecord(task_id, spec, "OPEN", 1, 1, "0" * 64, 2, datetime.now(UTC), "")


def test_tasks_are_offered_in_proportion_to_their_traffic_weight() -> None:
    rng = random.Random(7)
    heavy, light = _task("task_heavy", 3.0), _task("task_light", 1.0)
    first = [weighted_order([heavy, light], rng)[0].task_id for _ in range(4000)]
    share = first.count("task_heavy") / len(first)
    assert abs(share - 0.75) < 0.03  # 3 : 1
    assert sorted(t.task_id for t in weighted_order([heavy, light], rng)) == ["task_heavy", "task_light"]


def test_a_device_waits_min_separation_rounds_before_the_same_task_again() -> None:
    task = _task("task_a", separation=3)
    done = {("task_a", 4), ("task_b", 6)}
    assert too_soon(task, 4, done)  # the same round
    assert too_soon(task, 6, done)  # 2 rounds later: 3 needed
    assert not too_soon(task, 7, done)
    assert not too_soon(_task("task_c"), 6, done)
