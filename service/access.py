"""What happens when a request finishes: its metrics, and its access line (Tornado's `log_function`).

Counting is done for every request; the access line can be sampled (ACCESS_LOG_SAMPLE) or
switched off (ACCESS_LOG=false) for very high loads, except that server errors (5xx) are
always written, since those are the lines someone will look for.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import cast

from prometheus_client import Counter, Histogram
from tornado.web import RequestHandler

from service import logs, metrics
from service.handlers.base import ServiceHandler


def request_observer(enabled: bool, sample: float, **fields: object) -> Callable[[RequestHandler], None]:
    """Tornado's log_function for one worker; `fields` (worker, pid) go on every access line."""
    _log = logs.access_logger(**fields)
    writes_all = enabled and sample >= 1.0
    label_cache: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def observe(any_handler: RequestHandler) -> None:
        handler = cast(ServiceHandler, any_handler)  # every route, and the default one, is ours
        request = handler.request
        status = handler.get_status()
        route, request_id, sent = handler.route, handler.request_id, handler.response_bytes
        method = metrics.method_label(request.method)
        duration = request.request_time()
        key = (method, route, status)
        children = label_cache.get(key)
        if children is None:  # labels() takes a lock and builds tuples: once per combination
            children = label_cache[key] = (
                metrics.REQUESTS.labels(method, route, str(status)), metrics.DURATION.labels(method, route)
            )
        children[0].inc()
        children[1].observe(duration)
        if not (writes_all or status >= 500 or (enabled and random.random() < sample)):
            return
        log = _log.info if status < 400 else _log.warning if status < 500 else _log.error
        log(
            "request",
            method=request.method,
            path=request.path,
            handler=route,
            status=status,
            duration_ms=round(duration * 1000.0, 3),
            bytes=sent,
            request_id=request_id,
            client_ip=request.remote_ip,
            user_agent=request.headers.get("User-Agent", ""),
        )

    return observe
