"""Cancelling device streams that have stopped moving, and serving only so many at once.

The server's gRPC threads are few (``worker_threads``, 24 by default) and a streaming handler holds one for as long
as its stream is open. An upload's handler waits for the device's next message (from the start: the first carries
the token); a download's waits while gRPC sends a chunk, which ends only as the device reads it (HTTP/2 flow
control). Without a bound, as many streams as threads opened and left still (a stalled network, or anyone at all:
neither needs a credential to hold a thread) held every thread, and every other call on the server waited behind
them. ``IdleStreams`` watches such streams from one thread of its own and cancels one that has waited on its device
for ``idle_s`` (the handler's own time, writing or reading the disk say, never counts). A blocked read then raises
in the handler, which ends as it does for a broken stream; a blocked send ends; the device sees CANCELLED. And it
serves at most ``max_open`` such streams at once, fewer than the threads: one more is refused at its start, so a
client that keeps reopening quiet streams can take the stream slots, never the threads check-ins and reports need.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import grpc
import structlog

from fedcompute.core.errors import RateLimited

log = structlog.get_logger("fedcompute.rpc")
T = TypeVar("T")


class Watched:
    """One watched call: ``received`` and ``sent`` pass its requests or responses on, timing the waits."""

    __slots__ = ("_streams", "cancelled", "context", "waiting_since")

    def __init__(self, streams: IdleStreams, context: grpc.ServicerContext, now: float) -> None:
        self._streams = streams
        self.context = context
        self.waiting_since = now  # when the handler began to wait for the device; inf while the handler works
        self.cancelled = False

    def received(self, requests: Iterator[T]) -> Iterator[T]:
        """The requests, each wait for the next one timed. A cancelled stream's read ends either way, raising or
        as an end of stream (gRPC may see the cancel as the client's half-close first): both end the call as
        CANCELLED here, so that the handler never takes a stream cut short for one the device ended."""
        while True:
            self.waiting_since = self._streams.clock()
            try:
                request = next(requests)
            except StopIteration:
                self._if_cancelled()
                return
            except grpc.RpcError:
                self._if_cancelled()
                raise
            finally:
                self.waiting_since = math.inf
            yield request

    def sent(self, responses: Iterator[T]) -> Iterator[T]:
        """The responses, each send timed: from handing one to gRPC until gRPC asks for the next (its send ends
        once the device has read enough of it)."""
        for response in responses:
            self.waiting_since = self._streams.clock()
            yield response
            self.waiting_since = math.inf

    def _if_cancelled(self) -> None:
        if self.cancelled:  # raises: the call ends as CANCELLED (what the device was told)
            self.context.abort(grpc.StatusCode.CANCELLED, f"nothing moved for {self._streams.idle_s:g} s")


class IdleStreams:
    def __init__(
        self,
        idle_s: float,
        max_open: int = 1 << 30,
        on_cancel: Callable[[str], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``max_open``: the most calls watched at once; one more is refused at its start (RESOURCE_EXHAUSTED, a
        retry pushback), so that device streams never take the threads unary calls need. ``on_cancel``: called
        with the method's name for each call cancelled (a metric)."""
        self.idle_s = idle_s
        self._max_open = max_open
        self.clock = clock
        self._on_cancel = on_cancel or (lambda method: None)
        self._watched: dict[int, tuple[Watched, str]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextmanager
    def watching(self, context: grpc.ServicerContext, method: str, waiting: bool = True) -> Iterator[Watched]:
        """Watch the call of ``context`` while the block runs: the block passes its requests through ``received``
        or its responses through ``sent``. ``waiting``: the handler waits on its device from the start (an
        upload's first message); False (a download): its own work comes first, and its first send starts the
        clock."""
        entry = Watched(self, context, self.clock() if waiting else math.inf)
        with self._lock:
            if len(self._watched) >= self._max_open:
                raise RateLimited(
                    f"this server is serving its most device streams at once ({self._max_open}); retry shortly",
                    random.uniform(0.5, 2.0),
                )
            self._watched[id(entry)] = (entry, method)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="idle-streams", daemon=True)
                self._thread.start()
        try:
            yield entry
        finally:
            with self._lock:
                del self._watched[id(entry)]

    def _watch(self) -> None:
        while True:
            time.sleep(min(self.idle_s / 4, 1.0))
            now = self.clock()
            with self._lock:
                quiet = [
                    (entry, method)
                    for entry, method in self._watched.values()
                    if not entry.cancelled and now - entry.waiting_since > self.idle_s
                ]
                for entry, _ in quiet:
                    entry.cancelled = True
            for entry, method in quiet:
                try:  # one call's failure to cancel (or to be logged) never stops the watching of the others
                    peer = entry.context.peer()  # before the cancel: gRPC forgets it then
                    entry.context.cancel()  # type: ignore[no-untyped-call]
                    self._on_cancel(method)
                    log.warning("stream_idle_cancelled", method=method, idle_s=self.idle_s, peer=peer)
                except Exception:
                    log.exception("stream_idle_cancel_failed", method=method)
