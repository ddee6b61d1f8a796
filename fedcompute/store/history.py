"""Compare-and-set status changes with an append-only history row in the same transaction."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Update, bindparam, insert, update
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


# Built once, executed with parameters: on the hot paths (every check-in, report and upload changes a status)
# building a statement cost more Python than SQLite takes to run it.
_INSERT_HISTORY = insert(StatusHistoryRow)
_HISTORY_KEYS = ("entity", "entity_id", "from_status", "to_status", "reason", "at")
_CHANGES: dict[tuple[Any, tuple[str, ...]], Update] = {}


def insert_history(connection: Connection, entries: Iterable[HistoryEntry]) -> None:
    """History rows in one statement (an executemany for several)."""
    connection.execute(_INSERT_HISTORY, [dict(zip(_HISTORY_KEYS, entry, strict=True)) for entry in entries])


def _change(row_cls: Any, columns: tuple[str, ...]) -> Update:
    """``UPDATE row SET status, updated_at, columns... WHERE id AND status``, built once per table and columns set
    (a few of each in the code). Parameters: _id, _from, _to, _at and v_<column>."""
    key = (row_cls, columns)
    statement = _CHANGES.get(key)
    if statement is None:
        statement = _CHANGES[key] = (
            update(row_cls)
            .where(row_cls.id == bindparam("_id"), row_cls.status == bindparam("_from"))
            .values(status=bindparam("_to"), updated_at=bindparam("_at"), **{c: bindparam(f"v_{c}") for c in columns})
        )
    return statement


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
    params = {"_id": entity_id, "_from": from_status, "_to": to_status, "_at": at}
    params.update((f"v_{column}", value) for column, value in values.items())
    result = connection.execute(_change(row_cls, tuple(sorted(values))), params)
    if result.rowcount != 1:
        return False
    insert_history(connection, [(entity, entity_id, from_status, to_status, reason, at)])
    return True
