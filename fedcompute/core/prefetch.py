"""Items ahead: work on the next items on background threads while the caller handles the current one.

The aggregator worker runs one stage (read, hash, check and open the next items on two threads, three ahead, while
the caller adds the current one); the server's job stream reads the next envelope while the current one is sent.
Hashing (hashlib), HPKE opening and the tensor adds release the GIL for most of their time, so the stages overlap.
A stage holds at most ``ahead`` + 2 items (the result its caller still holds while it asks for the next one, and
``ahead`` + 1 being worked on or waiting for a thread), so memory stays bounded whatever the cohort; the next item
is read from the source only when the caller asks for the next result. Items start in order (the pool's queue is
first in, first out): an item that is being worked on was started after every item before it.
"""

from __future__ import annotations

import contextvars
from collections import deque
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def prefetched(
    items: Iterable[T], work: Callable[[T], R], ahead: int = 1, threads: int | None = None
) -> Generator[R, None, None]:
    """``work(item)`` for each item, results in order, ``ahead`` items ahead of the caller on ``threads``
    background threads (default ``ahead``; fewer than ``ahead``: the rest wait in the pool's queue, so a thread
    that finishes finds its next item at once), with the caller's context variables, so log lines keep their
    request id. ``work``'s exceptions are raised here, in order; when the caller stops early, the items already
    handed to the threads (at most ``ahead``) are finished, none cancelled, and nothing more is started. None is
    cancelled because work may wait on the items before it (the aggregator's checks take turns in stream order):
    the pool's own cancelling takes queued items while a thread may take the next one, which would then wait for a
    cancelled item forever. Work that should not be done after a stop checks a flag of its own (``Opener``)."""
    if threads is not None and not 1 <= threads <= ahead:
        raise ValueError(f"threads must be in [1, ahead ({ahead})], got {threads}")
    with ThreadPoolExecutor(threads or ahead, thread_name_prefix="fedcompute-open") as pool:
        pending: deque[Future[R]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(contextvars.copy_context().run, work, item))
                if len(pending) > ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            pool.shutdown(wait=True)
            if isinstance(items, Generator):  # a chained stage: stop it too, now rather than when collected
                items.close()
