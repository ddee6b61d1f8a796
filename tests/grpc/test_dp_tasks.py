"""DP settings over CreateTask: every bad budget is INVALID_ARGUMENT naming the field; good ones are calibrated."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from fedcompute.v1 import task_management_pb2 as tm
from tests.harness import Harness


def dp(**fields: Any) -> tm.DpConfig:
    values: dict[str, Any] = {
        "enabled": True,
        "target_epsilon": 8.0,
        "target_delta": 1e-5,
        "assumed_population_size": 1000,
        "l2_clip_norm": 1.0,
    }
    values.update(fields)
    return tm.DpConfig(**values)


@pytest.mark.parametrize(
    ("config", "named"),
    [
        (dp(target_epsilon=0.0), "spec.dp.target_epsilon"),
        (dp(target_epsilon=-2.0), "spec.dp.target_epsilon"),
        (dp(target_delta=0.0), "spec.dp.target_delta"),
        (dp(target_delta=1.5), "spec.dp.target_delta"),
        (dp(l2_clip_norm=0.0), "spec.dp.l2_clip_norm"),
        (dp(l2_clip_norm=-1.0), "spec.dp.l2_clip_norm"),
        (dp(assumed_population_size=2), "spec.dp.assumed_population_size"),
        (dp(noise_multiplier=0.05), "spec.dp.noise_multiplier"),
        (dp(target_epsilon=1e-4), "spec.dp.target_epsilon"),
    ],
)
def test_bad_budgets_are_invalid_argument(harness: Harness, config: tm.DpConfig, named: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        harness.create_task_raw(dp=config)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details() or ""
    assert named in details
    if named.endswith(("noise_multiplier", "target_epsilon")) and "cannot" in details + "contradicts":
        assert "ε=" in details
    assert harness.operators.list_tasks(tm.ListTasksRequest()).tasks == []


def test_budget_is_calibrated_and_reported(harness: Harness) -> None:
    task = harness.create_task(dp=dp(), rounds=3)
    assert task.spec.dp.noise_multiplier > 0
    assert task.spec.dp.min_clients == task.spec.report_goal
    assert task.epsilon_spent == 0.0
    assert harness.iterations(task.task_id)[0].clip_norm == 1.0
