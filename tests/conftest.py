"""Shared fixtures: a real Postgres database per test run (dropped at the end) and SQLite files per test.

The Postgres server comes from FEDCOMPUTE_TEST_POSTGRES_URL (an admin URL), else the local server at
127.0.0.1:5432. Tests never skip Postgres silently: if it is unreachable they fail.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from fedcompute.core.logs import configure_logging

ADMIN_URL = os.environ.get("FEDCOMPUTE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
BACKENDS = ["sqlite", "postgres"]


def pytest_configure(config: pytest.Config) -> None:
    import logging

    configure_logging(json_lines=False, level=logging.WARNING)


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A database of our own on the Postgres server for this whole run; dropped afterwards."""
    name = f"fedcompute_test_{secrets.token_hex(6)}"
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def fresh_postgres(url: str) -> str:
    """Empty the run's database so the next test migrates from nothing."""
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    return url


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using this runs twice: on a SQLite file and on the run's Postgres database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'test.sqlite'}"
    return fresh_postgres(request.getfixturevalue("postgres_database"))
