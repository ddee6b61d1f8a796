"""Compare-and-set status changes with an append-only history row in the same transaction."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from fedcompute.core.transitions import check_transition
from fedcompute.store.models import StatusHistoryRow


def record_created(session: Session, entity: str, entity_id: str, status: str, at: datetime, reason: str = "") -> None:
    session.add(
        StatusHistoryRow(entity=entity, entity_id=entity_id, from_status=None, to_status=status, reason=reason, at=at)
    )


def change_status(
    session: Session,
    row_cls: Any,
    entity: str,
    entity_id: str,
    from_status: str,
    to_status: str,
    at: datetime,
    reason: str = "",
    **values: Any,
) -> bool:
    """``UPDATE ... SET status = :to WHERE id = :id AND status = :from``; True if this call made the change."""
    check_transition(entity, from_status, to_status)
    result = session.execute(
        update(row_cls)
        .where(row_cls.id == entity_id, row_cls.status == from_status)
        .values(status=to_status, updated_at=at, **values)
        .execution_options(synchronize_session=False)
    )
    if getattr(result, "rowcount", 0) != 1:
        return False
    session.add(
        StatusHistoryRow(
            entity=entity, entity_id=entity_id, from_status=from_status, to_status=to_status, reason=reason, at=at
        )
    )
    return True
