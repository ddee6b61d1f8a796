"""Items ahead: work on the next items on background threads while the caller handles the current one.

The aggregator worker chains two (hash the next items on two threads, open the next, add the current one); the
server's job stream reads the next envelope while the current one is sent. Hashing (hashlib), HPKE opening and the
tensor adds release the GIL for most of their time, so the stages overlap. A stage holds at most ``ahead`` + 1
items (the one its caller holds and those being worked on), so memory stays bounded whatever the cohort; the
next item is read from the source only when the caller asks for the next result.
"""

from __future__ import annotations

import contextvars
from collections import deque
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def prefetched(items: Iterable[T], work: Callable[[T], R], ahead: int = 1) -> Generator[R, None, None]:
    """``work(item)`` for each item, results in order, run on ``ahead`` background threads that many items ahead
    of the caller (with the caller's context variables, so log lines keep their request id). ``work``'s exceptions
    are raised here, in order; when the caller stops early, the items in flight are finished and nothing more is
    started."""
    with ThreadPoolExecutor(ahead, thread_name_prefix="fedcompute-open") as pool:
        pending: deque[Future[R]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(contextvars.copy_context().run, work, item))
                if len(pending) > ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            if isinstance(items, Generator):  # a chained stage: stop it too, now rather than when collected
                items.close()
