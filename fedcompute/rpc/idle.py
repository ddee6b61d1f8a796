"""Cancelling request streams whose client has gone quiet.

The server's gRPC threads are few (``worker_threads``, 16 by default) and a client-streaming handler holds one for
as long as its stream is open, most of it waiting for the client's next message. Without a bound, sixteen streams
opened and left idle (a stalled network, or anyone at all: the handler waits before the first message, which
carries the token) held every thread, and every other call on the server waited behind them. ``IdleStreams``
watches such streams from one thread of its own and cancels one whose client sent nothing for ``idle_s`` while
its handler waited for it (the handler's own time, writing to disk say, never counts). The blocked read then
raises in the handler, which ends as it does for a broken stream, and the client sees CANCELLED.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import grpc
import structlog

log = structlog.get_logger("fedcompute.rpc")
T = TypeVar("T")


class _Watched:
    __slots__ = ("cancelled", "context", "waiting_since")

    def __init__(self, context: grpc.ServicerContext, now: float) -> None:
        self.context = context
        self.waiting_since = now  # when the handler began to wait for the client; inf while the handler works
        self.cancelled = False


class IdleStreams:
    def __init__(
        self, idle_s: float, on_cancel: Callable[[], object] | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._idle_s = idle_s
        self._on_cancel = on_cancel or (lambda: None)
        self._clock = clock
        self._watched: dict[int, _Watched] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextmanager
    def watching(self, context: grpc.ServicerContext) -> Iterator[Callable[[Iterator[T]], Iterator[T]]]:
        """Watch the call of ``context`` while the block runs (from the handler's start: the first message counts
        as any other); the block passes its request iterator through the callable it is given."""
        entry = _Watched(context, self._clock())
        with self._lock:
            self._watched[id(entry)] = entry
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="idle-streams", daemon=True)
                self._thread.start()
        try:
            yield lambda requests: self._timed(requests, entry)
        finally:
            with self._lock:
                del self._watched[id(entry)]

    def _timed(self, requests: Iterator[T], entry: _Watched) -> Iterator[T]:
        """The requests, timed. A cancelled stream's read ends either way, raising or as an end of stream (gRPC
        may see the cancel as the client's half-close first): both end the call as CANCELLED here, so that the
        handler never takes a stream cut short for one the client ended."""
        while True:
            entry.waiting_since = self._clock()
            try:
                request = next(requests)
            except StopIteration:
                self._if_cancelled(entry)
                return
            except grpc.RpcError:
                self._if_cancelled(entry)
                raise
            finally:
                entry.waiting_since = math.inf
            yield request

    def _if_cancelled(self, entry: _Watched) -> None:
        if entry.cancelled:  # raises: the call ends as CANCELLED (what the client was told)
            entry.context.abort(grpc.StatusCode.CANCELLED, f"nothing was sent for {self._idle_s:g} s")

    def _watch(self) -> None:
        while True:
            time.sleep(min(self._idle_s / 4, 1.0))
            now = self._clock()
            with self._lock:
                quiet = [e for e in self._watched.values() if not e.cancelled and now - e.waiting_since > self._idle_s]
                for entry in quiet:
                    entry.cancelled = True
            for entry in quiet:
                log.warning("stream_idle_cancelled", idle_s=self._idle_s, peer=entry.context.peer())
                self._on_cancel()
                entry.context.cancel()  # type: ignore[no-untyped-call]
