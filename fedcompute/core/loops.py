"""Background loops (collector-side workers, model updater, aggregator): a stoppable polling thread."""

from __future__ import annotations

import threading
from collections.abc import Callable

import structlog

log = structlog.get_logger("fedcompute.loops")
MAX_BACKOFF_S = 30.0


class PollingLoop:
    """Calls ``step`` until it reports no work, then sleeps ``interval_s``; a step that raises is logged with its
    traceback and retried after an exponential backoff (capped); ``stop()`` ends it promptly."""

    def __init__(self, name: str, step: Callable[[], bool | int], interval_s: float) -> None:
        self._name = name
        self._step = step
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

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
                self._stop.wait(self._interval)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
