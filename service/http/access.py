"""What happens when a request finishes: its metrics, and its access line (Tornado's `log_function`).

Counting is done for every request; the access line can be sampled (ACCESS_LOG_SAMPLE) or
switched off (ACCESS_LOG=false) for very high loads, except that server errors (5xx) are
always written, since those are the lines someone will look for.

This runs once per request, so it is written for that: the counts go into the worker's plain
Python totals (flushed into the metric files by the worker, see service.telemetry.metrics), and the
access line is one dict, in its documented field order, serialised once (service.telemetry.logs).
"""

from __future__ import annotations

import datetime
import random
from bisect import bisect_left
from collections.abc import Callable
from typing import TYPE_CHECKING

from tornado.web import RequestHandler

from service.telemetry import logs, metrics

if TYPE_CHECKING:
    from service.handlers.base import ServiceHandler


# What a client chooses (path, User-Agent) is logged up to this many characters: a line must stay
# under PIPE_BUF (4,096 bytes) to be written whole when two workers write to one pipe at once.
MAX_LOGGED = 512


def request_observer(enabled: bool, sample: float, **fields: object) -> Callable[[RequestHandler], None]:
    """Tornado's log_function for one worker; `fields` (worker, pid) go on every access line."""
    write = logs.access_writer()
    info, warning, error = (logs.access_level_enabled(level) for level in ("info", "warning", "error"))
    writes_all = enabled and sample >= 1.0
    rows = metrics.HTTP_TOTALS.rows  # flushed into prometheus-client's values by the worker's Flusher
    new_row, bounds, methods = metrics.RequestTotals.new_row, metrics.LATENCY_BOUNDS, metrics.METHODS
    now, utc, chance = datetime.datetime.now, datetime.UTC, random.random

    def observe(any_handler: RequestHandler) -> None:
        handler: ServiceHandler = any_handler  # type: ignore[assignment]  # every route is ours
        request = handler.request
        status = handler.get_status()
        route = handler.route
        method = request.method
        duration = request.request_time()
        key = (method if method in methods else "other", route, status)
        row = rows.get(key)  # RequestTotals.add, inline
        if row is None:
            row = rows[key] = new_row()
        row[bisect_left(bounds, duration)] += 1
        row[-1] += duration
        if not (writes_all or status >= 500 or (enabled and chance() < sample)):
            return
        if status < 400:
            if not info:
                return
            level = "info"
        elif status < 500:
            if not warning:
                return
            level = "warning"
        else:
            if not error:
                return
            level = "error"
        agents = request.headers.get_list("User-Agent")  # no KeyError raised when a client sends none
        write({
            "logger": "access",
            **fields,
            "method": method,
            "path": request.path[:MAX_LOGGED],  # the same object when short: no copy
            "handler": route,
            "status": status,
            "duration_ms": round(duration * 1000.0, 3),
            "bytes": handler.response_bytes,
            "request_id": handler.request_id,
            "client_ip": request.remote_ip,
            "user_agent": (agents[0] if len(agents) == 1 else ",".join(agents))[:MAX_LOGGED],
            "event": "request",
            "level": level,
            "timestamp": now(utc),
        })

    return observe
