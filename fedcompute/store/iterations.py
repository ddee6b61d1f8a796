"""Iteration repository: rounds, the admission cap and upload counting."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, bindparam, select, update
from sqlalchemy.orm import Session

from fedcompute.core.clock import IdGenerator, as_utc
from fedcompute.core.records import IterationRecord, RoundMetrics
from fedcompute.core.tasks import TaskSpec
from fedcompute.core.transitions import IterationStatus
from fedcompute.store.history import change_status, core, record_created
from fedcompute.store.models import IterationRow


def to_record(row: IterationRow) -> IterationRecord:
    return IterationRecord(
        iteration_id=row.id,
        task_id=row.task_id,
        round=row.round,
        attempt=row.attempt,
        aggregation_id=row.aggregation_id,
        status=row.status,
        base_model_version=row.base_model_version,
        report_goal=row.report_goal,
        max_cohort=row.max_cohort,
        assigned=row.assigned,
        completed_uploads=row.completed_uploads,
        accepted=row.accepted,
        rejected=row.rejected,
        note=row.note,
        clip_norm=row.clip_norm,
        metrics=RoundMetrics.from_json(row.metrics_json),
    )


# Hot path (every finished upload): built once, executed with parameters (building a statement costs more
# Python than running it on SQLite). RETURNING: the new count in the same statement.
_COUNT_UPLOAD = (
    update(IterationRow)
    .where(IterationRow.id == bindparam("iteration_id"), IterationRow.status == IterationStatus.OPEN)
    .values(completed_uploads=IterationRow.completed_uploads + 1, updated_at=bindparam("now", DateTime(timezone=True)))
    .returning(IterationRow.completed_uploads)
)


class IterationRepository:
    def __init__(self, session: Session) -> None:
        self._s = session

    def open(
        self,
        ids: IdGenerator,
        task_id: str,
        round_: int,
        attempt: int,
        base_version: int,
        spec: TaskSpec,
        now: datetime,
        clip_norm: float | None = None,
        max_cohort: int | None = None,
    ) -> str:
        """Open a round (or a new attempt at one) for devices to check in to; return its id."""
        row = IterationRow(
            id=ids.new_id("it"),
            task_id=task_id,
            round=round_,
            attempt=attempt,
            aggregation_id=ids.new_id("agg"),
            status=IterationStatus.OPEN,
            base_model_version=base_version,
            report_goal=spec.report_goal,
            max_cohort=max_cohort or spec.max_cohort,
            assigned=0,
            completed_uploads=0,
            accepted=0,
            rejected=0,
            note="",
            clip_norm=clip_norm,
            created_at=now,
            updated_at=now,
        )
        self._s.add(row)
        record_created(self._s, "iteration", row.id, row.status, now)
        return row.id

    def get(self, iteration_id: str) -> IterationRecord | None:
        row = self._s.get(IterationRow, iteration_id)
        return to_record(row) if row else None

    def for_task(self, task_id: str) -> list[IterationRecord]:
        query = (
            select(IterationRow)
            .where(IterationRow.task_id == task_id)
            .order_by(IterationRow.round, IterationRow.attempt)
        )
        return [to_record(r) for r in self._s.scalars(query)]

    def current(self, task_id: str, fresh: bool = False) -> IterationRecord | None:
        """The task's latest round (attempt); ``fresh``: its row read again, not as this session first loaded it."""
        query = (
            select(IterationRow)
            .where(IterationRow.task_id == task_id)
            .order_by(IterationRow.round.desc(), IterationRow.attempt.desc())
            .limit(1)
            .execution_options(populate_existing=fresh)
        )
        row = self._s.scalar(query)
        return to_record(row) if row else None

    def lock_current(self, task_id: str) -> IterationRecord | None:
        """The task's latest round, its row locked (``lock``: the round first, then the task, as every writer that
        opens a round takes them) and read after the lock. A writer holding the lock may have opened a newer
        attempt when it let go: that one is locked in turn, until the latest is the one locked."""
        while True:
            latest = self.current(task_id)
            if latest is None:
                return None
            self.lock(latest.iteration_id)
            locked = self.current(task_id, fresh=True)
            if locked is not None and locked.iteration_id == latest.iteration_id:
                return locked

    def open_ones(self) -> list[tuple[IterationRecord, datetime]]:
        """Every open round (attempt) with the time it opened (the sweeper's work list)."""
        rows = self._s.scalars(select(IterationRow).where(IterationRow.status == IterationStatus.OPEN))
        return [(to_record(r), as_utc(r.created_at)) for r in rows]

    def opened_at(self, iteration_id: str) -> datetime | None:
        """When this round (attempt) opened."""
        row = self._s.get(IterationRow, iteration_id)
        return as_utc(row.created_at) if row else None

    def release_slot(self, iteration_id: str, now: datetime) -> None:
        """Give back one cohort slot (a timed-out device): new check-ins can take it at once."""
        self._s.execute(
            update(IterationRow)
            .where(
                IterationRow.id == iteration_id, IterationRow.status == IterationStatus.OPEN, IterationRow.assigned > 0
            )
            .values(assigned=IterationRow.assigned - 1, updated_at=now)
            .execution_options(synchronize_session=False)
        )

    def lock(self, iteration_id: str) -> None:
        """Take the round's row lock first (Postgres ``FOR UPDATE``; SQLite's writers are serialized anyway):
        every transaction that touches a round and its assignments or uploads locks in this order, so the
        collector closing a round and uploads finishing beside it cannot deadlock. No statement on SQLite, whose
        ``FOR UPDATE`` is a plain read."""
        connection = core(self._s)
        if connection.dialect.name != "sqlite":
            connection.execute(select(IterationRow.id).where(IterationRow.id == iteration_id).with_for_update())

    def count_upload(self, iteration_id: str, now: datetime) -> int | None:
        """Count one finished upload while the round is OPEN; the new count, or None if the round closed."""
        return core(self._s).scalar(_COUNT_UPLOAD, {"iteration_id": iteration_id, "now": now})

    def set_outcome(
        self, iteration_id: str, accepted: int, rejected: int, note: str, metrics: RoundMetrics | None = None
    ) -> None:
        self._s.execute(
            update(IterationRow)
            .where(IterationRow.id == iteration_id)
            .values(accepted=accepted, rejected=rejected, note=note, metrics_json=metrics.to_json() if metrics else "")
        )

    def set_note(self, iteration_id: str, note: str) -> None:
        self._s.execute(update(IterationRow).where(IterationRow.id == iteration_id).values(note=note))

    def change_status(
        self, iteration_id: str, from_status: str, to_status: str, now: datetime, reason: str = ""
    ) -> bool:
        return change_status(self._s, IterationRow, "iteration", iteration_id, from_status, to_status, now, reason)
