"""Frozen views of stored entities, as services hand them to servicers and loops."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from fedcompute.core.tasks import TaskSpec


@dataclass(frozen=True)
class TaskRecord:
    task_id: str
    spec: TaskSpec
    status: str
    current_round: int
    latest_model_version: int
    plan_sha256: str
    plan_size: int
    created_at: datetime
    status_reason: str
    epsilon_spent: float = 0.0
    access_policy: bytes = b""  # serialized SignedAccessPolicy
    policy_sha256: str = ""
    model_name: str = ""
    parameter_count: int = 0
    round_metrics: tuple[tuple[int, RoundMetrics], ...] = ()  # per completed round (GetTask only)


@dataclass(frozen=True)
class IterationRecord:
    iteration_id: str
    task_id: str
    round: int
    attempt: int
    aggregation_id: str
    status: str
    base_model_version: int
    report_goal: int
    max_cohort: int
    assigned: int
    completed_uploads: int
    accepted: int
    rejected: int
    note: str = ""
    clip_norm: float | None = None
    metrics: RoundMetrics | None = None


@dataclass(frozen=True)
class RoundMetrics:
    """A round's aggregated metrics (name -> value) and the examples behind them (0 when not disclosed)."""

    values: dict[str, float]
    examples: int = 0

    def to_json(self) -> str:
        return json.dumps({"values": self.values, "examples": self.examples}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RoundMetrics | None:
        if not text:
            return None
        doc = json.loads(text)
        return cls({str(k): float(v) for k, v in doc["values"].items()}, int(doc["examples"]))


@dataclass(frozen=True)
class AssignmentRecord:
    assignment_id: str
    iteration_id: str
    task_id: str
    status: str
    result_code: str
    changed_at: datetime | None = None  # when the status last changed (a report: the upload deadline's start)


@dataclass(frozen=True)
class UploadRecord:
    upload_id: str
    assignment_id: str
    total_size: int
    sha256_hex: str
    committed_size: int
    status: str
    blob_sha256: str | None


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    iteration_id: str
    task_id: str
    status: str
    lease_id: str | None
    lease_owner: str | None
    lease_expiry: datetime | None
    attempts: int
    input_set_sha256: str
    contributions: int
    accepted: int
    rejected: int
    update_sha256: str | None
    error: str
    clip_norm: float | None = None
    next_clip_norm: float | None = None


@dataclass(frozen=True)
class ModelVersionRecord:
    task_id: str
    version: int
    parent_version: int | None
    checkpoint_sha256: str
    size_bytes: int
    parent_sha256: str
    round: int
    contributions: int
    created_at: datetime
    epsilon_spent: float = 0.0
    clip_norm: float | None = None
