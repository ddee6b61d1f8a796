"""Background loops (collector-side workers, model updater, aggregator): a stoppable polling thread."""

from __future__ import annotations

import threading
from collections.abc import Callable

import structlog

log = structlog.get_logger("fedcompute.loops")
MAX_BACKOFF_S = 30.0


class PollingLoop:
    """Calls ``step`` until it reports no work, then sleeps ``interval_s`` or until ``poke()`` says there may be
    work (something in the same process made some); a step that raises is logged with its traceback and retried
    after an exponential backoff (capped); ``stop()`` ends it promptly."""

    def __init__(self, name: str, step: Callable[[], bool | int], interval_s: float) -> None:
        self._name = name
        self._step = step
        self._interval = interval_s
        self._stop = threading.Event()
        self._poked = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def name(self) -> str:
        return self._name

    def start(self) -> PollingLoop:
        self._thread.start()
        return self

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                busy = self._step()
            except Exception:
                failures += 1
                backoff = min(self._interval * 2 ** min(failures - 1, 10), MAX_BACKOFF_S)
                log.exception("loop_step_failed", loop=self._name, failures=failures, backoff_s=backoff)
                self._stop.wait(backoff)  # a failing dependency is not hammered at the poll interval
                continue
            failures = 0
            if not busy:
                self._poked.wait(self._interval)
                self._poked.clear()  # a poke from now on is for work the next step may not see yet: it runs again

    def poke(self) -> None:
        """Run the next step now rather than at the end of the interval (no effect on a failure's backoff)."""
        self._poked.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._poked.set()
        if self._thread.is_alive():
            self._thread.join(timeout)


class Listeners:
    """What to call when something happened in this process that others may be waiting for (a task created, a
    round closed, a job done): each call runs every callback added so far, in order."""

    def __init__(self, *callbacks: Callable[[], object]) -> None:
        self._callbacks = list(callbacks)

    def add(self, callback: Callable[[], object]) -> None:
        self._callbacks.append(callback)

    def __call__(self) -> None:
        for callback in list(self._callbacks):
            callback()
