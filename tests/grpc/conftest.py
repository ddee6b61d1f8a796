from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Harness, suite_settings


@pytest.fixture
def harness(request: pytest.FixtureRequest, database_url: str, tmp_path: Path) -> Iterator[Harness]:
    aggregator = request.node.get_closest_marker("aggregator") is not None
    h = Harness.start(suite_settings(tmp_path / "work", database_url, max_upload_bytes=64 * 1024), aggregator)
    yield h
    h.stop()
