"""TaskManagementService over real gRPC: create/get/list/cancel, model versions, and every bad input."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from fedcompute.core import checkpoints
from fedcompute.v1 import task_management_pb2 as tm
from tests.harness import Harness, task_spec


def test_create_get_list_cancel(harness: Harness) -> None:
    task = harness.create_task("alpha", rounds=3)
    assert task.status == tm.TASK_STATUS_OPEN
    assert (task.current_round, task.latest_model_version) == (1, 1)
    assert harness.task(task.task_id) == task
    harness.create_task("beta")
    listed = harness.operators.list_tasks(tm.ListTasksRequest(population_name="alpha")).tasks
    assert [t.task_id for t in listed] == [task.task_id]
    assert len(harness.operators.list_tasks(tm.ListTasksRequest()).tasks) == 2
    paged = harness.operators.list_tasks(tm.ListTasksRequest(page_size=1))
    assert len(paged.tasks) == 1
    assert paged.next_page_token
    versions = harness.operators.list_model_versions(tm.ListModelVersionsRequest(task_id=task.task_id)).versions
    assert [v.version for v in versions] == [1]
    canceled = harness.operators.cancel_task(tm.CancelTaskRequest(task_id=task.task_id, reason="test")).task
    assert canceled.status == tm.TASK_STATUS_CANCELED
    assert canceled.status_reason == "test"
    assert harness.iterations(task.task_id)[0].status == tm.ITERATION_STATUS_CANCELED


def test_initial_weights_are_used_and_checked(harness: Harness) -> None:
    weights = checkpoints.encode(checkpoints.initial_weights("digits-linear-v1", seed=7))
    task = harness.create_task(initial_weights=weights)
    versions = harness.operators.list_model_versions(tm.ListModelVersionsRequest(task_id=task.task_id)).versions
    assert versions[0].checkpoint.size_bytes == len(weights)
    wrong = checkpoints.encode(checkpoints.initial_weights("digits-mlp-v1", seed=7))
    with pytest.raises(grpc.RpcError) as info:
        harness.create_task(initial_weights=wrong)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "spec.initial_weights" in (info.value.details() or "")


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"report_goal": 0}, "spec.report_goal"),
        ({"report_goal": -3}, "spec.report_goal"),
        ({"report_goal": 5, "max_cohort": 4}, "spec.max_cohort"),
        ({"rounds": 0}, "spec.rounds"),
        ({"model_architecture": "no-such-model"}, "spec.model_architecture"),
        ({"population_name": ""}, "spec.population_name"),
    ],
)
def test_create_task_bad_input_names_the_field(harness: Harness, fields: dict[str, Any], named: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        harness.create_task_raw(**fields)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in (info.value.details() or "")
    assert harness.operators.list_tasks(tm.ListTasksRequest()).tasks == []


def test_create_task_needs_a_policy_that_matches_the_spec(harness: Harness) -> None:
    """A task without an access policy, or whose policy says something the spec does not, is never created."""
    with pytest.raises(grpc.RpcError) as info:
        harness.create_task_raw()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "access_policy" in (info.value.details() or "")
    signed = harness.create_task("pop", report_goal=2).access_policy
    for change in ({"min_clients": 1}, {"population_name": "other"}):
        weaker = tm.CreateTaskRequest(spec=task_spec("pop", report_goal=2), access_policy=signed)
        for name, value in change.items():
            setattr(weaker.access_policy.policy, name, value)
        with pytest.raises(grpc.RpcError) as info:
            harness.operators.create_task(weaker)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "does not match the spec" in (info.value.details() or "")
    assert len(harness.operators.list_tasks(tm.ListTasksRequest()).tasks) == 1


def test_unknown_task_is_not_found(harness: Harness) -> None:
    for call in (
        lambda: harness.operators.get_task(tm.GetTaskRequest(task_id="task_nope")),
        lambda: harness.operators.cancel_task(tm.CancelTaskRequest(task_id="task_nope")),
        lambda: harness.operators.list_model_versions(tm.ListModelVersionsRequest(task_id="task_nope")),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
