"""The staging directory: one writer per upload across every process that shares it (``sole_writer``), and the
sweep that removes staged bytes no upload will finish (``StagingSweeper``)."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

import structlog

from fedcompute.core.clock import Clock
from fedcompute.core.errors import Aborted
from fedcompute.core.files import lock_current
from fedcompute.store.assignments import AssignmentRepository
from fedcompute.store.blobs import PUT_PREFIX
from fedcompute.store.database import Database

log = structlog.get_logger("fedcompute.staging")
BATCH = 500  # staging files looked at per call (one read of their assignments)
STALE_PUT_S = 3600  # a blob's temporary file (``PUT_PREFIX``) this much older than now was left by a crash
_STAGED = re.compile(r"^upload-(asg_[A-Za-z0-9_-]+?)(?:\.lock)?$")  # the ids uploads.py accepts


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
        try:
            fd = lock_current(path, os.O_RDWR, blocking=False)
        except BlockingIOError:
            raise busy from None
        if fd is not None:
            break
    else:
        raise busy
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # still locked: a waiter that locks this inode sees it gone
        os.close(fd)


class StagingSweeper:
    """Removes staging files of uploads that will never finish: the device stopped mid-stream and its assignment
    was then timed out, canceled or closed with its round (its upload abandoned), or the assignment is gone; and
    lock files such uploads left (a writer killed while holding). Bytes an assignment still waits for (reported,
    not yet uploaded) are kept, whatever their age: the device may resume. Not awaited is for good: a staging
    file exists only once its assignment was LOCAL_COMPLETED, and nothing returns to that state, so one read per
    batch decides. A file is removed only under its ``sole_writer`` lock: a stream in progress (this process or
    another sharing the directory) keeps its file, and a stream that starts after the removal is refused by the
    store before it writes (its assignment no longer wants an upload). A pass starts at the first call and then every
    ``every`` (of the server's clock) after the last one finished; it works ``BATCH`` files per call (the loop
    calls again at once while it says it is busy), and an entry that cannot be removed is logged and skipped."""

    def __init__(self, db: Database, staging: Path, clock: Clock, every: timedelta) -> None:
        self._db = db
        self._staging = staging
        self._clock = clock
        self._every = every
        self._due: datetime | None = None  # None: a pass is due now (first call, or the last one failed)
        self._pending: list[str] = []  # upload ids this pass has still to look at
        self._removed = 0

    def run_once(self) -> int:
        """One batch of a pass, if a pass is due or under way: how many entries it looked at (0: nothing to do)."""
        if not self._pending:
            if self._due is not None and self._clock.now() < self._due:
                return 0
            self._pending, self._removed = self._staged(), self._stale_puts()
        batch = self._pending[:BATCH]
        if batch:
            with self._db.reading() as s:
                awaited = AssignmentRepository(s).awaiting_upload(batch)
            self._removed += sum(self._remove(upload_id) for upload_id in batch if upload_id not in awaited)
        self._pending = self._pending[BATCH:]  # only once looked at: a batch that failed is tried again
        if not self._pending:
            self._due = self._clock.now() + self._every
            if self._removed:
                log.info("staging_swept", removed=self._removed)
        return len(batch)

    def _staged(self) -> list[str]:
        """Upload ids with a staging or lock file here (regular files named as this server names them)."""
        try:
            entries = list(os.scandir(self._staging))
        except FileNotFoundError:
            return []
        ids = {m.group(1) for e in entries if (m := _STAGED.match(e.name)) and e.is_file(follow_symlinks=False)}
        return sorted(ids)

    def _stale_puts(self) -> int:
        """Remove the temporary files of blob writes a crash left (a write takes seconds; these are an hour old)."""
        removed, cutoff = 0, time.time() - STALE_PUT_S  # file times are the wall clock's
        try:
            entries = list(os.scandir(self._staging))
        except FileNotFoundError:
            return 0
        for entry in entries:
            try:
                if entry.name.startswith(PUT_PREFIX) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except OSError:  # gone meanwhile (another replica's sweep), or not ours to remove: the next pass
                continue
        return removed

    def _remove(self, upload_id: str) -> bool:
        """True if the upload's staged bytes were here and are now gone (its lock file goes with the lock)."""
        try:
            with sole_writer(self._staging, upload_id):
                try:
                    (self._staging / f"upload-{upload_id}").unlink()
                except FileNotFoundError:
                    return False  # only a lock file was left; or another replica's sweep was first
                return True
        except Aborted:
            return False  # a stream is writing it: the next pass looks again
        except OSError as exc:  # one entry this process cannot remove must not stop the sweep of the others
            log.warning("staging_sweep_skipped", upload_id=upload_id, error=str(exc))
            return False
