"""The staging directory's writer lock (server/staging.py), played by real processes: a holder that is alive turns
another writer away, a holder killed with SIGKILL while holding leaves a lock file that the next writer simply
takes, and a writer that locked a lock file its holder removed meanwhile moves to the one now at the path. The
staging sweep never removes a file while a writer in another process holds it."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import pytest

from fedcompute.core.clock import FakeClock
from fedcompute.core.errors import Aborted
from fedcompute.server.staging import StagingSweeper, sole_writer
from fedcompute.store.database import Database

UPLOAD = "asg_test"


def _holder(directory: Path) -> subprocess.Popen[str]:
    """Another process (a replica) holding the upload's writer lock until it is killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from fedcompute.server.staging import sole_writer
        with sole_writer(Path({str(directory)!r}), {UPLOAD!r}):
            print("held", flush=True)
            time.sleep(120)
    """)
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "held"
    return process


def _locked_inodes() -> set[int]:
    return {
        int(fields[5].rsplit(":", 1)[1])
        for fields in (line.split() for line in Path("/proc/locks").read_text().splitlines())
        if fields[1:3] == ["FLOCK", "ADVISORY"]
    }


def test_a_live_holder_in_another_process_turns_a_second_writer_away(tmp_path: Path) -> None:
    holder = _holder(tmp_path)
    try:
        with pytest.raises(Aborted, match="another stream is writing this upload"), sole_writer(tmp_path, UPLOAD):
            pytest.fail("a second writer got the lock")
    finally:
        holder.kill()
        holder.wait()


def test_a_holder_killed_while_holding_leaves_a_lock_the_next_writer_takes_and_removes(tmp_path: Path) -> None:
    holder = _holder(tmp_path)
    lock = tmp_path / f"upload-{UPLOAD}.lock"
    assert lock.exists()
    os.kill(holder.pid, signal.SIGKILL)  # the worst moment: mid-stream, the lock file still on disk
    holder.wait()
    assert lock.exists()
    with sole_writer(tmp_path, UPLOAD):
        assert lock.stat().st_ino in _locked_inodes()
    assert not lock.exists()


def test_a_writer_that_locked_a_removed_lock_file_moves_to_the_one_at_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between this writer's open and its flock, the holder removes the file and a third writer creates a new one:
    the inode this writer locked is no longer at the path, so it must open the path again and lock that."""
    lock = tmp_path / f"upload-{UPLOAD}.lock"
    real_flock = fcntl.flock
    calls: list[int] = []

    def flock_after_the_holder_left(fd: int, operation: int) -> None:
        if not calls:
            lock.unlink()
            lock.touch()  # another writer's new lock file
        calls.append(fd)
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock_after_the_holder_left)
    with sole_writer(tmp_path, UPLOAD):
        assert len(calls) == 2
        assert lock.stat().st_ino in _locked_inodes()


def _sweeper(tmp_path: Path, clock: FakeClock) -> tuple[StagingSweeper, Path, Database]:
    """A sweeper over an empty store: no assignment awaits any upload."""
    db = Database(f"sqlite:///{tmp_path / 'store.db'}")
    db.migrate()
    staging = tmp_path / "tmp"
    staging.mkdir()
    return StagingSweeper(db, staging, clock, timedelta(seconds=60)), staging, db


def test_the_sweep_leaves_a_file_a_writer_holds_and_removes_it_once_no_one_does(tmp_path: Path) -> None:
    clock = FakeClock()
    sweeper, staging, db = _sweeper(tmp_path, clock)
    staged = staging / f"upload-{UPLOAD}"
    staged.write_bytes(b"half an envelope")
    holder = _holder(staging)  # a stream on another replica is writing it
    try:
        sweeper.run_once()
        assert staged.read_bytes() == b"half an envelope"
    finally:
        holder.kill()
        holder.wait()
    assert sweeper.run_once() == 0  # the next pass is due a minute after this one finished
    assert staged.exists()
    clock.advance(timedelta(seconds=60))
    sweeper.run_once()
    assert sorted(staging.iterdir()) == []  # the file and the lock file the killed holder left
    db.dispose()


def test_an_entry_the_sweep_cannot_remove_is_skipped_and_the_rest_swept(tmp_path: Path) -> None:
    sweeper, staging, db = _sweeper(tmp_path, FakeClock())
    (staging / "upload-asg_a").write_bytes(b"x")  # a lock file that is a directory: locking it fails
    (staging / "upload-asg_a.lock").mkdir()
    (staging / "upload-asg_b").write_bytes(b"x")
    (staging / "upload-asg_c.lock").write_bytes(b"")  # left by a writer killed while holding it
    (staging / "upload-asg_d").mkdir()  # not a file this server writes
    (staging / "upload-notes.txt").write_bytes(b"not an upload id")
    (staging / "tmpk2j3h4").write_bytes(b"a blob being stored")
    while sweeper.run_once():
        pass
    left = {p.name for p in staging.iterdir()}
    assert left == {"upload-asg_a", "upload-asg_a.lock", "upload-asg_d", "upload-notes.txt", "tmpk2j3h4"}
    db.dispose()


def test_the_sweep_removes_blob_writes_a_crash_left_and_keeps_recent_ones(tmp_path: Path) -> None:
    """A process killed inside ``LocalBlobStore.put`` leaves its temporary file in the staging directory; those
    matched no pattern the sweep knew and stayed for good (found by review, 2026-12-02). Now one an hour old goes;
    a write in progress (a fresh one) stays."""
    from fedcompute.store.blobs import PUT_PREFIX

    sweeper, staging, _ = _sweeper(tmp_path, FakeClock())
    left, writing = staging / f"{PUT_PREFIX}abc", staging / f"{PUT_PREFIX}def"
    left.write_bytes(b"half a blob")
    writing.write_bytes(b"a blob being written")
    old = time.time() - 2 * 3600
    os.utime(left, (old, old))
    sweeper.run_once()
    assert not left.exists()
    assert writing.exists()
