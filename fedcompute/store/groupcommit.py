"""Group commit: writes that many threads make at the same moment go to the database together.

Under load the writes of one kind (a check-in's admission, a finished upload's count) queue on one lock: the
round's row on Postgres, the single writer on SQLite, each holding it for its own statements, its commit and (when
durable) the disk flush. Here the first caller to find no batch being written becomes the leader: it takes every
item queued so far and writes them as one (one statement or one transaction); the callers that queued meanwhile
find their outcome when the leader is done, or lead the next batch. A batch that fails fails every caller in it
with the same error, never some of them silently; ``each_in_savepoint`` keeps an error of one work to its caller
where a savepoint can contain it.

A leader that writes at once often writes alone: at 64 check-in callers half the batches held one item, each a
statement and a round trip of its own, while the next callers were a fraction of a millisecond from queueing.
So a leader may linger once (``linger_s``, its thread's GIL released meanwhile) before taking its batch, so that
they join it: when the batch before held more than one item, that is, while callers are known to overlap. One
caller calling alone, again and again, never waits (its batches hold one item each); the first caller after a
burst may wait once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from sqlalchemy.orm import Session

from fedcompute.store.database import Database, is_conflict

I = TypeVar("I")  # noqa: E741 - an item handed in
R = TypeVar("R")  # its outcome


class _Waiting(Generic[I, R]):
    __slots__ = ("done", "error", "item", "outcome")

    def __init__(self, item: I) -> None:
        self.item = item
        self.done = False
        self.outcome: R | None = None
        self.error: BaseException | None = None


class Failed:
    """An outcome that is an error of this item alone: ``submit`` raises it to that item's caller only."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


class GroupCommit(Generic[I, R]):
    """``submit`` blocks until the batch holding its item is written by ``write`` (outcomes in the items' order)."""

    def __init__(
        self,
        write: Callable[[list[I]], Sequence[R | Failed]],
        linger_s: float = 0.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """``linger_s``: how long a leader waits for more callers while callers overlap (see the module)."""
        self._write = write
        self._linger_s = linger_s
        self._sleep = sleep
        self._overlapping = False  # the last batch held more than one item
        self._queued: list[_Waiting[I, R]] = []
        self._queue_lock = threading.Lock()
        self._writing = threading.Lock()  # held by the leader while it writes a batch

    def submit(self, item: I) -> R:
        """The item's outcome; raises what writing its batch raised."""
        mine: _Waiting[I, R] = _Waiting(item)
        with self._queue_lock:
            self._queued.append(mine)
        with self._writing:
            if not mine.done:
                interrupted: BaseException | None = None
                if self._overlapping and self._linger_s > 0:
                    try:
                        self._sleep(self._linger_s)  # callers overlap: one statement for the next few, not one each
                    except BaseException as exc:  # (a signal's exception): the batch fails whole, none of it is left
                        interrupted = exc
                with self._queue_lock:
                    batch, self._queued = self._queued, []
                self._overlapping = len(batch) > 1
                try:
                    if interrupted is not None:
                        raise interrupted
                    outcomes = self._write([w.item for w in batch])
                except BaseException as exc:  # every caller in the batch gets the error, not just the leader
                    for waiting in batch:
                        waiting.error, waiting.done = exc, True
                else:
                    for waiting, outcome in zip(batch, outcomes, strict=True):
                        if isinstance(outcome, Failed):
                            waiting.error, waiting.done = outcome.error, True
                        else:
                            waiting.outcome, waiting.done = outcome, True
        if mine.error is not None:
            raise mine.error
        return mine.outcome  # type: ignore[return-value]  # set with done, when no error was


Work = Callable[[Session], tuple[bool, R]]


def each_in_savepoint(db: Database, works: list[tuple[str, Work[R]]]) -> list[R | Failed]:
    """One durable transaction (``Database.run``: a deadlock re-runs the whole batch) running each (key, work) in a
    savepoint of its own, in key order (works that lock rows lock them in one order whatever the batch), outcomes
    returned in the order given. A work returns (keep, outcome): keep False rolls back what it wrote, and only that,
    so one upload that finds its round closed does not undo the others'. A work that raises is rolled back alone
    and its error goes to its caller alone (``Failed``), except what no savepoint contains: a deadlock or
    serialization failure (the whole batch is run again) and a lost connection (the whole batch fails)."""
    order = sorted(range(len(works)), key=lambda i: works[i][0])

    def batch(s: Session) -> list[R | Failed]:
        outcomes: dict[int, R | Failed] = {}
        for i in order:
            savepoint = s.begin_nested()
            try:
                keep, outcome = works[i][1](s)
            except Exception as exc:
                if is_conflict(exc) or getattr(exc, "connection_invalidated", False):
                    raise
                savepoint.rollback()
                outcomes[i] = Failed(exc)
                continue
            if keep:
                savepoint.commit()
            else:
                savepoint.rollback()
            outcomes[i] = outcome
        return [outcomes[i] for i in range(len(works))]

    return db.run(batch)
