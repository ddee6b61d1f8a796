"""The staging directory's writer lock: one writer per upload across every process that shares the directory."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedcompute.core.errors import Aborted


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
