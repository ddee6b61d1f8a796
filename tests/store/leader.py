"""Group-commit tests: callers that queue up behind a leader busy writing, then are written as one batch."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from fedcompute.store.groupcommit import GroupCommit


def as_one_batch(group: GroupCommit[Any, Any], calls: list[Callable[[], object]]) -> None:
    """Hold the group's writer (a leader busy writing), start every call on its own thread, wait until all have
    queued, release: the next leader writes them as one batch. Returns when every call has returned."""
    group._writing.acquire()
    threads = [threading.Thread(target=call) for call in calls]
    for t in threads:
        t.start()
    while len(group._queued) < len(calls):
        threading.Event().wait(0.005)
    group._writing.release()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive()
