"""Injected seams for time, identifiers and randomness (nothing else calls ``datetime.now`` or ``uuid4``)."""

from __future__ import annotations

import secrets
import threading
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    """Tells the current time (timezone-aware, UTC)."""

    def now(self) -> datetime: ...


class SystemClock:
    """The real wall clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)


class FakeClock:
    """A clock tests move by hand."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 1, tzinfo=UTC)
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, delta: timedelta) -> None:
        with self._lock:
            self._now += delta


class IdGenerator(Protocol):
    """Makes unguessable identifiers with a readable prefix."""

    def new_id(self, prefix: str) -> str: ...


class RandomIds:
    """Identifiers from the OS CSPRNG: ``prefix_`` followed by 22 url-safe characters (128 bits)."""

    def new_id(self, prefix: str) -> str:
        return f"{prefix}_{secrets.token_urlsafe(16)}"


def to_unix_ms(moment: datetime) -> int:
    """Milliseconds since the epoch of an aware datetime."""
    return int(moment.timestamp() * 1000)


def as_utc(moment: datetime) -> datetime:
    """Treat a naive datetime (as SQLite returns them) as UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
