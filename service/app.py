"""The routes: one Tornado Application per worker, carrying that worker's context for its handlers."""

from __future__ import annotations

from typing import Any

from tornado.web import Application, url

from service import metrics
from service.access import request_observer
from service.config import Settings
from service.context import SETTING, WorkerContext
from service.handlers.base import NotFoundHandler
from service.handlers.health import HealthzHandler, ReadyzHandler
from service.handlers.hello import ApiHelloHandler, HelloHandler
from service.handlers.scrape import MetricsHandler
from service.handlers.sockets import EchoSocket, TickerSocket
from service.handlers.work import ComputeHandler, PollHandler, SleepHandler

TICKER_ROUTE = "ws_ticker"
ROUTES = (  # (pattern, handler, route name: the `handler` label of every metric)
    (r"/", HelloHandler, "hello"),
    (r"/api/hello", ApiHelloHandler, "api_hello"),
    (r"/api/sleep", SleepHandler, "api_sleep"),
    (r"/api/compute", ComputeHandler, "api_compute"),
    (r"/api/poll", PollHandler, "api_poll"),
    (r"/ws/echo", EchoSocket, "ws_echo"),
    (r"/ws/ticker", TickerSocket, TICKER_ROUTE),
    (r"/healthz", HealthzHandler, "healthz"),
    (r"/readyz", ReadyzHandler, "readyz"),
    (r"/metrics", MetricsHandler, "metrics"),
)


def count_ticks_sent(subscribers: int) -> None:
    """The tick bus's fan-out, counted as messages out of the ticker route: once per tick."""
    if subscribers:
        metrics.WEBSOCKET_MESSAGES.labels(TICKER_ROUTE, "out").inc(subscribers)


class ServiceApp(Application):
    """Tornado's Application with this service's routes, hooks and limits."""

    def __init__(self, settings: Settings, context: WorkerContext, **extra: Any) -> None:
        state = context.state
        options: dict[str, Any] = {SETTING: context, **extra}  # handlers read the context from here
        super().__init__(
            [url(pattern, handler, {"route": name}, name=name) for pattern, handler, name in ROUTES],
            default_handler_class=NotFoundHandler,
            default_handler_args={"route": "not_found"},
            log_function=request_observer(
                settings.access_log, settings.access_log_sample, worker=state.worker_id, pid=state.pid
            ),
            websocket_max_message_size=settings.ws_max_message_size,
            websocket_ping_interval=settings.ws_ping_interval or None,
            debug=False,
            serve_traceback=False,
            compress_response=False,
            **options,
        )
