from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Harness, suite_settings


@pytest.fixture
def harness(database_url: str, tmp_path: Path) -> Iterator[Harness]:
    h = Harness.start(suite_settings(tmp_path / "work", database_url, max_upload_bytes=64 * 1024))
    yield h
    h.stop()
