"""DP end to end: only the noised mean leaves the aggregator, ε is charged to a ledger that survives restarts,
a release over budget is refused, and too few valid contributions release nothing."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch
from sqlalchemy import create_engine, select, text

from fedcompute.aggregator.dp import clip
from fedcompute.core import checkpoints
from fedcompute.core.errors import InvalidArgument
from fedcompute.core.privacy import epsilon
from fedcompute.store.models import JobRow
from fedcompute.v1 import task_management_pb2 as tm
from tests.grpc.test_aggregation import _wrong_key
from tests.harness import Harness, contribute, suite_settings, upload_for, wait_for, zero_update

POP = "dp-pop"
Z, C = 1.5, 0.5


def _dp_task(harness: Harness, rounds: int = 1, goal: int = 3) -> tm.Task:
    config = tm.DpConfig(
        enabled=True, target_epsilon=50.0, target_delta=1e-5, assumed_population_size=1000,
        noise_multiplier=Z, l2_clip_norm=C,
    )  # fmt: skip
    return harness.create_task(POP, rounds=rounds, report_goal=goal, max_cohort=goal, dp=config)


def _payload(value: float) -> bytes:
    return zero_update(value=value)


def test_only_the_noised_mean_leaves_the_aggregator(tmp_path: Path, database_url: str) -> None:
    harness = Harness.start(suite_settings(tmp_path / "w", database_url))
    try:
        task = _dp_task(harness)
        payloads = [contribute(harness, POP, _payload(v)) for v in (0.05, -0.2, 0.3)]
        wait_for(lambda: harness.task(task.task_id).status == tm.TASK_STATUS_COMPLETED, 60, "the DP round")
        engine = create_engine(database_url)
        with engine.connect() as conn:
            update_sha = conn.execute(select(JobRow.update_sha256)).scalar_one()
        engine.dispose()
        released = checkpoints.decode(harness.suite.server.blobs.get(str(update_sha)))
        clipped = [clip(checkpoints.decode(p), C)[0] for p in payloads]
        exact = {k: torch.stack([c[k] for c in clipped]).sum(0) / 3 for k in released}  # un-noised clipped mean
        diff = torch.cat([(released[k].to(torch.float64) - exact[k]).flatten() for k in released])
        assert abs(float(diff.std()) / (Z * C / 3) - 1) < 0.15  # the noise is there, at the right scale
        exact_bytes = checkpoints.encode({k: v.to(torch.float32) for k, v in exact.items()})
        for blob in (tmp_path / "w" / "server" / "blobs").rglob("*"):
            if blob.is_file():
                assert blob.read_bytes() != exact_bytes
        versions = harness.operators.list_model_versions(tm.ListModelVersionsRequest(task_id=task.task_id)).versions
        charged = epsilon(Z, 3 / 1000, 1, 1e-5)
        assert abs(versions[-1].epsilon_spent - charged) < 1e-9
        assert versions[-1].clip_norm == C
        assert abs(harness.task(task.task_id).epsilon_spent - charged) < 1e-9
    finally:
        harness.stop()


def test_ledger_survives_restart_and_budget_is_enforced(tmp_path: Path, database_url: str) -> None:
    settings = suite_settings(tmp_path / "w", database_url)
    harness = Harness.start(settings)
    try:
        config = tm.DpConfig(enabled=True, target_epsilon=2.0, target_delta=1e-5, assumed_population_size=1000,
                             l2_clip_norm=C)  # fmt: skip
        task = harness.create_task(POP, rounds=2, report_goal=2, max_cohort=2, dp=config)
        for _ in range(2):
            contribute(harness, POP)
        wait_for(lambda: harness.task(task.task_id).current_round == 2, 60, "round 1")
        spent = harness.task(task.task_id).epsilon_spent
        assert 0 < spent < 2.0
    finally:
        harness.stop()
    harness = Harness.start(settings)  # a restart on the same database: the ledger is still there
    try:
        assert harness.task(task.task_id).epsilon_spent == spent
        engine = create_engine(database_url)
        with engine.begin() as conn:  # another release charged to this task (say, a DP metric) ...
            conn.execute(
                text("INSERT INTO privacy_ledger VALUES (:t, 2, 1, 1, :e, 1e-5, 1.0, 0.002, 'prv', 0.5, :now)"),
                {"t": task.task_id, "e": spent, "now": "2026-01-01 00:00:00"},
            )
        engine.dispose()
        for _ in range(2):  # ... so publishing round 2 would go over budget
            contribute(harness, POP)
        wait_for(lambda: harness.task(task.task_id).status == tm.TASK_STATUS_BUDGET_EXHAUSTED, 60, "refusal")
        final = harness.task(task.task_id)
        assert "over the budget" in final.status_reason
        assert final.latest_model_version == 2  # round 2 was not published
        assert final.epsilon_spent == spent
    finally:
        harness.stop()


def test_too_few_valid_contributions_release_nothing(tmp_path: Path, database_url: str) -> None:
    harness = Harness.start(suite_settings(tmp_path / "w", database_url))
    try:
        task = _dp_task(harness, goal=3)
        contribute(harness, POP)
        contribute(harness, POP)
        upload_for(harness, POP, _wrong_key)
        wait_for(lambda: len(harness.iterations(task.task_id)) == 2, 60, "a second attempt")
        first = harness.iterations(task.task_id)[0]
        assert first.status == tm.ITERATION_STATUS_FAILED
        assert "min_clients" in first.aggregation_note
        assert harness.task(task.task_id).latest_model_version == 1
        assert harness.task(task.task_id).epsilon_spent == 0.0
    finally:
        harness.stop()


def test_metrics_are_released_noised_as_the_policy_says_and_paid_for(tmp_path: Path) -> None:
    """A policy that releases metrics: the update is noised at z·√2 for the same accounted z (the metrics take
    their share), ε is charged as before, the metrics come back noised and clamped, with no example count; an
    evaluation task under DP releases only its noised metrics and is charged too."""
    import math

    harness = Harness.start(suite_settings(tmp_path / "w", f"sqlite:///{tmp_path / 'db.sqlite'}"))
    try:
        config = tm.DpConfig(
            enabled=True, target_epsilon=50.0, target_delta=1e-5, assumed_population_size=1000,
            noise_multiplier=Z, l2_clip_norm=C, noise_metrics=True,
        )  # fmt: skip
        task = harness.create_task(POP, rounds=1, report_goal=3, max_cohort=3, dp=config)
        assert [(b.name, b.bound) for b in task.access_policy.policy.dp.metric_bounds] == [
            ("accuracy", 1.0),
            ("loss", 5.0),
        ]
        payloads = [
            contribute(harness, POP, zero_update(value=v, metrics={"loss": 0.5, "accuracy": 0.9}))
            for v in (0.05, -0.2, 0.3)
        ]
        wait_for(lambda: harness.task(task.task_id).status == tm.TASK_STATUS_COMPLETED, 60, "the DP round")
        engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
        with engine.connect() as conn:
            update_sha = conn.execute(select(JobRow.update_sha256)).scalar_one()
        engine.dispose()
        released = checkpoints.decode(harness.suite.server.blobs.get(str(update_sha)))
        clipped = [clip(checkpoints.decode(p), C)[0] for p in payloads]
        exact = {k: torch.stack([c[k] for c in clipped]).sum(0) / 3 for k in released}
        diff = torch.cat([(released[k].to(torch.float64) - exact[k]).flatten() for k in released])
        assert abs(float(diff.std()) / (Z * math.sqrt(2) * C / 3) - 1) < 0.15
        [round_] = harness.iterations(task.task_id)
        metrics = {m.name: m.value for m in round_.metrics}
        assert set(metrics) == {"loss", "accuracy"}
        assert 0 <= metrics["accuracy"] <= 1
        assert 0 <= metrics["loss"] <= 5
        assert round_.metric_examples == 0  # example counts would leak
        assert abs(harness.task(task.task_id).epsilon_spent - epsilon(Z, 3 / 1000, 1, 1e-5)) < 1e-9

        evaluation = harness.create_task(
            "dp-eval", rounds=1, report_goal=3, max_cohort=3, dp=config, kind=tm.TASK_KIND_EVALUATION
        )
        only_metrics = checkpoints.encode({}, {"num_examples": 10, "metrics": {"loss": 0.4, "accuracy": 0.8}})
        for _ in range(3):
            contribute(harness, "dp-eval", only_metrics)
        wait_for(lambda: harness.task(evaluation.task_id).status == tm.TASK_STATUS_COMPLETED, 60, "the DP evaluation")
        done = harness.task(evaluation.task_id)
        assert done.latest_model_version == 1
        assert abs(done.epsilon_spent - epsilon(Z, 3 / 1000, 1, 1e-5)) < 1e-9
        assert {m.name for m in harness.iterations(evaluation.task_id)[0].metrics} == {"loss", "accuracy"}
        without = tm.DpConfig()
        without.CopyFrom(config)
        without.noise_metrics = False
        with pytest.raises(InvalidArgument, match=r"spec\.dp\.noise_metrics"):  # the operator's side refuses first
            harness.create_task("dp-eval", dp=without, kind=tm.TASK_KIND_EVALUATION)
        with pytest.raises(grpc.RpcError) as info:  # and so does the server
            harness.create_task_raw("dp-eval", dp=without, kind=tm.TASK_KIND_EVALUATION)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "spec.dp.noise_metrics" in (info.value.details() or "")
    finally:
        harness.stop()
