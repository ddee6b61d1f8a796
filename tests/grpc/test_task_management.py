"""TaskManagementService over real gRPC: create/get/list/cancel, model versions, and every bad input."""

from __future__ import annotations

import math
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
    open_ones = harness.operators.list_tasks(tm.ListTasksRequest(status=tm.TASK_STATUS_OPEN)).tasks
    assert [t.spec.population_name for t in open_ones] == ["beta"]
    gone = harness.operators.list_tasks(tm.ListTasksRequest(population_name="beta", status=tm.TASK_STATUS_CANCELED))
    assert list(gone.tasks) == []
    with pytest.raises(grpc.RpcError) as info:
        harness.operators.list_tasks(tm.ListTasksRequest(status=99))  # type: ignore[arg-type]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "status" in (info.value.details() or "")


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
        ({"report_goal": 40_001, "max_cohort": 40_001}, "spec.report_goal"),  # more than one key release covers
        ({"rounds": 0}, "spec.rounds"),
        ({"model_architecture": "no-such-model"}, "spec.model_architecture"),
        ({"population_name": ""}, "spec.population_name"),
        ({"population_name": "p" * 256}, "spec.population_name"),  # one past its column: INTERNAL on Postgres before
        ({"population_name": "p\x00q"}, "spec.population_name"),  # Postgres stores no NUL: INTERNAL before
        ({"server_learning_rate": math.inf}, "spec.server_learning_rate"),  # a model of NaN and inf at publish
        ({"traffic_weight": math.inf}, "spec.traffic_weight"),
        (
            {"hyperparameters": tm.TrainingHyperparameters(local_epochs=1, batch_size=16, learning_rate=math.inf)},
            "spec.hyperparameters.learning_rate",
        ),
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


def _built_plan() -> Any:
    import torch
    from torch import nn

    from fedcompute.clients.builder import TaskBuilder
    from fedcompute.core.plans import ExampleSelector

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 1))
    builder = TaskBuilder(
        model,
        torch.zeros(4, 30),
        name="cancer",
        loss="bce_with_logits",
        metrics=("loss", "accuracy", "auc"),
        example_selector=ExampleSelector("breast_cancer"),
    )
    return builder.build()


def test_a_task_runs_the_plan_it_was_given(harness: Harness) -> None:
    from fedcompute.clients.device import download

    built = _built_plan()
    task = harness.create_task(model_architecture="", plan=built.plan_bytes, initial_weights=built.initial_weights)
    assert (task.model_name, task.parameter_count) == ("cancer", 30 * 16 + 16 + 16 + 1)
    assert download(harness.resources, task.plan) == built.plan_bytes
    [v1] = harness.operators.list_model_versions(tm.ListModelVersionsRequest(task_id=task.task_id)).versions
    assert download(harness.resources, v1.checkpoint) == built.initial_weights
    assert task.plan.media_type == "application/vnd.fedcompute.plan.v2+json"


def _edited(plan: bytes, path: tuple[str, ...], value: object) -> bytes:
    import json

    doc = json.loads(plan)
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return json.dumps(doc).encode()


def test_bad_plans_are_refused_and_nothing_is_stored(harness: Harness) -> None:
    import pickle

    built = _built_plan()
    good = built.plan_bytes
    cases: list[tuple[dict[str, Any], str]] = [
        ({"plan": _edited(good, ("loss",), "hinge")}, "spec.plan.loss: unknown loss 'hinge'"),
        ({"plan": _edited(good, ("optimizer", "name"), "lbfgs")}, "unknown name 'lbfgs'"),
        ({"plan": _edited(good, ("metrics",), ["loss", "f1"])}, "unknown metric 'f1'"),
        ({"plan": _edited(good, ("format_version",), 7)}, "unknown format version 7"),
        ({"plan": _edited(good, ("name",), "n" * 129)}, "spec.plan.name: must be at most 128"),  # its column: 128
        ({"plan": pickle.dumps({"model": "x"})}, "pickled or zipped programs are refused"),
        ({"plan": b"{" + b" " * (8 * 1024 * 1024)}, "the limit is 8388608 bytes"),
        ({"plan": _edited(good, ("program", "exported_program"), "{}")}, "not a torch.export program"),
        ({"initial_weights": b""}, "spec.initial_weights: is empty"),
        ({"initial_weights": checkpoints.encode(checkpoints.initial_weights("digits-linear-v1", 0))}, "do not match"),
        ({"kind": tm.TASK_KIND_EVALUATION}, "spec.kind"),
    ]
    for change, message in cases:
        fields: dict[str, Any] = {"model_architecture": "", "plan": good, "initial_weights": built.initial_weights}
        fields.update(change)
        with pytest.raises(grpc.RpcError) as info:
            harness.create_task(**fields)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, message
        assert message in (info.value.details() or ""), info.value.details()
    assert harness.operators.list_tasks(tm.ListTasksRequest()).tasks == []
