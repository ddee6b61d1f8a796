"""rpc.idle: what counts as a quiet stream. The real gRPC path (cancel, the device told CANCELLED, the thread
freed, the bytes kept) is tests/grpc/test_upload.py's; here a stand-in context records the cancel, so that the
timing rule is tested alone: only the time the handler waits for the client counts, never its own."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from fedcompute.rpc.idle import IdleStreams


class _Call:
    """What ``IdleStreams`` uses of a servicer context: its peer, cancel and abort."""

    def __init__(self, arrivals: queue.Queue[bytes | None]) -> None:
        self.cancelled = threading.Event()
        self._arrivals = arrivals

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def cancel(self) -> None:
        self.cancelled.set()
        self._arrivals.put(None)  # as gRPC does: the blocked read ends

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise RuntimeError(f"aborted {code.name}: {details}")


def _requests(arrivals: queue.Queue[bytes | None]) -> Iterator[bytes]:
    while (item := arrivals.get()) is not None:
        yield item


def test_a_handler_busy_for_longer_than_the_limit_is_not_cancelled_but_a_quiet_client_is() -> None:
    arrivals: queue.Queue[bytes | None] = queue.Queue()
    call = _Call(arrivals)
    cancels: list[str] = []
    streams = IdleStreams(0.2, on_cancel=cancels.append)
    arrivals.put(b"first")
    with streams.watching(call, "Write") as watched:  # type: ignore[arg-type]
        requests = watched.received(_requests(arrivals))
        assert next(requests) == b"first"
        time.sleep(0.6)  # the handler's own work (a disk write, say): three times the limit
        assert not call.cancelled.is_set()
        arrivals.put(b"second")
        assert next(requests) == b"second"
        with pytest.raises(RuntimeError, match=r"aborted CANCELLED: nothing moved for 0\.2 s"):
            next(requests)  # the client sends nothing more: cancelled, and the read ends as CANCELLED
    assert call.cancelled.is_set()
    assert cancels == ["Write"]


def test_settings_refuse_a_stream_limit_that_leaves_no_thread_for_unary_calls() -> None:
    from pydantic import ValidationError

    from fedcompute.core.settings import Settings

    assert Settings(worker_threads=24).resolved_device_streams_max() == 18
    assert Settings(worker_threads=4).resolved_device_streams_max() == 2
    assert Settings(worker_threads=4, device_streams_max=3).resolved_device_streams_max() == 3
    with pytest.raises(ValidationError, match="must be < worker_threads"):
        Settings(worker_threads=4, device_streams_max=4)
