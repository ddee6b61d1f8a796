"""Lifecycles of the stored entities and the only transitions allowed between their states.

Every status change in the store is a compare-and-set ``UPDATE ... WHERE status = :from`` checked against this
table, with a history row written in the same transaction.
"""

from __future__ import annotations

from enum import StrEnum


class TaskStatus(StrEnum):
    OPEN = "OPEN"
    COMPLETED = "COMPLETED"
    CANCELED = "CANCELED"
    FAILED = "FAILED"
    BUDGET_EXHAUSTED = "BUDGET_EXHAUSTED"


class IterationStatus(StrEnum):
    OPEN = "OPEN"
    AGGREGATING = "AGGREGATING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"


class AssignmentStatus(StrEnum):
    ASSIGNED = "ASSIGNED"
    LOCAL_COMPLETED = "LOCAL_COMPLETED"
    LOCAL_FAILED = "LOCAL_FAILED"
    UPLOADED = "UPLOADED"
    LATE = "LATE"
    CANCELED = "CANCELED"
    TIMED_OUT = "TIMED_OUT"  # missed its local-compute or upload deadline; its slot was freed


class UploadStatus(StrEnum):
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETE = "COMPLETE"
    ABANDONED = "ABANDONED"  # its round closed (or was canceled) first: never counted


class JobStatus(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    APPLIED = "APPLIED"


ALLOWED: dict[str, set[tuple[str, str]]] = {
    "task": {
        (TaskStatus.OPEN, TaskStatus.COMPLETED),
        (TaskStatus.OPEN, TaskStatus.CANCELED),
        (TaskStatus.OPEN, TaskStatus.FAILED),
        (TaskStatus.OPEN, TaskStatus.BUDGET_EXHAUSTED),
    },
    "iteration": {
        (IterationStatus.OPEN, IterationStatus.AGGREGATING),
        (IterationStatus.OPEN, IterationStatus.CANCELED),
        (IterationStatus.OPEN, IterationStatus.FAILED),  # round deadline passed below min_clients
        (IterationStatus.AGGREGATING, IterationStatus.COMPLETED),
        (IterationStatus.AGGREGATING, IterationStatus.FAILED),
        (IterationStatus.AGGREGATING, IterationStatus.CANCELED),
    },
    "assignment": {
        (AssignmentStatus.ASSIGNED, AssignmentStatus.LOCAL_COMPLETED),
        (AssignmentStatus.ASSIGNED, AssignmentStatus.LOCAL_FAILED),
        (AssignmentStatus.ASSIGNED, AssignmentStatus.LATE),
        (AssignmentStatus.ASSIGNED, AssignmentStatus.CANCELED),
        (AssignmentStatus.LOCAL_COMPLETED, AssignmentStatus.UPLOADED),
        (AssignmentStatus.LOCAL_COMPLETED, AssignmentStatus.LATE),
        (AssignmentStatus.LOCAL_COMPLETED, AssignmentStatus.CANCELED),
        (AssignmentStatus.ASSIGNED, AssignmentStatus.TIMED_OUT),
        (AssignmentStatus.LOCAL_COMPLETED, AssignmentStatus.TIMED_OUT),
    },
    "upload": {(UploadStatus.IN_PROGRESS, UploadStatus.COMPLETE), (UploadStatus.IN_PROGRESS, UploadStatus.ABANDONED)},
    "job": {
        (JobStatus.PENDING, JobStatus.RUNNING),
        (JobStatus.RUNNING, JobStatus.RUNNING),  # lease taken over after expiry
        (JobStatus.RUNNING, JobStatus.PENDING),  # retryable failure
        (JobStatus.RUNNING, JobStatus.SUCCEEDED),
        (JobStatus.RUNNING, JobStatus.FAILED),
        (JobStatus.PENDING, JobStatus.FAILED),
        (JobStatus.SUCCEEDED, JobStatus.APPLIED),
        (JobStatus.SUCCEEDED, JobStatus.FAILED),
    },
}


def check_transition(entity: str, from_status: str, to_status: str) -> None:
    """Raise ``ValueError`` unless ``from_status -> to_status`` is allowed for ``entity``."""
    if (from_status, to_status) not in ALLOWED[entity]:
        raise ValueError(f"{entity}: transition {from_status} -> {to_status} is not allowed")
