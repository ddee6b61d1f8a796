"""One item ahead: work on the next item on a background thread while the caller handles the current one.

The aggregator worker chains two (hash the one after next, open the next, add the current one); the server's job
stream reads and verifies the next envelope while the current one is sent. Hashing (hashlib), HPKE
opening and the tensor adds release the GIL for most of their time, so the stages overlap. Each stage holds at
most two items (the one its caller holds and the one being worked on), so memory stays bounded whatever the
cohort; the next item is read from the source only when the caller asks for the next result.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def prefetched(items: Iterable[T], work: Callable[[T], R]) -> Generator[R, None, None]:
    """``work(item)`` for each item in order, run on one background thread one item ahead of the caller (with
    the caller's context variables, so log lines keep their request id). ``work``'s exceptions are raised here,
    in order; when the caller stops early, the item in flight is finished and nothing more is started."""
    with ThreadPoolExecutor(1, thread_name_prefix="fedcompute-open") as pool:
        pending: Future[R] | None = None
        try:
            for item in items:
                ahead = pool.submit(contextvars.copy_context().run, work, item)
                if pending is not None:
                    yield pending.result()
                pending = ahead
            if pending is not None:
                yield pending.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            if isinstance(items, Generator):  # a chained stage: stop it too, now rather than when collected
                items.close()
