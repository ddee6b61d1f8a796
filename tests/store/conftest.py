"""The store's tests share one fixture: a migrated database on each backend (SQLite file, the run's Postgres)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fedcompute.store.database import Database


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    database.migrate()
    yield database
    database.dispose()
