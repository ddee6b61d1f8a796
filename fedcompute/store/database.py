"""Engine, migrations at start-up, and the unit of work (one transaction per service call)."""

from __future__ import annotations

import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, literal, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random

MIGRATIONS = Path(__file__).parent / "migrations"
T = TypeVar("T")
__all__ = ["Database", "Session"]


READ_ONLY = "fedcompute_read_only"
BUSY_TIMEOUT_S = 60
# Connections kept open: at least a server's gRPC threads (24 by default), so that a busy server does not open and
# close an overflow connection per transaction; the overflow opens more for bursts beyond that
POOL_SIZE = 28


class Database:
    """Owns the engine; ``transaction()`` is the unit of work services open."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        # SQLite has one writer: this process's write transactions queue on a lock of ours (first come, first
        # served) instead of in SQLite's busy handler, which sleeps in growing steps and starves late comers
        self._writers: threading.RLock | None = threading.RLock() if self.is_sqlite else None
        self._soft_engine: Engine | None = None  # makes soft_statement's connections (see _soft_connection)
        self._soft_making = threading.Lock()
        self._soft_idle: queue.SimpleQueue[tuple[Any, Any]] = queue.SimpleQueue()
        self._wal: str | None = None
        if self.is_sqlite:
            self.engine: Engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})
            _sqlite_serializable_writes(self.engine)
            path = self.engine.url.database
            self._wal = f"{path}-wal" if path and path != ":memory:" and not path.startswith("file:") else None
        else:
            self.engine = create_engine(
                url,
                pool_size=POOL_SIZE,
                max_overflow=POOL_SIZE,
                pool_pre_ping=True,
                connect_args={"connect_timeout": 5},
            )
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def migrate(self) -> None:
        """Bring the schema to the latest Alembic revision."""
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
        self._sync_wal()

    def _writer(self) -> AbstractContextManager[object]:
        return _held(self._writers) if self._writers is not None else nullcontext()

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A durable write transaction: when the block returns, its commit is on disk. On SQLite the commit
        itself does not sync (``synchronous=NORMAL``); this thread fsyncs the WAL file once the write lock is
        released, so the next writer does not wait for this one's disk flush and concurrent commits share their
        flushes (group commit). Until that fsync returns nothing is reported to the caller: the same guarantee as
        ``synchronous=FULL``, whose fsync runs under the lock."""
        with self._writer(), self._sessions() as session, session.begin():
            yield session
        self._sync_wal()

    def _sync_wal(self) -> None:
        """SQLite: flush the WAL file to disk (the frames of every commit so far). No WAL file means none is
        pending: SQLite removes it only after checkpointing it into the database file and syncing that."""
        if self._wal is None:
            return
        try:
            fd = os.open(self._wal, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @contextmanager
    def soft_state(self) -> Iterator[Session]:
        """A write transaction whose commit does not wait for the WAL flush on Postgres (``synchronous_commit``
        off for it alone): for state a crash may lose without harm, such as a check-in's slot and assignment (both
        in the same transaction, so they vanish together; the device's report then gets NOT_FOUND and it checks in
        again). The round's row lock is released at commit, not after an fsync, so check-ins on one task no longer
        queue behind each other's disk flush. SQLite: ``synchronous=NORMAL`` and no fsync after it (its WAL frames
        reach the disk with the next durable commit or checkpoint; a power cut may lose it, a crash of the process
        cannot)."""
        with self._writer(), self._sessions() as session, session.begin():
            if not self.is_sqlite:
                session.execute(text("SET LOCAL synchronous_commit TO OFF"))
            yield session

    def soft_statement(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        """Postgres only: run one statement (psycopg's ``%(name)s`` parameters) in autocommit with
        ``synchronous_commit`` off and return its rows. For soft state written by one statement: its own
        transaction, so the rows it locks are held only while the server runs it, never while this process waits
        for its GIL between statements. Straight on the driver's connections, kept in a pool of their own (a
        C queue: SQLAlchemy's statement machinery and pool checkout cost several times the driver's own CPU on
        this hot path), without a ping per checkout: a connection found dead is thrown away with every idle one
        (most often the server restarted: they are as dead) and the statement run once more on a fresh one (a
        statement the server had committed before the connection broke then fails its retry on its own unique
        keys rather than applying twice)."""
        if self.is_sqlite:
            raise RuntimeError("soft_statement is for Postgres; SQLite writes go through soft_state()")
        for attempt in (1, 2):
            pooled, connection = self._soft_connection()
            try:
                with connection.cursor() as cursor:
                    cursor.execute(sql, params)
                    rows = [tuple(row) for row in cursor.fetchall()]
            except Exception:
                if not connection.broken:
                    self._soft_idle.put((pooled, connection))
                    raise
                pooled.close()  # detached: closed for good
                self._drop_idle()
                if attempt == 2:
                    raise
                continue
            self._soft_idle.put((pooled, connection))
            return rows
        raise AssertionError("unreachable")  # pragma: no cover

    def _soft_connection(self) -> tuple[Any, Any]:
        """An idle autocommit connection of ``soft_statement``'s own, or a new one (made by SQLAlchemy from the
        same URL, then detached from its pool: this queue keeps at most as many as threads ran statements at
        once, and ``dispose`` closes them): (SQLAlchemy's wrapper, the driver's connection)."""
        try:
            return self._soft_idle.get_nowait()
        except queue.Empty:
            pass
        if self._soft_engine is None:
            with self._soft_making:
                if self._soft_engine is None:
                    self._soft_engine = create_engine(
                        self.url, poolclass=NullPool, isolation_level="AUTOCOMMIT",
                        connect_args={"connect_timeout": 5, "options": "-c synchronous_commit=off"},
                    )  # fmt: skip
        pooled = self._soft_engine.raw_connection()
        driver = pooled.driver_connection
        pooled.detach()
        return pooled, driver

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A transaction that only reads: on SQLite a deferred one, which takes no write lock (WAL readers never
        wait for writers); on Postgres the same as ``transaction()``. Writing in it is a bug."""
        with self._sessions() as session, session.begin():
            session.connection(execution_options={READ_ONLY: True})
            yield session

    def run(self, work: Callable[[Session], T]) -> T:
        """``work`` in one transaction, re-run from the start when Postgres aborts it for a deadlock or a
        serialization failure (a few times, with jitter): such a conflict is this service's to resolve, never
        the caller's. ``work`` must only touch the database (its effects are rolled back with each attempt)."""
        for attempt in Retrying(
            retry=retry_if_exception(is_conflict), stop=stop_after_attempt(5), wait=wait_random(0.005, 0.05),
            reraise=True,
        ):  # fmt: skip
            with attempt, self.transaction() as session:
                return work(session)
        raise AssertionError("unreachable")  # pragma: no cover

    def ping(self) -> None:
        """Raise unless the database answers (health checks)."""
        with self.engine.connect() as connection:
            connection.execute(select(literal(1)))

    def dispose(self) -> None:
        self.engine.dispose()
        self._drop_idle()

    def _drop_idle(self) -> None:
        """Close ``soft_statement``'s idle connections (the ones in use go back to the queue as they finish)."""
        while True:
            try:
                self._soft_idle.get_nowait()[0].close()
            except queue.Empty:
                break


@contextmanager
def _held(lock: threading.RLock) -> Iterator[None]:
    """The lock, or after SQLite's own busy timeout (60 s) the error SQLite would have raised."""
    if not lock.acquire(timeout=BUSY_TIMEOUT_S):
        raise sqlite3.OperationalError("database is locked (another write transaction held it for 60 s)")
    try:
        yield
    finally:
        lock.release()


def is_conflict(exc: BaseException) -> bool:
    """A deadlock (40P01) or serialization failure (40001): retrying the whole transaction resolves it."""
    code = getattr(getattr(exc, "orig", None), "sqlstate", None)
    return isinstance(exc, DBAPIError) and code in ("40P01", "40001")


def _sqlite_serializable_writes(engine: Engine) -> None:
    """SQLite: WAL, foreign keys, and BEGIN IMMEDIATE so concurrent writers queue instead of failing."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=60000")
        # commits do not sync under the write lock; Database.transaction() fsyncs the WAL after releasing it
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        deferred = connection.get_execution_options().get(READ_ONLY)
        connection.exec_driver_sql("BEGIN" if deferred else "BEGIN IMMEDIATE")
