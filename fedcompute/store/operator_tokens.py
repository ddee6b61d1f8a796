"""Operator tokens: bearer credentials for TaskManagementService, kept only as the sha256 of the token."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from fedcompute.core.clock import as_utc
from fedcompute.store.history import record_created
from fedcompute.store.models import OperatorTokenRow, StatusHistoryRow

ENTITY = "operator_token"


@dataclass(frozen=True)
class OperatorTokenRecord:
    """A stored token without its secret: who it is for, what it may do, and whether it still works."""

    token_id: str
    name: str
    role: str
    created_at: datetime
    revoked_at: datetime | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def to_record(row: OperatorTokenRow) -> OperatorTokenRecord:
    return OperatorTokenRecord(
        token_id=row.id,
        name=row.name,
        role=row.role,
        created_at=as_utc(row.created_at),
        revoked_at=as_utc(row.revoked_at) if row.revoked_at else None,
    )


class OperatorTokenRepository:
    def __init__(self, session: Session) -> None:
        self._s = session

    def add(
        self, token_id: str, name: str, role: str, token_sha256: str, now: datetime, by: str
    ) -> OperatorTokenRecord:
        row = OperatorTokenRow(id=token_id, name=name, role=role, token_sha256=token_sha256, created_at=now)
        self._s.add(row)
        record_created(self._s, ENTITY, token_id, "ACTIVE", now, f"{role} token {name!r} created by {by}")
        self._s.flush()
        return to_record(row)

    def by_hash(self, token_sha256: str) -> OperatorTokenRecord | None:
        row = self._s.scalar(select(OperatorTokenRow).where(OperatorTokenRow.token_sha256 == token_sha256))
        return to_record(row) if row else None

    def get(self, token_id: str) -> OperatorTokenRecord | None:
        row = self._s.get(OperatorTokenRow, token_id)
        return to_record(row) if row else None

    def named(self, name: str) -> list[OperatorTokenRecord]:
        query = select(OperatorTokenRow).where(OperatorTokenRow.name == name).order_by(OperatorTokenRow.created_at)
        return [to_record(r) for r in self._s.scalars(query)]

    def all(self) -> list[OperatorTokenRecord]:
        query = select(OperatorTokenRow).order_by(OperatorTokenRow.created_at, OperatorTokenRow.id)
        return [to_record(r) for r in self._s.scalars(query)]

    def revoke(self, token_id: str, now: datetime, by: str) -> bool:
        """Compare-and-set: only a token not yet revoked is revoked (it keeps its first revocation time), with a
        history row in the same transaction; True if this call revoked it."""
        result = self._s.execute(
            update(OperatorTokenRow)
            .where(OperatorTokenRow.id == token_id, OperatorTokenRow.revoked_at.is_(None))
            .values(revoked_at=now)
        )
        if getattr(result, "rowcount", 0) != 1:
            return False
        self._s.add(
            StatusHistoryRow(
                entity=ENTITY, entity_id=token_id, from_status="ACTIVE", to_status="REVOKED", reason=f"by {by}", at=now
            )
        )
        return True
