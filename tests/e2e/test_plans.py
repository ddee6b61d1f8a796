"""Bring your own model, end to end: a TaskBuilder plan on another data set (BCE, AUC), an evaluation task, and a
10M-parameter model through upload, aggregation and publication."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from fedcompute.clients.builder import TaskBuilder
from fedcompute.clients.dataset import Split, non_iid_shards, train_test_split
from fedcompute.clients.device import download
from fedcompute.clients.fleet import Fleet
from fedcompute.clients.training import evaluate
from fedcompute.core import checkpoints, plans
from fedcompute.core.plans import ExampleSelector, Optimizer, Training
from fedcompute.core.secrets import operator_token
from fedcompute.v1 import task_management_pb2 as tm
from tests.conftest import fresh_postgres
from tests.harness import Harness, suite_settings

DEVICES = 4


def _run(harness: Harness, spec: tm.TaskSpec | tm.Task, shards: list[Split], collection: str) -> tm.Task:
    task = spec if isinstance(spec, tm.Task) else harness.suite.create_task(spec)
    harness.wait_for_key(task.spec.population_name)
    fleet = Fleet(
        harness.suite.server_address, task.spec.population_name, shards, 1, harness.trust(), max_sleep_s=0.2,
        collection=collection,
    )  # fmt: skip
    try:
        fleet.start(stop_when_no_task=True)
        assert fleet.wait(lambda: harness.task(task.task_id).status != tm.TASK_STATUS_OPEN, timeout_s=240)
    finally:
        fleet.stop()
    final = harness.task(task.task_id)
    assert final.status == tm.TASK_STATUS_COMPLETED, final.status_reason
    return final


def test_a_users_model_on_tabular_data_then_an_evaluation_task(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    harness = Harness.start(suite_settings(tmp_path / "work", f"sqlite:///{tmp_path / 'fc.sqlite'}"))
    train, test = train_test_split(seed=2, collection="breast_cancer")
    shards = non_iid_shards(train, DEVICES, seed=2, alpha=5.0)
    torch.manual_seed(0)
    builder = TaskBuilder(
        nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 1)),
        torch.zeros(4, 30),
        name="cancer",
        loss="bce_with_logits",
        optimizer=Optimizer("adam", 0.01),
        training=Training(epochs=3, batch_size=16),
        metrics=("loss", "accuracy", "auc"),
        example_selector=ExampleSelector("breast_cancer"),
    )
    try:
        built = builder.build()
        fields = {"population_name": "cancer", "rounds": 2, "report_goal": DEVICES, "max_cohort": DEVICES}
        operator = harness.suite.settings.model_copy(
            update={
                "server_address": harness.suite.server_address,
                "operator_token": operator_token(harness.suite.settings),
            }
        )
        created = builder.create(operator, **fields)  # the notebook path: build, check, register, create
        trained = _run(harness, created, shards, "breast_cancer")
        plan = plans.parse(download(harness.resources, trained.plan))
        assert plan == built.plan
        for it in harness.iterations(trained.task_id):
            metrics = {m.name: m.value for m in it.metrics}
            assert set(metrics) == {"loss", "accuracy", "auc"}, metrics
            assert it.metric_examples == len(train)  # every device's examples, once
        versions = harness.operators.list_model_versions(tm.ListModelVersionsRequest(task_id=trained.task_id))
        final = download(harness.resources, versions.versions[-1].checkpoint)
        held_out = evaluate(plan, checkpoints.decode(final), test)
        assert held_out["accuracy"] > 0.85
        assert held_out["auc"] > 0.9

        builder.kind = "evaluation"  # the same model, evaluated on the devices' data: metrics, no training
        evaluation = builder.build()
        fields = {**fields, "population_name": "cancer-eval", "rounds": 1}
        spec = builder.spec(evaluation, **fields)
        spec.initial_weights = final
        evaluated = _run(harness, spec, shards, "breast_cancer")
        assert evaluated.latest_model_version == 1  # nothing was published
        only = harness.operators.list_model_versions(tm.ListModelVersionsRequest(task_id=evaluated.task_id))
        assert [v.version for v in only.versions] == [1]
        [round_] = harness.iterations(evaluated.task_id)
        assert round_.status == tm.ITERATION_STATUS_COMPLETED
        metrics = {m.name: m.value for m in round_.metrics}
        on_devices = evaluate(plan, checkpoints.decode(final), train)  # the union of the devices' shards
        assert metrics["accuracy"] == pytest_approx(on_devices["accuracy"])
        assert round_.metric_examples == len(train)
    finally:
        harness.stop()


def pytest_approx(value: float) -> object:
    import pytest

    return pytest.approx(value, abs=1e-5)


def test_a_ten_million_parameter_model_end_to_end(tmp_path: Path, postgres_database: str) -> None:
    """bench-10m (10.07M float32): 40 MB envelopes uploaded in chunks, aggregated, published, downloaded."""
    torch.set_num_threads(1)
    harness = Harness.start(suite_settings(tmp_path / "work", fresh_postgres(postgres_database)))
    train, _ = train_test_split(seed=3)
    try:
        spec = tm.TaskSpec(
            population_name="big",
            model_architecture="bench-10m",
            rounds=1,
            report_goal=2,
            max_cohort=2,
            hyperparameters=tm.TrainingHyperparameters(local_epochs=1, batch_size=32, learning_rate=0.01),
        )
        started = time.monotonic()
        task = _run(harness, spec, non_iid_shards(train, 2, seed=3), "digits")
        assert task.parameter_count == 10_072_202
        versions = harness.operators.list_model_versions(tm.ListModelVersionsRequest(task_id=task.task_id)).versions
        assert [v.version for v in versions] == [1, 2]
        assert versions[1].checkpoint.size_bytes > 40_000_000
        new = checkpoints.decode(download(harness.resources, versions[1].checkpoint))
        old = checkpoints.decode(download(harness.resources, versions[0].checkpoint))
        assert any(not torch.equal(new[k], old[k]) for k in old)
        print(f"10M-parameter round: {time.monotonic() - started:.1f} s")
    finally:
        harness.stop()
