"""SQLite durability as Database promises it: a transaction() has fsynced the WAL (after releasing the write
lock, so writers do not queue behind each other's flush) before it returns to its caller; soft_state() does
not wait for the disk. Observed through the real fsync calls on the real WAL file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import text

from fedcompute.store.database import Database


def test_a_durable_commit_fsyncs_the_wal_after_the_write_lock_and_a_soft_one_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = Database(f"sqlite:///{tmp_path / 'd.sqlite'}")
    db.migrate()
    wal = str(tmp_path / "d.sqlite-wal")
    synced: list[tuple[str, bool]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}")
        locked = db._writers is not None and db._writers._is_owned()  # type: ignore[attr-defined]
        synced.append((name, locked))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with db.transaction() as s:
        s.execute(text("CREATE TABLE t (x INTEGER)"))
        s.execute(text("INSERT INTO t VALUES (1)"))
        assert synced == []  # nothing flushed while the transaction (and the lock) is held
    assert synced == [(wal, False)]  # flushed once, after the lock was released, before returning
    with db.soft_state() as s:
        s.execute(text("INSERT INTO t VALUES (2)"))
    assert synced == [(wal, False)]  # soft state: no flush of its own
    with db.reading() as s:
        assert s.execute(text("SELECT count(*) FROM t")).scalar() == 2
    db.dispose()
