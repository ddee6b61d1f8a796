"""Engine, migrations at start-up, and the unit of work (one transaction per service call)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, literal, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random

MIGRATIONS = Path(__file__).parent / "migrations"
T = TypeVar("T")
__all__ = ["Database", "Session"]


READ_ONLY = "fedcompute_read_only"


class Database:
    """Owns the engine; ``transaction()`` is the unit of work services open."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            self.engine: Engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})
            _sqlite_serializable_writes(self.engine)
        else:
            self.engine = create_engine(
                url, pool_size=10, max_overflow=20, pool_pre_ping=True, connect_args={"connect_timeout": 5}
            )
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def migrate(self) -> None:
        """Bring the schema to the latest Alembic revision."""
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        with self._sessions() as session, session.begin():
            yield session

    @contextmanager
    def soft_state(self) -> Iterator[Session]:
        """A write transaction whose commit does not wait for the WAL flush on Postgres (``synchronous_commit``
        off for it alone): for state a crash may lose without harm, such as a check-in's slot and assignment (both
        in the same transaction, so they vanish together; the device's report then gets NOT_FOUND and it checks in
        again). The round's row lock is released at commit, not after an fsync, so check-ins on one task no longer
        queue behind each other's disk flush. SQLite: the same as ``transaction()``."""
        with self._sessions() as session, session.begin():
            if not self.is_sqlite:
                session.execute(text("SET LOCAL synchronous_commit TO OFF"))
            yield session

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
            retry=retry_if_exception(_conflict), stop=stop_after_attempt(5), wait=wait_random(0.005, 0.05),
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


def _conflict(exc: BaseException) -> bool:
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
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        deferred = connection.get_execution_options().get(READ_ONLY)
        connection.exec_driver_sql("BEGIN" if deferred else "BEGIN IMMEDIATE")
