"""The real fsync calls a test's code makes, watched: durability claims are checked against them."""

from __future__ import annotations

import os

import pytest


def watch_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every real fsync from now on, by the path its descriptor names (directories included; Linux's /proc)."""
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced
