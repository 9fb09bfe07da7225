"""Structured logs: one JSON object per line on stdout, from our code and from Tornado's loggers.

Our own events go through structlog's native pipeline (cheap: no stdlib `LogRecord` per access
line); Tornado's loggers (`tornado.general`, `tornado.application`, ...) and anything else that
uses `logging` are routed through the same processors by `ProcessorFormatter`, so no plain-text
line ever reaches stdout. Per-process fields (`worker`, `pid`) are context variables bound once
after the fork, and so appear on every line that process writes.

This module is a leaf: everything may import it and it imports nothing from the service.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import sys
from typing import Any

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}


def _orjson_dumps(event: EventDict, **_: Any) -> bytes:
    return orjson.dumps(event, default=repr)


def _logger_name(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """Name the logger on every line, ours and Tornado's alike (`tornado.general`, `access`...)."""
    record = event.get("_record")
    event["logger"] = record.name if record is not None else event.pop("logger_name", None)
    return event


class LineBatcher:
    """A structlog logger that writes whole JSON lines, batched per event-loop iteration.

    One write(2) per access line is a large part of what an access log costs at 10k req/s.
    Inside a running event loop, lines are collected and written once the loop has finished
    the current iteration: at low load that is at once, under load one write carries the lines
    of every request the iteration served. Each write is whole lines of at most PIPE_BUF bytes
    (unless one line alone is longer), so lines of workers sharing one stdout pipe never
    interleave; only a line over PIPE_BUF can be split by another worker's write. Outside a loop (the
    supervisor, start-up) every line is written at once. What a SIGKILL can lose: the lines of
    the iteration it interrupts.
    """

    def __init__(self, fd: int = 1) -> None:
        self._fd = fd
        self._lines: list[bytes] = []
        self._size = 0
        self._scheduled = False

    def factory(self, *_: Any) -> LineBatcher:
        return self

    def msg(self, message: bytes) -> None:
        self._lines.append(message + b"\n")
        self._size += len(message) + 1
        if self._scheduled and self._size < _MAX_BATCH:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if self._size >= _MAX_BATCH:
            self.flush()
        else:
            self._scheduled = True
            loop.call_soon(self.flush)

    log = debug = info = warn = warning = error = critical = exception = fatal = msg

    def flush(self) -> None:
        lines, self._lines, self._size, self._scheduled = self._lines, [], 0, False
        chunk = bytearray()
        for line in lines:
            if chunk and len(chunk) + len(line) > select.PIPE_BUF:
                self._write(chunk)
                chunk.clear()
            chunk += line
        if chunk:
            self._write(chunk)

    def _write(self, data: bytes | bytearray) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._fd, view):]
            except InterruptedError:
                continue
            except OSError:  # stdout closed (the reader went away): drop, never crash a worker
                return


_MAX_BATCH = 64 * 1024
_BATCHER = LineBatcher()


def flush() -> None:
    """Write what is batched; a worker calls this before it exits."""
    _BATCHER.flush()
    sys.stdout.flush()


def configure(level: str = "info", fmt: str = "json") -> None:
    """Set up structlog and the stdlib bridge; called once per process (safe to repeat)."""
    numeric = _LEVELS[level]
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _logger_name,
    ]
    renderer: Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_dumps)
        final: list[Processor] = [structlog.processors.dict_tracebacks, renderer]
        logger_factory: Any = _BATCHER.factory
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
        final = [renderer]
        logger_factory = structlog.PrintLoggerFactory(sys.stdout)

    _access_processors[:] = [
        structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso", utc=True), renderer
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), *final],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=logger_factory,
        cache_logger_on_first_use=True,  # configure() runs before any line is written
    )

    stdlib_final: list[Processor] = [
        structlog.stdlib.ProcessorFormatter.remove_processors_meta,
        structlog.processors.dict_tracebacks if fmt == "json" else structlog.processors.format_exc_info,
        structlog.processors.JSONRenderer(serializer=lambda e, **_: orjson.dumps(e, default=repr).decode())
        if fmt == "json"
        else renderer,
    ]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=stdlib_final,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    logging.captureWarnings(True)


_access_processors: list[Processor] = []


def access_logger(**fields: Any) -> Any:
    """A logger for access lines only: the shortest pipeline that renders one.

    It carries its fields (worker, pid) itself instead of reading context variables, and skips
    the traceback and stack processors an access line never needs: at 10k lines a second each
    processor shows in the throughput. Call it after `configure`, in the process that logs.
    """
    factory = structlog.get_config()["logger_factory"]
    return structlog.wrap_logger(
        factory(),
        processors=list(_access_processors),
        wrapper_class=structlog.get_config()["wrapper_class"],
    ).bind(logger="access", **fields)


def bind_process(**fields: Any) -> None:
    """Fields that every line from this process carries (after a fork, rebind them)."""
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(**fields)


def get_logger(name: str) -> Any:
    """A lazy logger: safe to create at import time, before `configure` has run."""
    return structlog.get_logger(name, logger_name=name)
