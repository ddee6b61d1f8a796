"""Group commit (store/groupcommit.py) on SQLite and Postgres alike: works batched into one transaction each keep
or roll back their own writes alone, run in key order and answer in the order given; a work that raises fails
the whole batch, which then writes nothing; callers queued behind a busy leader are written as one batch."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from fedcompute.store.database import Database
from fedcompute.store.groupcommit import GroupCommit, Work, each_in_savepoint
from fedcompute.store.history import core, insert_history
from fedcompute.store.models import StatusHistoryRow

NOW = datetime(2026, 5, 1, tzinfo=UTC)


def _writes(name: str, keep: bool, ran: list[str]) -> Work[str]:
    """A work that writes one history row named ``name``, then keeps it or rolls it back."""

    def work(s: Session) -> tuple[bool, str]:
        ran.append(name)
        insert_history(core(s), [("test", name, None, "DONE", "", NOW)])
        return keep, f"{name}:{'kept' if keep else 'declined'}"

    return work


def _stored(db: Database) -> set[str]:
    with db.reading() as s:
        return set(s.scalars(select(StatusHistoryRow.entity_id).where(StatusHistoryRow.entity == "test")))


def test_a_declining_work_rolls_back_only_its_own_writes(db: Database) -> None:
    ran: list[str] = []
    works = [("k2", _writes("b", False, ran)), ("k1", _writes("a", True, ran)), ("k3", _writes("c", True, ran))]
    assert each_in_savepoint(db, works) == ["b:declined", "a:kept", "c:kept"]  # in the order given
    assert ran == ["a", "b", "c"]  # run in key order
    assert _stored(db) == {"a", "c"}


def test_a_work_that_raises_fails_the_batch_and_writes_nothing(db: Database) -> None:
    ran: list[str] = []

    def broken(s: Session) -> tuple[bool, str]:
        raise RuntimeError("a bug in one work")

    with pytest.raises(RuntimeError, match="a bug in one work"):
        each_in_savepoint(db, [("k1", _writes("a", True, ran)), ("k2", broken)])
    assert _stored(db) == set()


def test_callers_queued_behind_a_busy_leader_are_written_as_one_batch(db: Database) -> None:
    """Three callers arrive while a leader is writing: the next leader writes all three in one transaction,
    and each caller gets its own work's outcome (the declined one's row is not stored)."""
    batches: list[int] = []

    def write(items: list[tuple[str, Work[str]]]) -> list[str]:
        batches.append(len(items))
        return each_in_savepoint(db, items)

    group: GroupCommit[tuple[str, Work[str]], str] = GroupCommit(write)
    ran: list[str] = []
    answers: dict[str, str] = {}
    group._writing.acquire()  # a leader busy writing

    def submit(name: str, keep: bool) -> Callable[[], None]:
        return lambda: answers.__setitem__(name, group.submit((name, _writes(name, keep, ran))))

    threads = [threading.Thread(target=submit(n, k)) for n, k in (("a", True), ("b", False), ("c", True))]
    for t in threads:
        t.start()
    while len(group._queued) < 3:
        threading.Event().wait(0.005)
    group._writing.release()
    for t in threads:
        t.join(timeout=30)
    assert batches == [3]
    assert answers == {"a": "a:kept", "b": "b:declined", "c": "c:kept"}
    assert _stored(db) == {"a", "c"}
