"""The staging directory: one writer per upload across every process that shares it (``sole_writer``), and the
sweep that removes staged bytes no upload will finish (``StagingSweeper``)."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

import structlog

from fedcompute.core.clock import Clock
from fedcompute.core.errors import Aborted
from fedcompute.store.assignments import AssignmentRepository
from fedcompute.store.database import Database

log = structlog.get_logger("fedcompute.staging")
BATCH = 500  # staging files looked up in one read


@contextmanager
def sole_writer(staging: Path, upload_id: str) -> Iterator[None]:
    """The caller is the upload's only writer in every process sharing ``staging`` (replicas) until the block
    ends: an exclusive ``flock`` on a lock file beside the staging file. Another stream meanwhile (a device that
    moved to another replica before the first one noticed the broken connection, or one racing itself) gets
    ABORTED and resumes when this one ends; two writers would interleave their bytes in one file, each stream's
    hash covering only its own. The lock file is removed by its holder; whoever locked a removed one (its inode
    no longer at the path) opens the path again."""
    path = staging / f"upload-{upload_id}.lock"
    busy = Aborted("another stream is writing this upload right now; resume when it ends")
    for _ in range(8):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            current = os.fstat(fd).st_ino == os.stat(path).st_ino
        except BlockingIOError:
            os.close(fd)
            raise busy from None
        except FileNotFoundError:
            current = False
        except BaseException:
            os.close(fd)
            raise
        if current:
            break
        os.close(fd)
    else:
        raise busy
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # still locked: a waiter that locks this inode sees it gone
        os.close(fd)


class StagingSweeper:
    """Removes staging files of uploads that will never finish: the device stopped mid-stream and its assignment
    was then timed out, canceled or closed with its round (its upload abandoned), or the assignment is gone.
    Bytes an assignment still waits for (reported, not yet uploaded) are kept, whatever their age: the device may
    resume. A file is removed only under its ``sole_writer`` lock, after reading the assignment again: a stream
    in progress (this process or another sharing the directory) keeps its file, and a stream that starts after
    the removal is refused by the store before it writes (its assignment no longer wants an upload). Every
    ``every`` (of the server's clock), from the first call on: a restarted server sweeps what it left."""

    def __init__(self, db: Database, staging: Path, clock: Clock, every: timedelta) -> None:
        self._db = db
        self._staging = staging
        self._clock = clock
        self._every = every
        self._due: datetime | None = None

    def run_once(self) -> int:
        """Sweep if due; how many files were removed."""
        now = self._clock.now()
        if self._due is not None and now < self._due:
            return 0
        self._due = now + self._every
        staged = sorted(p.name.removeprefix("upload-") for p in self._staging.glob("upload-*") if p.suffix != ".lock")
        removed = 0
        for start in range(0, len(staged), BATCH):
            batch = staged[start : start + BATCH]
            with self._db.reading() as s:
                awaited = AssignmentRepository(s).awaiting_upload(batch)
            removed += sum(self._remove(upload_id) for upload_id in batch if upload_id not in awaited)
        if removed:
            log.info("staging_swept", removed=removed, kept=len(staged) - removed)
        return removed

    def _remove(self, upload_id: str) -> bool:
        try:
            with sole_writer(self._staging, upload_id):
                with self._db.reading() as s:  # read again under the lock: only the store says what is awaited
                    if AssignmentRepository(s).awaiting_upload([upload_id]):
                        return False
                (self._staging / f"upload-{upload_id}").unlink(missing_ok=True)
                return True
        except Aborted:
            return False  # a stream is writing it: the next sweep looks again
