"""Group-committed check-in admission (store/admission.py), on SQLite and Postgres alike: slots go first come,
first served and never past max_cohort, whatever the concurrency; a slot never exists without its assignment;
a failed batch fails every caller in it and writes nothing."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime

import psycopg
import pytest
from sqlalchemy import create_engine, event, func, select, text
from sqlalchemy.exc import IntegrityError

from fedcompute.core.clock import FakeClock, RandomIds
from fedcompute.core.records import ModelVersionRecord
from fedcompute.core.tasks import TaskSpec
from fedcompute.core.transitions import IterationStatus, TaskStatus
from fedcompute.rpc.auth import TokenSigner
from fedcompute.server.assignment import OPEN_TASKS_TTL_S, AssignmentService
from fedcompute.server.keyring import KeyRing
from fedcompute.store import admission
from fedcompute.store.admission import Admission, AdmissionQueue, write_admissions
from fedcompute.store.database import Database
from fedcompute.store.groupcommit import Failed, GroupCommit
from fedcompute.store.iterations import IterationRepository
from fedcompute.store.model_versions import ModelVersionRepository
from fedcompute.store.models import AssignmentRow, StatusHistoryRow
from fedcompute.store.tasks import TaskRepository
from fedcompute.v1 import common_pb2
from tests.harness import wait_for
from tests.store.leader import as_one_batch

NOW = datetime(2026, 5, 1, tzinfo=UTC)
ids = RandomIds()


def _round(db: Database, max_cohort: int, task_id: str = "task_a") -> str:
    spec = TaskSpec("pop", "digits-linear-v1", rounds=2, report_goal=1, max_cohort=max_cohort)
    with db.transaction() as s:
        TaskRepository(s).add(task_id, spec, b"{}", "0" * 64, TaskStatus.OPEN, NOW)
        s.flush()
        return IterationRepository(s).open(ids, task_id, 1, 1, 1, spec, NOW)


def _stored(db: Database, iteration_id: str) -> tuple[int, set[str], set[str]]:
    """(the round's assigned count, its assignment ids, the ids with a history row)."""
    with db.reading() as s:
        record = IterationRepository(s).get(iteration_id)
        assert record is not None
        rows = set(s.scalars(select(AssignmentRow.id).where(AssignmentRow.iteration_id == iteration_id)))
        history = set(s.scalars(select(StatusHistoryRow.entity_id).where(StatusHistoryRow.entity == "assignment")))
    return record.assigned, rows, history


def test_a_batch_larger_than_the_free_slots_admits_the_first_comers_only(db: Database) -> None:
    iteration_id = _round(db, max_cohort=5)
    first = write_admissions(db, [Admission(iteration_id, f"asg_{i}", "task_a", NOW) for i in range(3)])
    assert first == {"asg_0", "asg_1", "asg_2"}
    second = write_admissions(db, [Admission(iteration_id, f"asg_{i}", "task_a", NOW) for i in range(3, 8)])
    assert second == {"asg_3", "asg_4"}  # two slots were left: the first two of the batch get them, in order
    assigned, rows, history = _stored(db, iteration_id)
    assert assigned == 5
    assert rows == {f"asg_{i}" for i in range(5)} == history


def test_a_closed_round_admits_nobody(db: Database) -> None:
    iteration_id = _round(db, max_cohort=5)
    with db.transaction() as s:
        assert IterationRepository(s).change_status(iteration_id, IterationStatus.OPEN, IterationStatus.CANCELED, NOW)
    assert write_admissions(db, [Admission(iteration_id, "asg_late", "task_a", NOW)]) == set()
    assert _stored(db, iteration_id) == (0, set(), set())


def test_the_cap_holds_for_many_callers_and_two_processes_worth_of_queues(db: Database) -> None:
    """48 callers on two queues (as two replicas would be) over a round of 10: exactly 10 admitted, each with its
    assignment and history row; the 38 others left no row."""
    iteration_id = _round(db, max_cohort=10)
    other = Database(db.url)
    queues = [AdmissionQueue(db), AdmissionQueue(other)]
    answers: dict[str, bool] = {}
    lock = threading.Lock()
    start = threading.Barrier(48)

    def check_in(n: int) -> None:
        start.wait()
        granted = queues[n % 2].admit(Admission(iteration_id, f"asg_{n:02d}", "task_a", NOW))
        with lock:
            answers[f"asg_{n:02d}"] = granted

    threads = [threading.Thread(target=check_in, args=(n,)) for n in range(48)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    other.dispose()
    admitted = {a for a, ok in answers.items() if ok}
    assert len(answers) == 48
    assert len(admitted) == 10
    assigned, rows, history = _stored(db, iteration_id)
    assert assigned == 10
    assert rows == admitted == history


def test_a_failed_batch_fails_every_caller_in_it_and_writes_nothing(db: Database) -> None:
    """A batch that cannot be written (here an assignment id already taken: the insert fails) raises for all of
    its callers, and the slot count is as it was: no slot without its assignment, nothing half-written."""
    iteration_id = _round(db, max_cohort=5)
    assert write_admissions(db, [Admission(iteration_id, "asg_taken", "task_a", NOW)]) == {"asg_taken"}
    batch = [Admission(iteration_id, "asg_new", "task_a", NOW), Admission(iteration_id, "asg_taken", "task_a", NOW)]
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        write_admissions(db, batch)
    assert _stored(db, iteration_id) == (1, {"asg_taken"}, {"asg_taken"})

    queue = AdmissionQueue(db)
    errors: list[BaseException] = []

    def check_in(assignment_id: str) -> Callable[[], None]:
        def call() -> None:
            try:
                queue.admit(Admission(iteration_id, assignment_id, "task_a", NOW))
            except Exception as exc:
                errors.append(exc)  # list.append is atomic

        return call

    with queue.queue(iteration_id) as group:
        as_one_batch(group, [check_in("asg_other"), check_in("asg_taken")])
    assert len(errors) == 2  # the caller whose admission was fine learns of the failure too
    with db.reading() as s:
        count = s.scalar(select(func.count()).select_from(AssignmentRow))
    assert count == 1
    assert _stored(db, iteration_id)[0] == 1


def test_one_rounds_failure_reaches_only_its_callers_on_postgres_and_fails_the_whole_batch_on_sqlite(
    db: Database,
) -> None:
    """A batch of check-ins for two rounds whose second round's write fails (an assignment id already taken: its
    insert fails). On Postgres each round's statement is its own: the first round's was committed before the second
    failed, so its caller is admitted, told so, and only the second round's caller gets the error (found by a
    review, 2026-12-02: both were told of the error while the first's slot and row stood, held until the sweeper
    timed it out). On SQLite the batch is one transaction: both fail and nothing is written."""
    first = _round(db, max_cohort=5, task_id="task_a")
    second = _round(db, max_cohort=5, task_id="task_b")
    assert write_admissions(db, [Admission(second, "asg_taken", "task_b", NOW)]) == {"asg_taken"}
    batch = [Admission(first, "asg_a", "task_a", NOW), Admission(second, "asg_taken", "task_b", NOW)]
    outcomes: dict[str, object] = {}
    group: GroupCommit[Admission, bool] = GroupCommit(lambda b: admission.admission_outcomes(db, b))

    def check_in(admitted: Admission) -> Callable[[], None]:
        def call() -> None:
            try:
                outcomes[admitted.assignment_id] = group.submit(admitted)
            except Exception as exc:
                outcomes[admitted.assignment_id] = exc

        return call

    as_one_batch(group, [check_in(a) for a in batch])
    if db.is_sqlite:
        assert all(isinstance(o, IntegrityError) for o in outcomes.values())
        assert _stored(db, first)[:2] == (0, set())
    else:
        assert outcomes["asg_a"] is True
        assert isinstance(outcomes["asg_taken"], psycopg.errors.UniqueViolation)
        assert _stored(db, first)[:2] == (1, {"asg_a"})
        with pytest.raises(psycopg.errors.UniqueViolation):
            write_admissions(db, batch[1:])  # the all-or-raise form raises the failed round's error
    assert _stored(db, second)[:2] == (1, {"asg_taken"})


def test_every_caller_returns_and_batches_form_when_callers_keep_arriving(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """300 callers in waves on one queue over a round with room for all: each returns granted (no caller is left
    waiting, whether its admission was written by another caller's batch or by its own), and they were written in
    fewer batches than callers."""
    iteration_id = _round(db, max_cohort=1000)
    queue = AdmissionQueue(db)
    answers: list[bool] = []
    written: list[int] = []

    real = admission.admission_outcomes

    def counted(db: Database, batch: list[Admission]) -> list[bool | Failed]:
        written.append(len(batch))
        return real(db, batch)

    monkeypatch.setattr(admission, "admission_outcomes", counted)  # the real write, its batch sizes noted

    def check_in(n: int) -> None:
        answers.append(queue.admit(Admission(iteration_id, f"asg_{n:03d}", "task_a", NOW)))

    threads = [threading.Thread(target=check_in, args=(n,)) for n in range(300)]
    for wave in range(0, 300, 50):
        for t in threads[wave : wave + 50]:
            t.start()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive()
    assert answers == [True] * 300
    assert sum(written) == 300
    assert len(written) < 300
    assert _stored(db, iteration_id)[0] == 300


def test_an_expired_round_is_read_again_by_one_caller_while_the_others_use_it(db: Database) -> None:
    """The check-in caches (open tasks, open round) expire after OPEN_TASKS_TTL_S: one caller reads the round
    again while the callers arriving meanwhile use what was read before, instead of every caller reading at once.
    Played here by holding the re-read's lock, as that one caller does."""
    iteration_id = _round(db, max_cohort=100)
    with db.transaction() as s:
        ModelVersionRepository(s).add(ModelVersionRecord("task_a", 1, None, "c" * 64, 10, "", 0, 0, NOW))
        task = TaskRepository(s).get("task_a")
    assert task is not None
    now = [0.0]
    service = AssignmentService(
        db, FakeClock(NOW), RandomIds(), TokenSigner(b"k" * 32), KeyRing([], FakeClock(NOW)), monotonic=lambda: now[0]
    )
    reads: list[str] = []

    def note(conn: object, cursor: object, statement: str, *args: object) -> None:
        if statement.lstrip().startswith("SELECT iterations.id, iterations.task_id, iterations.round"):  # current()
            reads.append(statement)

    event.listen(db.engine, "before_cursor_execute", note)
    key = common_pb2.PublicKey()
    assert service._admit(task, set(), key) is not None
    assert len(reads) == 1  # the first check-in reads the round
    assert service._admit(task, set(), key) is not None
    assert len(reads) == 1  # then it is cached
    now[0] = OPEN_TASKS_TTL_S + 1  # expired
    with service._refreshing:  # one caller is reading it again
        assert service._admit(task, set(), key) is not None
        assert len(reads) == 1  # this one used the round it had
    assert service._admit(task, set(), key) is not None
    assert len(reads) == 2  # nobody else is reading it: this caller does
    assert _stored(db, iteration_id)[0] == 4


def test_a_population_whose_last_task_ended_is_not_served_its_old_task_list(db: Database) -> None:
    """Once a population's last task has ended, the read that finds no open task drops the cached list: a caller
    arriving while another one re-reads gets no task (NO_ACTIVE_TASK and its long retry window), not the old list,
    an extra round read and NO_TASK_AVAILABLE's window ten times shorter, forever (found by a review, 2026-12-02:
    the expired entry stayed)."""
    _round(db, max_cohort=100)
    now = [0.0]
    service = AssignmentService(
        db, FakeClock(NOW), RandomIds(), TokenSigner(b"k" * 32), KeyRing([], FakeClock(NOW)), monotonic=lambda: now[0]
    )
    assert [t.task_id for t in service._open_tasks("pop")] == ["task_a"]
    with db.transaction() as s:
        assert TaskRepository(s).change_status("task_a", TaskStatus.OPEN, TaskStatus.COMPLETED, NOW, "done")
    assert [t.task_id for t in service._open_tasks("pop")] == ["task_a"]  # cached: at most the TTL stale
    now[0] = OPEN_TASKS_TTL_S + 1
    assert service._open_tasks("pop") == []  # expired: read again, none open
    with service._refreshing:  # another caller re-reading: this one is not handed the old list
        assert service._open_tasks("pop") == []


def test_postgres_admissions_survive_killed_connections_and_dispose_closes_theirs(
    postgres_database: str,
) -> None:
    """The Postgres admission statement runs on connections of its own (``Database.soft_statement``). When the
    server processes behind every kept connection die (a restart, a failover), the next admission throws them away
    and is made once on a fresh one, nothing written twice; ``dispose`` closes the ones it kept."""
    from tests.conftest import fresh_postgres

    db = Database(fresh_postgres(postgres_database))
    db.migrate()
    try:
        iteration_id = _round(db, max_cohort=5)
        assert write_admissions(db, [Admission(iteration_id, "asg_1", "task_a", NOW)]) == {"asg_1"}
        start = threading.Barrier(3)
        pids: set[int] = set()

        def hold() -> None:  # two statements at once: two connections are kept afterwards
            start.wait()
            pids.update(row[0] for row in db.soft_statement("SELECT pg_backend_pid() FROM pg_sleep(0.3)", {}))

        threads = [threading.Thread(target=hold) for _ in range(2)]
        for t in threads:
            t.start()
        start.wait()
        for t in threads:
            t.join()
        assert len(pids) == 2
        with db.engine.connect() as admin:
            for pid in pids:
                admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        assert write_admissions(db, [Admission(iteration_id, "asg_2", "task_a", NOW)]) == {"asg_2"}
        assert _stored(db, iteration_id) == (2, {"asg_1", "asg_2"}, {"asg_1", "asg_2"})
        kept = {row[0] for row in db.soft_statement("SELECT pg_backend_pid()", {})}
    finally:
        db.dispose()
    probe = create_engine(postgres_database, isolation_level="AUTOCOMMIT")

    def closed() -> bool:  # a backend exits when it reads the client's goodbye, a moment after ``dispose``
        with probe.connect() as conn:
            alive = conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(:p)"), {"p": list(kept)})
            return bool(alive.scalar_one() == 0)

    try:
        wait_for(closed, timeout_s=10, what="the kept connections' server processes to exit")
    finally:
        probe.dispose()


def test_an_admission_written_twice_is_refused_whole_and_counts_once(db: Database) -> None:
    """What makes a retried admission safe (``Database.soft_statement`` runs a statement again when its connection
    broke, perhaps after the server had committed it): the same assignment id again fails on its unique key, and
    the statement's slot update goes with it: the round's count and rows stay those of the first write."""
    iteration_id = _round(db, max_cohort=5)
    assert write_admissions(db, [Admission(iteration_id, "asg_1", "task_a", NOW)]) == {"asg_1"}
    with pytest.raises((IntegrityError, psycopg.IntegrityError)):  # SQLAlchemy's (SQLite), the driver's (Postgres)
        write_admissions(db, [Admission(iteration_id, "asg_1", "task_a", NOW)])
    assert _stored(db, iteration_id) == (1, {"asg_1"}, {"asg_1"})


def test_on_postgres_a_round_waiting_on_its_row_lock_holds_up_no_other_rounds_check_ins(
    postgres_database: str,
) -> None:
    """Round A's row is locked (a transaction holds it, as an upload's count or a round's close does a moment): a
    check-in to A waits for it, and one to round B (another population) is admitted meanwhile. With one queue for
    every round, B's caller queued behind A's leader, blocked in A's statement, until A's lock was let go."""
    from tests.conftest import fresh_postgres

    db = Database(fresh_postgres(postgres_database))
    db.migrate()
    try:
        first, second = _round(db, max_cohort=5, task_id="task_a"), _round(db, max_cohort=5, task_id="task_b")
        queue = AdmissionQueue(db)
        outcomes: dict[str, bool] = {}

        def check_in(admitted: Admission) -> threading.Thread:
            thread = threading.Thread(target=lambda: outcomes.update({admitted.assignment_id: queue.admit(admitted)}))
            thread.start()
            return thread

        with db.engine.connect() as holder, holder.begin():
            holder.execute(text("SELECT id FROM iterations WHERE id = :id FOR UPDATE"), {"id": first})
            waiting = check_in(Admission(first, "asg_a", "task_a", NOW))
            # A's statement is waiting on the lock before B checks in; each poll its own transaction, since
            # pg_stat_activity is read once per transaction (a probe in one would never see A start waiting)
            with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as probe:
                wait_for(
                    lambda: probe.execute(
                        text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = :d"),
                        {"d": db.engine.url.database},
                    ).scalar_one() == 1,
                    timeout_s=10, what="round A's admission to wait on its row's lock",
                )  # fmt: skip
            other = check_in(Admission(second, "asg_b", "task_b", NOW))
            other.join(timeout=10)
            assert not other.is_alive(), "round B's check-in waited on round A's lock"
            assert outcomes == {"asg_b": True}
            assert waiting.is_alive()
        waiting.join(timeout=10)
        assert outcomes == {"asg_a": True, "asg_b": True}
        assert _stored(db, first)[:2] == (1, {"asg_a"})
        assert _stored(db, second)[:2] == (1, {"asg_b"})
        assert queue._groups == {}  # each round's queue is dropped once nobody is in it
    finally:
        db.dispose()
