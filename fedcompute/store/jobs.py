"""Aggregation job repository: queueing, leases, results."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from fedcompute.core.clock import as_utc
from fedcompute.core.records import JobRecord
from fedcompute.core.transitions import JobStatus
from fedcompute.store.history import change_status, record_created
from fedcompute.store.models import JobRow


def to_record(row: JobRow) -> JobRecord:
    return JobRecord(
        job_id=row.id,
        iteration_id=row.iteration_id,
        task_id=row.task_id,
        status=row.status,
        lease_id=row.lease_id,
        lease_owner=row.lease_owner,
        lease_expiry=as_utc(row.lease_expiry) if row.lease_expiry else None,
        attempts=row.attempts,
        input_set_sha256=row.input_set_sha256,
        contributions=row.contributions,
        accepted=row.accepted,
        rejected=row.rejected,
        update_sha256=row.update_sha256,
        error=row.error,
        clip_norm=row.clip_norm,
        next_clip_norm=row.next_clip_norm,
    )


class JobRepository:
    def __init__(self, session: Session) -> None:
        self._s = session

    def add(
        self, job_id: str, iteration_id: str, task_id: str, input_set: str, contributions: int, now: datetime
    ) -> None:
        self._s.add(
            JobRow(
                id=job_id,
                iteration_id=iteration_id,
                task_id=task_id,
                status=JobStatus.PENDING,
                input_set_sha256=input_set,
                contributions=contributions,
                created_at=now,
                updated_at=now,
            )
        )
        record_created(self._s, "job", job_id, JobStatus.PENDING, now)

    def get(self, job_id: str) -> JobRecord | None:
        row = self._s.get(JobRow, job_id)
        return to_record(row) if row else None

    def claimable(self, now: datetime, limit: int = 5) -> list[JobRecord]:
        """Jobs waiting, or running under an expired lease (a crashed worker's)."""
        query = (
            select(JobRow)
            .where(
                or_(
                    JobRow.status == JobStatus.PENDING,
                    (JobRow.status == JobStatus.RUNNING) & (JobRow.lease_expiry < now),
                ),
                or_(JobRow.not_before.is_(None), JobRow.not_before <= now),
            )
            .order_by(JobRow.created_at)
            .limit(limit)
        )
        return [to_record(r) for r in self._s.scalars(query)]

    def count_by_status(self) -> dict[str, int]:
        query = select(JobRow.status, func.count()).group_by(JobRow.status)
        return {str(status): int(count) for status, count in self._s.execute(query)}

    def with_status(self, status: str, limit: int = 10, after: str = "") -> list[JobRecord]:
        """Up to ``limit`` jobs in ``status`` whose id sorts after ``after``, by id: a caller pages through all of
        them (jobs leaving the status between pages shift nothing, as an offset would)."""
        query = select(JobRow).where(JobRow.status == status, JobRow.id > after).order_by(JobRow.id).limit(limit)
        return [to_record(r) for r in self._s.scalars(query)]

    def take_lease(self, job: JobRecord, owner: str, lease_id: str, expiry: datetime, now: datetime) -> bool:
        """Compare-and-set on (status, lease_id): exactly one worker wins a job."""
        result = self._s.execute(
            update(JobRow)
            .where(JobRow.id == job.job_id, JobRow.status == job.status, _lease_is(job.lease_id))
            .values(
                status=JobStatus.RUNNING,
                lease_owner=owner,
                lease_id=lease_id,
                lease_expiry=expiry,
                attempts=JobRow.attempts + 1,
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
        if getattr(result, "rowcount", 0) != 1:
            return False
        record_created(self._s, "job", job.job_id, JobStatus.RUNNING, now, reason=f"leased by {owner}")
        return True

    def holds_lease(self, job_id: str, lease_id: str, expired_before: datetime | None = None) -> bool:
        """Whether the job is RUNNING under ``lease_id`` (and, with ``expired_before``, that lease ran out before
        then), its row locked until the transaction ends (``FOR UPDATE``; SQLite's write transaction holds the
        whole database): no claim or extension changes the lease before the caller's change to the job commits."""
        query = select(JobRow.id).where(
            JobRow.id == job_id, JobRow.status == JobStatus.RUNNING, JobRow.lease_id == lease_id
        )
        if expired_before is not None:
            query = query.where(JobRow.lease_expiry < expired_before)
        return self._s.execute(query.with_for_update()).first() is not None

    def extend_lease(self, job_id: str, lease_id: str, expiry: datetime, now: datetime) -> bool:
        result = self._s.execute(
            update(JobRow)
            .where(JobRow.id == job_id, JobRow.status == JobStatus.RUNNING, JobRow.lease_id == lease_id)
            .values(lease_expiry=expiry, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        return getattr(result, "rowcount", 0) == 1

    def change_status(
        self, job_id: str, from_status: str, to_status: str, now: datetime, reason: str = "", **values: Any
    ) -> bool:
        return change_status(self._s, JobRow, "job", job_id, from_status, to_status, now, reason, **values)


def _lease_is(lease_id: str | None) -> Any:
    return JobRow.lease_id.is_(None) if lease_id is None else JobRow.lease_id == lease_id
