"""Group commit (store/groupcommit.py) on SQLite and Postgres alike: works batched into one transaction each keep
or roll back their own writes alone, run in key order and answer in the order given; a work that raises is
rolled back alone and its error goes to its caller alone, except a deadlock, which fails the whole batch after its
retries and writes nothing; callers queued behind a busy leader are written as one batch."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from fedcompute.store.database import Database
from fedcompute.store.groupcommit import Failed, GroupCommit, Work, each_in_savepoint
from fedcompute.store.history import core, insert_history
from fedcompute.store.models import StatusHistoryRow
from tests.store.leader import as_one_batch

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


def test_a_work_that_raises_is_rolled_back_alone_and_its_error_is_its_own(db: Database) -> None:
    """Its rows (written before it raised) are rolled back; the works before and after it are kept."""
    ran: list[str] = []

    def broken(s: Session) -> tuple[bool, str]:
        insert_history(core(s), [("test", "broken", None, "DONE", "", NOW)])
        raise RuntimeError("a bug in one work")

    works = [("k1", _writes("a", True, ran)), ("k2", broken), ("k3", _writes("c", True, ran))]
    outcomes = each_in_savepoint(db, works)
    assert outcomes[0] == "a:kept"
    assert outcomes[2] == "c:kept"
    assert isinstance(outcomes[1], Failed)
    assert str(outcomes[1].error) == "a bug in one work"
    assert _stored(db) == {"a", "c"}


class _Deadlock(Exception):
    sqlstate = "40P01"  # what psycopg reports for a deadlock


def test_a_deadlock_in_one_work_fails_the_whole_batch_after_its_retries_and_writes_nothing(db: Database) -> None:
    """No savepoint contains a deadlock: the transaction is run again (Database.run, five tries), then every
    caller gets the error and nothing is written."""
    ran: list[str] = []
    tries = []

    def deadlocked(s: Session) -> tuple[bool, str]:
        tries.append(1)
        raise OperationalError("UPDATE iterations ...", {}, _Deadlock("deadlock detected"))

    with pytest.raises(OperationalError, match="deadlock detected"):
        each_in_savepoint(db, [("k1", _writes("a", True, ran)), ("k2", deadlocked)])
    assert len(tries) == 5
    assert _stored(db) == set()


def test_callers_queued_behind_a_busy_leader_are_written_as_one_batch(db: Database) -> None:
    """Three callers arrive while a leader is writing: the next leader writes all three in one transaction,
    and each caller gets its own work's outcome (the declined one's row is not stored)."""
    batches: list[int] = []

    def write(items: list[tuple[str, Work[str]]]) -> list[str | Failed]:
        batches.append(len(items))
        return each_in_savepoint(db, items)

    group: GroupCommit[tuple[str, Work[str]], str] = GroupCommit(write)
    ran: list[str] = []
    answers: dict[str, str] = {}

    def submit(name: str, keep: bool) -> Callable[[], None]:
        return lambda: answers.__setitem__(name, group.submit((name, _writes(name, keep, ran))))

    as_one_batch(group, [submit("a", True), submit("b", False), submit("c", True)])
    assert batches == [3]
    assert answers == {"a": "a:kept", "b": "b:declined", "c": "c:kept"}
    assert _stored(db) == {"a", "c"}


def test_an_error_of_one_item_is_raised_to_its_caller_alone() -> None:
    """Two callers in one batch whose write reports the first item as Failed: the first caller gets that error,
    the second its outcome."""

    def write(items: list[str]) -> list[str | Failed]:
        return [Failed(ValueError(f"{i} refused")) if i == "bad" else f"{i} ok" for i in items]

    group: GroupCommit[str, str] = GroupCommit(write)
    results: dict[str, str] = {}

    def submit(item: str) -> Callable[[], None]:
        def call() -> None:
            try:
                results[item] = group.submit(item)
            except ValueError as exc:
                results[item] = f"raised {exc}"

        return call

    as_one_batch(group, [submit("bad"), submit("good")])
    assert results == {"bad": "raised bad refused", "good": "good ok"}


def test_many_threads_each_get_their_own_outcome_and_a_failed_batch_fails_all_its_callers() -> None:
    """Real threads against one group (no database): every caller gets the outcome of its own item, items are
    written in batches, nobody waits forever, and a batch whose write raises fails each caller in it alone."""
    import random
    import threading
    import time

    batches: list[list[int]] = []

    def write(items: list[int]) -> list[int]:
        batches.append(items)
        time.sleep(random.uniform(0, 0.002))
        if -1 in items:
            raise ValueError("poisoned batch")
        return [i * 2 for i in items]

    group: GroupCommit[int, int] = GroupCommit(write)
    results: dict[int, object] = {}

    def caller(base: int) -> None:
        for i in range(base, base + 50):
            try:
                results[i] = group.submit(-1 if i == 777 else i)
            except ValueError as exc:
                results[i] = exc

    threads = [threading.Thread(target=caller, args=(k * 50,)) for k in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive()
    poisoned = next(b for b in batches if -1 in b)
    failed = {i for i, r in results.items() if isinstance(r, ValueError)}
    assert failed == {777 if i == -1 else i for i in poisoned}  # exactly the poisoned batch's callers
    assert all(results[i] == 2 * i for i in range(1600) if i not in failed)
    assert sum(len(b) for b in batches) == 1600  # every item written once
    assert len(batches) < 1600  # callers were grouped


def test_a_leader_lingers_only_after_a_batch_of_several_callers() -> None:
    """A lone caller is written at once, however often it calls; after a batch of several, the next leader
    lingers once before taking its batch, and goes back to writing at once when lingering gathered nobody."""
    batches: list[list[str]] = []
    lingered: list[float] = []

    def write(items: list[str]) -> list[str]:
        batches.append(items)
        return items

    group: GroupCommit[str, str] = GroupCommit(write, linger_s=0.001, sleep=lingered.append)
    assert [group.submit("alone"), group.submit("again")] == ["alone", "again"]
    assert lingered == []  # one caller calling again and again never waits
    as_one_batch(group, [lambda: group.submit("a"), lambda: group.submit("b")])
    assert lingered == []  # these queued behind a busy leader: batched without lingering
    group.submit("next")  # the batch before held two: callers overlap
    assert lingered == [0.001]
    group.submit("after")  # lingering gathered nobody: written at once again
    assert lingered == [0.001]
    assert batches == [["alone"], ["again"], ["a", "b"], ["next"], ["after"]]
    assert GroupCommit(write, sleep=lingered.append)._linger_s == 0  # no linger unless asked for


def test_a_caller_arriving_while_the_leader_lingers_joins_its_batch() -> None:
    """The leader lingers (callers overlapped just before); a caller that arrives meanwhile is written in the
    leader's batch, one write for both, and each gets its own outcome."""
    batches: list[list[str]] = []
    lingering, queued = threading.Event(), threading.Event()

    def write(items: list[str]) -> list[str]:
        batches.append(items)
        return [f"{i} ok" for i in items]

    def linger(seconds: float) -> None:
        lingering.set()
        assert queued.wait(30)
        while len(group._queued) < 2:  # the late caller has queued its item behind this leader
            threading.Event().wait(0.001)

    group: GroupCommit[str, str] = GroupCommit(write, linger_s=0.01, sleep=linger)
    as_one_batch(group, [lambda: group.submit("a"), lambda: group.submit("b")])  # callers overlap
    answers: dict[str, str] = {}
    leader = threading.Thread(target=lambda: answers.__setitem__("leader", group.submit("leader")))
    leader.start()
    assert lingering.wait(30)
    late = threading.Thread(target=lambda: answers.__setitem__("late", group.submit("late")))
    late.start()
    queued.set()
    for t in (leader, late):
        t.join(timeout=30)
        assert not t.is_alive()
    assert batches[1:] == [["leader", "late"]]
    assert answers == {"leader": "leader ok", "late": "late ok"}


def test_a_linger_interrupted_fails_its_whole_batch_and_leaves_nothing_queued() -> None:
    """An exception while the leader lingers (a signal's) reaches every caller of the batch it was gathering and
    nothing of it is written, now or by the next leader: no caller is told it failed while its item is written."""
    batches: list[list[str]] = []

    def write(items: list[str]) -> list[str]:
        batches.append(items)
        return items

    class Interrupted(BaseException):  # as a signal's exception may be: not an Exception
        pass

    def interrupted(seconds: float) -> None:
        raise Interrupted

    group: GroupCommit[str, str] = GroupCommit(write, linger_s=0.001, sleep=interrupted)
    as_one_batch(group, [lambda: group.submit("a"), lambda: group.submit("b")])  # callers overlap
    with pytest.raises(Interrupted):
        group.submit("lost")
    assert group.submit("next") == "next"  # the batch before held one: no linger
    assert batches == [["a", "b"], ["next"]]


def test_admissions_linger_as_configured(db: Database) -> None:
    """The admission queue hands its linger to its group commit (the default, or none when asked)."""
    from fedcompute.store.admission import ADMISSION_LINGER_S, AdmissionQueue

    assert ADMISSION_LINGER_S > 0
    with AdmissionQueue(db).queue("it_1") as group:
        assert group._linger_s == ADMISSION_LINGER_S
    with AdmissionQueue(db, linger_s=0).queue("it_1") as group:
        assert group._linger_s == 0
