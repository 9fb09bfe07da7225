"""Structured logs: one JSON object per line on stdout, from our code and from Tornado's loggers.

Our own events go through structlog's native pipeline (cheap: no stdlib `LogRecord` per access
line); Tornado's loggers (`tornado.general`, `tornado.application`, ...) and anything else that
uses `logging` are routed through the same processors by `ProcessorFormatter`, so no plain-text
line ever reaches stdout. Per-process fields (`worker`, `pid`) are context variables bound once
after the fork, and so appear on every line that process writes; the request id is one context
variable of its own (`bind_request`), set once per request and added to every line logged while
that request is handled.

Access lines, one per request, skip structlog altogether (`access_writer`): the access observer
builds the whole line as a dict and it is serialised by one `orjson.dumps`, same fields, order
and levels as a structlog line would have, and batched like every other line.

This module is a leaf: everything may import it and it imports nothing from the service.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import select
import sys
from collections.abc import Callable
from typing import Any

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}


def _orjson_dumps(event: EventDict, **_: Any) -> bytes:
    return orjson.dumps(event, default=repr)


_REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


def bind_request(request_id: str) -> None:
    """The id of the request being handled, for every line logged while it is (one set per request).

    Tornado runs each request's handler in a task of its own, which works on a copy of the
    context: the id stays with that request and is gone when it ends.
    """
    _REQUEST_ID.set(request_id)


def _request_id(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    request_id = _REQUEST_ID.get()
    if request_id is not None:
        event.setdefault("request_id", request_id)
    return event


MAX_STRING = 1024  # characters of any one string field; see _cap_strings


def _cap_strings(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """Cut any string field past MAX_STRING characters. A line over PIPE_BUF can be split by
    another worker's write to the same pipe, and what a client sent ends up in some lines
    (Tornado's "Malformed HTTP message" quotes it): a 60 kB header broke 24 of 300 lines."""
    for key, value in event.items():
        if isinstance(value, str) and len(value) > MAX_STRING:
            event[key] = value[:MAX_STRING] + f"... ({len(value) - MAX_STRING} more characters)"
    return event


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


# Tracebacks as data, without each frame's local variables: those may hold secrets (a token, a
# password in a settings object) and make a line far longer than PIPE_BUF.
_TRACEBACKS = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)


def configure(level: str = "info", fmt: str = "json") -> None:
    """Set up structlog and the stdlib bridge; called once per process (safe to repeat)."""
    numeric = _LEVELS[level]
    _access.update(level=numeric, json=fmt == "json")
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        _request_id,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _logger_name,
        _cap_strings,
    ]
    renderer: Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_dumps)
        final: list[Processor] = [_TRACEBACKS, renderer]
        logger_factory: Any = _BATCHER.factory
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
        final = [renderer]
        logger_factory = structlog.PrintLoggerFactory(sys.stdout)

    _access["renderer"] = renderer
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), *final],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=logger_factory,
        cache_logger_on_first_use=True,  # configure() runs before any line is written
    )

    stdlib_final: list[Processor] = [
        structlog.stdlib.ProcessorFormatter.remove_processors_meta,
        _TRACEBACKS if fmt == "json" else structlog.processors.format_exc_info,
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


_access: dict[str, Any] = {"level": logging.INFO, "json": True, "renderer": None}  # set by `configure`

AccessWriter = Callable[[dict[str, Any]], None]


def access_level_enabled(level: str) -> bool:
    """Whether LOG_LEVEL lets an access line of `level` (info, warning, error) through."""
    return bool(_LEVELS[level] >= _access["level"])


def access_writer() -> AccessWriter:
    """Writes one access line: a dict in its final order, with `level` and a UTC `timestamp` datetime.

    With JSON logs, one `orjson.dumps` (its `OPT_UTC_Z` writes the timestamp exactly as
    structlog's ISO stamper does, `2026-11-26T12:08:43.790705Z`) into the batched stdout; an
    access line is a fixed set of plain fields, so structlog's processor chain, which cost
    about as much as the rest of the request's logging, has nothing to add. With console logs,
    structlog's console renderer, as for every other line. The caller checks the level first
    (`access_level_enabled`). Call it after `configure`, in the process that logs.
    """
    if _access["json"]:
        batcher, dumps, option = _BATCHER, orjson.dumps, orjson.OPT_UTC_Z

        def write_json(event: dict[str, Any]) -> None:
            batcher.msg(dumps(event, default=repr, option=option))

        return write_json
    renderer = _access["renderer"]

    def write_console(event: dict[str, Any]) -> None:
        event = {**event, "timestamp": event["timestamp"].isoformat().replace("+00:00", "Z")}
        print(renderer(None, event["level"], event), file=sys.stdout, flush=True)

    return write_console


def bind_process(**fields: Any) -> None:
    """Fields that every line from this process carries (after a fork, rebind them)."""
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(**fields)


def get_logger(name: str) -> Any:
    """A lazy logger: safe to create at import time, before `configure` has run."""
    return structlog.get_logger(name, logger_name=name)
