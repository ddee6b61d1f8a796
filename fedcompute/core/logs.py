"""structlog, configured once per process by ``main()``: JSON lines for services, console for the CLI."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TextIO, cast

import structlog


def _installed_version() -> str:
    try:
        return version("fedcompute")
    except PackageNotFoundError:
        return "0+unknown"


VERSION = _installed_version()


class _CurrentStderr:
    """Whatever ``sys.stderr`` is when a line is written (a captured or replaced stream may be closed later)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


class _Stamp:
    """Puts the component, the process id and the version on every line."""

    def __init__(self, component: str) -> None:
        self._fields = {"component": component, "version": VERSION}

    def __call__(self, _logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event.update(self._fields)
        event["process"] = os.getpid()  # read per line: a forked child reports its own
        return event


def configure_logging(json_lines: bool, level: int | str = logging.INFO, component: str = "cli") -> None:
    """Once per process. Every line carries the component, process and version; lines logged while handling an
    RPC or a job also carry its ``request_id`` (structlog's context variables)."""
    if isinstance(level, str):
        level = logging.getLevelNamesMapping()[level]
    processors: list[structlog.typing.Processor] = [
        _Stamp(component),
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if json_lines
        else structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback)
    )
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # one write() per line (print() makes two), so processes sharing a stderr never interleave inside a line;
        # stderr, because stdout is a command's own output
        logger_factory=structlog.WriteLoggerFactory(file=cast(TextIO, _CurrentStderr())),
        cache_logger_on_first_use=True,
    )
