"""Compare-and-set status changes with an append-only history row in the same transaction."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import insert, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from fedcompute.core.transitions import check_transition
from fedcompute.store.models import StatusHistoryRow


def core(session: Session) -> Connection:
    """The session's connection, for Core statements on the hot paths (state changes, history rows): they skip the
    ORM's unit of work, several times their own cost. Pending ORM changes are flushed first, so a Core statement
    always sees what the transaction has added before it."""
    session.flush()
    return session.connection()


HistoryEntry = tuple[str, str, str | None, str, str, datetime]  # entity, id, from status, to status, reason, at


def insert_history(connection: Connection, entries: Iterable[HistoryEntry]) -> None:
    """History rows in one statement (an executemany for several)."""
    keys = ("entity", "entity_id", "from_status", "to_status", "reason", "at")
    connection.execute(insert(StatusHistoryRow), [dict(zip(keys, entry, strict=True)) for entry in entries])


def record_created(session: Session, entity: str, entity_id: str, status: str, at: datetime, reason: str = "") -> None:
    insert_history(core(session), [(entity, entity_id, None, status, reason, at)])


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
    connection = core(session)
    result = connection.execute(
        update(row_cls)
        .where(row_cls.id == entity_id, row_cls.status == from_status)
        .values(status=to_status, updated_at=at, **values)
    )
    if result.rowcount != 1:
        return False
    insert_history(connection, [(entity, entity_id, from_status, to_status, reason, at)])
    return True
