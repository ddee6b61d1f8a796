"""Domain records <-> protocol messages for the orchestration servers."""

from __future__ import annotations

from dataclasses import asdict

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from fedcompute.core.privacy import DpSpec
from fedcompute.core.records import IterationRecord, ModelVersionRecord, RoundMetrics, TaskRecord
from fedcompute.core.tasks import CHECKPOINT_MEDIA_TYPE, PLAN_MEDIA_TYPE, Hyperparameters, TaskSpec
from fedcompute.server.resources import model_resource_name, plan_resource_name
from fedcompute.v1 import common_pb2, task_management_pb2


def decode_spec(msg: task_management_pb2.TaskSpec) -> TaskSpec:
    hp = msg.hyperparameters
    defaults = Hyperparameters()
    defaults_spec = TaskSpec("", "", 0, 0, 0)
    return TaskSpec(
        population_name=msg.population_name,
        model_architecture=msg.model_architecture,
        rounds=msg.rounds,
        report_goal=msg.report_goal,
        max_cohort=msg.max_cohort,
        initial_weights=msg.initial_weights,
        initial_seed=msg.initial_seed,
        min_client_version=msg.min_client_version,
        max_client_version=msg.max_client_version,
        hyperparameters=Hyperparameters(
            local_epochs=hp.local_epochs or defaults.local_epochs,
            batch_size=hp.batch_size or defaults.batch_size,
            learning_rate=hp.learning_rate or defaults.learning_rate,
            momentum=hp.momentum,
        ),
        server_learning_rate=msg.server_learning_rate or 1.0,
        dp=decode_dp(msg.dp) if msg.dp.enabled else None,
        min_clients=msg.min_clients,
        local_compute_deadline_s=msg.local_compute_deadline_s or defaults_spec.local_compute_deadline_s,
        upload_deadline_s=msg.upload_deadline_s or defaults_spec.upload_deadline_s,
        round_deadline_s=msg.round_deadline_s or defaults_spec.round_deadline_s,
        traffic_weight=msg.traffic_weight or defaults_spec.traffic_weight,
        min_separation_rounds=msg.min_separation_rounds or defaults_spec.min_separation_rounds,
        max_round_attempts=msg.max_round_attempts,
        plan=msg.plan,
        kind=decode_kind(msg.kind),
    )


def decode_kind(kind: task_management_pb2.TaskKind.ValueType) -> str:
    if kind == task_management_pb2.TASK_KIND_UNSPECIFIED:
        return "training"
    try:
        return task_management_pb2.TaskKind.Name(kind).removeprefix("TASK_KIND_").lower()
    except ValueError:
        return f"unknown ({kind})"  # refused by TaskSpec.validate, naming the field


def decode_dp(msg: task_management_pb2.DpConfig) -> DpSpec:
    return DpSpec(
        target_epsilon=msg.target_epsilon,
        target_delta=msg.target_delta,
        assumed_population_size=msg.assumed_population_size,
        accountant=msg.accountant or "prv",
        noise_multiplier=msg.noise_multiplier,
        l2_clip_norm=msg.l2_clip_norm,
        adaptive_clip=msg.adaptive_clip,
        target_unclipped_quantile=msg.target_unclipped_quantile or 0.5,
        clip_learning_rate=msg.clip_learning_rate or 0.2,
        clipped_count_stddev=msg.clipped_count_stddev,
        min_clients=msg.min_clients,
        noise_metrics=msg.noise_metrics,
        metric_loss_bound=msg.metric_loss_bound or 5.0,
    )


def encode_dp(dp: DpSpec | None) -> task_management_pb2.DpConfig:
    if dp is None:
        return task_management_pb2.DpConfig()
    return task_management_pb2.DpConfig(enabled=True, **asdict(dp))


def encode_spec(spec: TaskSpec) -> task_management_pb2.TaskSpec:
    hp = spec.hyperparameters
    return task_management_pb2.TaskSpec(
        population_name=spec.population_name,
        model_architecture=spec.model_architecture,
        initial_seed=spec.initial_seed,
        rounds=spec.rounds,
        report_goal=spec.report_goal,
        max_cohort=spec.max_cohort,
        min_client_version=spec.min_client_version,
        max_client_version=spec.max_client_version,
        hyperparameters=task_management_pb2.TrainingHyperparameters(
            local_epochs=hp.local_epochs, batch_size=hp.batch_size, learning_rate=hp.learning_rate, momentum=hp.momentum
        ),
        server_learning_rate=spec.server_learning_rate,
        dp=encode_dp(spec.dp),
        min_clients=spec.min_clients,
        local_compute_deadline_s=spec.local_compute_deadline_s,
        upload_deadline_s=spec.upload_deadline_s,
        round_deadline_s=spec.round_deadline_s,
        traffic_weight=spec.traffic_weight,
        min_separation_rounds=spec.min_separation_rounds,
        max_round_attempts=spec.max_round_attempts,
        kind=task_management_pb2.TaskKind.Value(f"TASK_KIND_{spec.kind.upper()}"),
    )


def timestamp(moment: object) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(moment)  # type: ignore[arg-type]
    return ts


def duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def plan_resource(task: TaskRecord) -> common_pb2.Resource:
    return common_pb2.Resource(
        resource_name=plan_resource_name(task.task_id),
        sha256_hex=task.plan_sha256,
        size_bytes=task.plan_size,
        media_type=PLAN_MEDIA_TYPE,
        compression_format=common_pb2.COMPRESSION_FORMAT_NONE,
    )


def checkpoint_resource(task_id: str, version: int, sha256_hex: str, size: int) -> common_pb2.Resource:
    return common_pb2.Resource(
        resource_name=model_resource_name(task_id, version),
        sha256_hex=sha256_hex,
        size_bytes=size,
        media_type=CHECKPOINT_MEDIA_TYPE,
        compression_format=common_pb2.COMPRESSION_FORMAT_NONE,
    )


def encode_task(task: TaskRecord) -> task_management_pb2.Task:
    return task_management_pb2.Task(
        task_id=task.task_id,
        spec=encode_spec(task.spec),
        status=task_management_pb2.TaskStatus.Value(f"TASK_STATUS_{task.status}"),
        current_round=task.current_round,
        latest_model_version=task.latest_model_version,
        plan=plan_resource(task),
        created_time=timestamp(task.created_at),
        status_reason=task.status_reason,
        access_policy=common_pb2.SignedAccessPolicy.FromString(task.access_policy),
        epsilon_spent=task.epsilon_spent,
        model_name=task.model_name,
        parameter_count=task.parameter_count,
        round_metrics=[
            task_management_pb2.RoundMetrics(round=r, metrics=_metric_values(m), examples=m.examples)
            for r, m in task.round_metrics
        ],
    )


def encode_iteration(it: IterationRecord) -> task_management_pb2.Iteration:
    return task_management_pb2.Iteration(
        task_id=it.task_id,
        round=it.round,
        aggregation_id=it.aggregation_id,
        status=task_management_pb2.IterationStatus.Value(f"ITERATION_STATUS_{it.status}"),
        base_model_version=it.base_model_version,
        assigned=it.assigned,
        completed_uploads=it.completed_uploads,
        accepted_contributions=it.accepted,
        rejected_contributions=it.rejected,
        attempt=it.attempt,
        aggregation_note=it.note,
        clip_norm=it.clip_norm or 0.0,
        metrics=_metric_values(it.metrics),
        metric_examples=it.metrics.examples if it.metrics else 0,
    )


def _metric_values(metrics: RoundMetrics | None) -> list[common_pb2.MetricValue]:
    values = metrics.values if metrics else {}
    return [common_pb2.MetricValue(name=k, value=v) for k, v in sorted(values.items())]


def encode_model_version(v: ModelVersionRecord) -> task_management_pb2.ModelVersion:
    return task_management_pb2.ModelVersion(
        task_id=v.task_id,
        version=v.version,
        parent_version=v.parent_version or 0,
        checkpoint=checkpoint_resource(v.task_id, v.version, v.checkpoint_sha256, v.size_bytes),
        parent_sha256_hex=v.parent_sha256,
        round=v.round,
        contributions=v.contributions,
        created_time=timestamp(v.created_at),
        epsilon_spent=v.epsilon_spent,
        clip_norm=v.clip_norm or 0.0,
    )
