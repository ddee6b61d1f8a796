"""Assignment and upload repositories."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from fedcompute.core.clock import as_utc
from fedcompute.core.records import AssignmentRecord, UploadRecord
from fedcompute.core.transitions import AssignmentStatus, IterationStatus, UploadStatus, check_transition
from fedcompute.store.history import change_status, core, insert_history, record_created
from fedcompute.store.models import AssignmentRow, IterationRow, UploadRow


def assignment_record(row: Any) -> AssignmentRecord:
    """From an ``AssignmentRow`` or a Core row of ``_ASSIGNMENT_COLUMNS``."""
    return AssignmentRecord(row.id, row.iteration_id, row.task_id, row.status, row.result_code, as_utc(row.updated_at))


_ASSIGNMENT_COLUMNS = (
    AssignmentRow.id, AssignmentRow.iteration_id, AssignmentRow.task_id, AssignmentRow.status,
    AssignmentRow.result_code, AssignmentRow.updated_at,
)  # fmt: skip
# read by every report and every upload's progress and finish: built once (see _WITH_ASSIGNMENT below)
_ASSIGNMENT = select(*_ASSIGNMENT_COLUMNS).where(AssignmentRow.id == bindparam("assignment_id"))
_ASSIGNMENT_LOCKED = _ASSIGNMENT.with_for_update()


class AssignmentRepository:
    def __init__(self, session: Session) -> None:
        self._s = session

    def add(self, assignment_id: str, iteration_id: str, task_id: str, now: datetime) -> None:
        status = AssignmentStatus.ASSIGNED
        self._s.add(
            AssignmentRow(
                id=assignment_id,
                iteration_id=iteration_id,
                task_id=task_id,
                status=status,
                created_at=now,
                updated_at=now,
            )
        )
        record_created(self._s, "assignment", assignment_id, status, now)

    def get(self, assignment_id: str, lock: bool = False) -> AssignmentRecord | None:
        """The assignment as the transaction sees it now (a Core read); ``lock`` takes its row lock (Postgres
        ``FOR UPDATE``)."""
        statement = _ASSIGNMENT_LOCKED if lock else _ASSIGNMENT
        row = core(self._s).execute(statement, {"assignment_id": assignment_id}).first()
        return assignment_record(row) if row is not None else None

    def change_status(
        self, assignment_id: str, from_status: str, to_status: str, now: datetime, reason: str = "", **values: Any
    ) -> bool:
        return change_status(
            self._s, AssignmentRow, "assignment", assignment_id, from_status, to_status, now, reason, **values
        )

    def open_in_iteration(self, iteration_id: str) -> list[AssignmentRecord]:
        query = select(AssignmentRow).where(
            AssignmentRow.iteration_id == iteration_id,
            AssignmentRow.status.in_([AssignmentStatus.ASSIGNED, AssignmentStatus.LOCAL_COMPLETED]),
        )
        return [assignment_record(r) for r in self._s.scalars(query)]

    def count_by_status(self, iteration_id: str) -> dict[str, int]:
        query = (
            select(AssignmentRow.status, func.count())
            .where(AssignmentRow.iteration_id == iteration_id)
            .group_by(AssignmentRow.status)
        )
        return {status: int(n) for status, n in self._s.execute(query)}

    def awaiting_upload(self, assignment_ids: list[str]) -> set[str]:
        """Those of the given assignments still waiting for their upload (reported, not yet uploaded)."""
        query = select(AssignmentRow.id).where(
            AssignmentRow.id.in_(assignment_ids), AssignmentRow.status == AssignmentStatus.LOCAL_COMPLETED
        )
        return set(self._s.scalars(query)) if assignment_ids else set()

    def overdue(self, iteration_id: str, status: str, since_before: datetime) -> list[str]:
        """Assignments of the round in ``status`` since before the given time (created, or last changed)."""
        stamp = AssignmentRow.created_at if status == AssignmentStatus.ASSIGNED else AssignmentRow.updated_at
        query = select(AssignmentRow.id).where(
            AssignmentRow.iteration_id == iteration_id, AssignmentRow.status == status, stamp <= since_before
        )
        return list(self._s.scalars(query.order_by(AssignmentRow.id)))


_UPLOAD_COLUMNS = (
    UploadRow.id, UploadRow.assignment_id, UploadRow.total_size, UploadRow.sha256_hex, UploadRow.committed_size,
    UploadRow.status, UploadRow.blob_sha256,
)  # fmt: skip
# Hot paths (every upload's start and finish): built once, executed with parameters (building a statement costs
# more Python than running it on SQLite). RETURNING, as the driver's rowcount of an ON CONFLICT insert is -1 on
# psycopg.
_WITH_ASSIGNMENT = (
    select(AssignmentRow.status, AssignmentRow.iteration_id, *_UPLOAD_COLUMNS)
    .outerjoin(UploadRow, UploadRow.id == AssignmentRow.id)
    .where(AssignmentRow.id == bindparam("assignment_id"))
)
_ADD_COMPLETE = {
    dialect.dialect.name: dialect.insert(UploadRow)
    .on_conflict_do_nothing(index_elements=[UploadRow.id])
    .returning(UploadRow.id)
    for dialect in (postgresql, sqlite)
}


class UploadRepository:
    def __init__(self, session: Session) -> None:
        self._s = session

    def get(self, upload_id: str) -> UploadRecord | None:
        """The upload as stored now (a Core read: QueryWriteStatus and every stream's start ask)."""
        row = core(self._s).execute(select(*_UPLOAD_COLUMNS).where(UploadRow.id == upload_id)).first()
        return UploadRecord(*row) if row is not None else None

    def with_assignment(self, assignment_id: str) -> tuple[str, str, UploadRecord | None] | None:
        """The assignment's status and round, and its upload if it has one; None if there is no such assignment.
        One Core statement (an upload's start reads this on every stream)."""
        row = core(self._s).execute(_WITH_ASSIGNMENT, {"assignment_id": assignment_id}).first()
        if row is None:
            return None
        upload = UploadRecord(*row[2:]) if row[2] is not None else None
        return row[0], row[1], upload

    def start(
        self, upload_id: str, assignment_id: str, iteration_id: str, total: int, sha256_hex: str, now: datetime
    ) -> None:
        core(self._s).execute(
            insert(UploadRow),
            [{"id": upload_id, "assignment_id": assignment_id, "iteration_id": iteration_id, "total_size": total,
              "sha256_hex": sha256_hex, "committed_size": 0, "status": UploadStatus.IN_PROGRESS, "created_at": now,
              "updated_at": now}],
        )  # fmt: skip
        record_created(self._s, "upload", upload_id, UploadStatus.IN_PROGRESS, now)

    def add_complete(
        self, upload_id: str, assignment_id: str, iteration_id: str, total: int, sha: str, blob: str, now: datetime
    ) -> bool:
        """An upload that arrived whole in one stream, written COMPLETE at once (with both history rows, as
        ``start`` then ``advance`` and ``complete`` would leave them); False, writing nothing, if its row exists
        (another stream of it wrote one meanwhile: the caller takes the general path)."""
        connection = core(self._s)
        added = connection.execute(
            _ADD_COMPLETE[connection.dialect.name],
            {"id": upload_id, "assignment_id": assignment_id, "iteration_id": iteration_id, "total_size": total,
             "sha256_hex": sha, "committed_size": total, "status": UploadStatus.COMPLETE, "blob_sha256": blob,
             "created_at": now, "updated_at": now},
        )  # fmt: skip
        if added.first() is None:
            return False
        check_transition("upload", UploadStatus.IN_PROGRESS, UploadStatus.COMPLETE)
        insert_history(connection, [
            ("upload", upload_id, None, UploadStatus.IN_PROGRESS, "", now),
            ("upload", upload_id, UploadStatus.IN_PROGRESS, UploadStatus.COMPLETE, "", now),
        ])  # fmt: skip
        return True

    def restart(self, upload_id: str, total: int, sha256_hex: str, now: datetime, committed: int | None = None) -> None:
        """Forget a discarded attempt: new declared size and hash, nothing committed (only if ``committed`` bytes
        still are, when given: bytes another replica's stream committed meanwhile are its to keep)."""
        query = update(UploadRow).where(UploadRow.id == upload_id, UploadRow.status == UploadStatus.IN_PROGRESS)
        if committed is not None:
            query = query.where(UploadRow.committed_size == committed)
        core(self._s).execute(query.values(total_size=total, sha256_hex=sha256_hex, committed_size=0, updated_at=now))

    def advance(self, upload_id: str, from_size: int, to_size: int, now: datetime) -> bool:
        result = core(self._s).execute(
            update(UploadRow)
            .where(UploadRow.id == upload_id, UploadRow.committed_size == from_size)
            .values(committed_size=to_size, updated_at=now)
        )
        return result.rowcount == 1

    def complete(self, upload_id: str, blob_sha256: str, now: datetime) -> bool:
        return change_status(
            self._s,
            UploadRow,
            "upload",
            upload_id,
            UploadStatus.IN_PROGRESS,
            UploadStatus.COMPLETE,
            now,
            blob_sha256=blob_sha256,
        )

    def abandon_in_iteration(self, iteration_id: str, now: datetime, reason: str, upload_id: str = "") -> int:
        """Uploads of the round still in progress (or just ``upload_id``) are abandoned: never counted."""
        query = select(UploadRow.id).where(
            UploadRow.iteration_id == iteration_id, UploadRow.status == UploadStatus.IN_PROGRESS
        )
        ids = list(self._s.scalars(query.where(UploadRow.id == upload_id) if upload_id else query))
        for upload_id in ids:
            change_status(
                self._s, UploadRow, "upload", upload_id, UploadStatus.IN_PROGRESS, UploadStatus.ABANDONED, now, reason
            )
        return len(ids)

    def abandon(self, upload_id: str, now: datetime, reason: str) -> bool:
        return change_status(
            self._s, UploadRow, "upload", upload_id, UploadStatus.IN_PROGRESS, UploadStatus.ABANDONED, now, reason
        )

    def completed_in_iteration(self, iteration_id: str) -> list[UploadRecord]:
        query = (
            select(*_UPLOAD_COLUMNS)
            .join(AssignmentRow, AssignmentRow.id == UploadRow.assignment_id)
            .where(
                UploadRow.iteration_id == iteration_id,
                UploadRow.status == UploadStatus.COMPLETE,
                AssignmentRow.status == AssignmentStatus.UPLOADED,
            )
            .order_by(UploadRow.assignment_id)
        )
        return [UploadRecord(*r) for r in self._s.execute(query)]

    def purgeable(self, released_before: datetime, limit: int = 500) -> list[tuple[str, str]]:
        """(upload id, blob sha256) of stored envelopes whose round ended (released or abandoned) before then."""
        query = (
            select(UploadRow.id, UploadRow.blob_sha256)
            .join(IterationRow, IterationRow.id == UploadRow.iteration_id)
            .where(
                UploadRow.blob_sha256.is_not(None),
                UploadRow.purged_at.is_(None),
                IterationRow.status.in_([IterationStatus.COMPLETED, IterationStatus.FAILED, IterationStatus.CANCELED]),
                IterationRow.updated_at <= released_before,
            )
            .order_by(UploadRow.id)
            .limit(limit)
        )
        return [(row.id, row.blob_sha256 or "") for row in self._s.execute(query)]

    def mark_purged(self, upload_ids: list[str], now: datetime) -> None:
        self._s.execute(update(UploadRow).where(UploadRow.id.in_(upload_ids)).values(purged_at=now, updated_at=now))
