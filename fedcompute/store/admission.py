"""Check-in admission, group-committed: the slots and assignments of every device checking in at the same moment
are written together, one statement per round on Postgres, one transaction on SQLite.

A check-in's only write is taking a cohort slot in the round's row and adding the assignment. Under load every
check-in of a task writes the same row, so one at a time they queue on its lock (Postgres) or on the database's
single writer (SQLite). Here the first caller to find no write in flight becomes the leader: it takes every
admission queued so far and writes them as one; the callers that queued meanwhile find their answer when the
leader is done (or lead the next batch): ``store.groupcommit``. Slots go first come, first served within a
batch, and never past the round's ``max_cohort``: the count is taken under the row's lock (or the write lock) in
the same statement or transaction that adds the assignments. Soft state (``Database.soft_state``): a crash may
lose a batch whole, never a slot without its assignment. A write that fails fails its callers and writes nothing
of theirs: on SQLite the batch's one transaction, so every caller in it; on Postgres each round's statement is its
own, so a round's failure reaches only that round's callers, and the rounds written before it stand (their
callers are told so, not told of another round's error). On Postgres ``AdmissionQueue`` gives each round a queue
of its own, so one round waiting on its row's lock holds up no other round's check-ins.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import insert, select, update

from fedcompute.core.transitions import AssignmentStatus, IterationStatus
from fedcompute.store.database import Database
from fedcompute.store.groupcommit import Failed, GroupCommit
from fedcompute.store.history import insert_history
from fedcompute.store.models import AssignmentRow, IterationRow

# How long an admission leader waits for the next check-ins before it writes, while callers overlap
# (store.groupcommit). At 64 callers on Postgres: batches of 3.0 -> 5.3 on average, check-ins/s x1.10-1.12 (the
# same server with and without, alternated in one process); 1 caller: unchanged (it never lingers).
ADMISSION_LINGER_S = 0.0005

# One statement: lock the round's row if it is OPEN and not full, take up to k slots, add the first `granted`
# assignments (in the order given; their ids joined by commas, which ids never hold: a text parameter costs the
# driver less than an array) and their history rows; returns the ids that got a slot.
_ADMIT_POSTGRES = """
WITH cur AS (
    SELECT id, task_id, assigned, LEAST(%(k)s, max_cohort - assigned) AS granted FROM iterations
    WHERE id = %(iteration_id)s AND status = %(open)s AND assigned < max_cohort
    FOR UPDATE
), slot AS (
    UPDATE iterations i SET assigned = cur.assigned + cur.granted, updated_at = %(now)s
    FROM cur WHERE i.id = cur.id
    RETURNING cur.id, cur.task_id, cur.granted
), added AS (
    INSERT INTO assignments (id, iteration_id, task_id, status, result_code, created_at, updated_at)
    SELECT u.aid, slot.id, slot.task_id, %(assigned)s, '', %(now)s, %(now)s
    FROM slot, unnest(string_to_array(%(ids)s, ',')) WITH ORDINALITY AS u(aid, n)
    WHERE u.n <= slot.granted
    RETURNING id
)
INSERT INTO status_history (entity, entity_id, from_status, to_status, reason, at)
SELECT 'assignment', id, NULL, %(assigned)s, '', %(now)s FROM added
RETURNING entity_id
"""


@dataclass(frozen=True)
class Admission:
    iteration_id: str
    assignment_id: str
    task_id: str
    at: datetime


def write_admissions(db: Database, batch: list[Admission]) -> set[str]:
    """Take slots for a batch (any rounds, in order): the assignment ids that got one, each with its row; raises
    the first round's error if a round's write failed (on Postgres the other rounds' stand: ``admission_outcomes``
    says which)."""
    outcomes = admission_outcomes(db, batch)
    for outcome in outcomes:
        if isinstance(outcome, Failed):
            raise outcome.error
    return {a.assignment_id for a, granted in zip(batch, outcomes, strict=True) if granted is True}


def admission_outcomes(db: Database, batch: list[Admission]) -> list[bool | Failed]:
    """Take slots for a batch (any rounds, in order); each admission's outcome in the batch's order: True (a slot,
    its row written), False (no slot: the round is full or no longer open), or, on Postgres, ``Failed`` with the
    error of its round's statement, which wrote nothing (each round's statement is its own: a round written before
    it stands). On SQLite the batch is one transaction: an error is raised, and nothing of the batch is written."""
    rounds: dict[str, list[Admission]] = {}
    for admission in batch:
        rounds.setdefault(admission.iteration_id, []).append(admission)
    if not db.is_sqlite:
        outcome: dict[str, bool | Failed] = {}
        for iteration_id, wanted in rounds.items():
            params = {
                "iteration_id": iteration_id, "k": len(wanted), "ids": ",".join(a.assignment_id for a in wanted),
                "now": wanted[-1].at, "open": IterationStatus.OPEN.value,
                "assigned": AssignmentStatus.ASSIGNED.value,
            }  # fmt: skip
            try:
                granted = {row[0] for row in db.soft_statement(_ADMIT_POSTGRES, params)}
            except Exception as exc:  # this round's callers only: the rounds before it are written and stay so
                outcome.update((a.assignment_id, Failed(exc)) for a in wanted)
            else:
                outcome.update((a.assignment_id, a.assignment_id in granted) for a in wanted)
        return [outcome[a.assignment_id] for a in batch]
    return _admit_sqlite(db, rounds, batch)


def _admit_sqlite(db: Database, rounds: dict[str, list[Admission]], batch: list[Admission]) -> list[bool | Failed]:
    with db.soft_state() as s:
        connection = s.connection()
        taken: list[Admission] = []
        for iteration_id, wanted in rounds.items():
            row = connection.execute(
                select(IterationRow.assigned, IterationRow.max_cohort).where(
                    IterationRow.id == iteration_id, IterationRow.status == IterationStatus.OPEN
                )
            ).first()
            if row is None or row.assigned >= row.max_cohort:
                continue
            slots = wanted[: row.max_cohort - row.assigned]
            connection.execute(
                update(IterationRow)
                .where(IterationRow.id == iteration_id)
                .values(assigned=row.assigned + len(slots), updated_at=slots[-1].at)
            )
            taken.extend(slots)
        if taken:
            assigned = AssignmentStatus.ASSIGNED.value
            connection.execute(
                insert(AssignmentRow),
                [
                    {"id": a.assignment_id, "iteration_id": a.iteration_id, "task_id": a.task_id, "status": assigned,
                     "result_code": "", "created_at": a.at, "updated_at": a.at}
                    for a in taken
                ],
            )  # fmt: skip
            insert_history(connection, [("assignment", a.assignment_id, None, assigned, "", a.at) for a in taken])
    granted = {a.assignment_id for a in taken}
    return [a.assignment_id in granted for a in batch]


class AdmissionQueue:
    """Group commit of admissions (see the module and ``store.groupcommit``): ``admit`` blocks until its batch is
    written.

    On Postgres each round has a queue of its own: its statement waits on its round's row lock alone (held a
    moment by an upload's count or a round's close), so one round's wait never holds up another population's
    check-ins, and rounds' statements run side by side. A round's queue lives while a caller is in it. On SQLite
    one queue serves every round: the database has one writer, so a batch of several rounds is one transaction
    where rounds apart would be one each."""

    def __init__(self, db: Database, linger_s: float = ADMISSION_LINGER_S) -> None:
        def write(batch: list[Admission]) -> list[bool | Failed]:
            return admission_outcomes(db, batch)

        self._write = write
        self._linger_s = linger_s
        self._per_round = not db.is_sqlite
        self._lock = threading.Lock()
        self._groups: dict[str, tuple[GroupCommit[Admission, bool], int]] = {}  # round (or ""): queue, callers in it

    def admit(self, admission: Admission) -> bool:
        """True if the admission got a slot (its assignment row is written); raises what the write raised."""
        with self.queue(admission.iteration_id) as group:
            return group.submit(admission)

    @contextmanager
    def queue(self, iteration_id: str) -> Iterator[GroupCommit[Admission, bool]]:
        """The group commit a round's admissions go through, kept while the block runs."""
        key = iteration_id if self._per_round else ""
        with self._lock:
            group, callers = self._groups.get(key) or (GroupCommit(self._write, self._linger_s), 0)
            self._groups[key] = (group, callers + 1)
        try:
            yield group
        finally:
            with self._lock:
                callers = self._groups[key][1] - 1
                if callers:
                    self._groups[key] = (group, callers)
                else:
                    del self._groups[key]
