"""Model version repository (version 1 is the initial model; round r publishes version r + 1)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from fedcompute.core.clock import as_utc
from fedcompute.core.records import ModelVersionRecord
from fedcompute.store.models import ModelVersionRow


def to_record(row: ModelVersionRow) -> ModelVersionRecord:
    return ModelVersionRecord(
        task_id=row.task_id,
        version=row.version,
        parent_version=row.parent_version,
        checkpoint_sha256=row.checkpoint_sha256,
        size_bytes=row.size_bytes,
        parent_sha256=row.parent_sha256,
        round=row.round,
        contributions=row.contributions,
        created_at=as_utc(row.created_at),
    )


class ModelVersionRepository:
    def __init__(self, session: Session) -> None:
        self._s = session

    def add(self, record: ModelVersionRecord) -> None:
        self._s.add(
            ModelVersionRow(
                task_id=record.task_id,
                version=record.version,
                parent_version=record.parent_version,
                checkpoint_sha256=record.checkpoint_sha256,
                size_bytes=record.size_bytes,
                parent_sha256=record.parent_sha256,
                round=record.round,
                contributions=record.contributions,
                created_at=record.created_at,
            )
        )

    def get(self, task_id: str, version: int) -> ModelVersionRecord | None:
        row = self._s.get(ModelVersionRow, (task_id, version))
        return to_record(row) if row else None

    def for_task(self, task_id: str) -> list[ModelVersionRecord]:
        query = select(ModelVersionRow).where(ModelVersionRow.task_id == task_id).order_by(ModelVersionRow.version)
        return [to_record(r) for r in self._s.scalars(query)]
