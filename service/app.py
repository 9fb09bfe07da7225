"""The routes, and the Tornado Application that carries one worker's state and tick bus."""

from __future__ import annotations

from typing import Any

from tornado.web import Application, url

from service import metrics
from service import ticker as ticker_module
from service.access import request_observer
from service.config import Settings
from service.handlers.base import NotFoundHandler
from service.handlers.health import HealthzHandler, ReadyzHandler
from service.handlers.hello import ApiHelloHandler, HelloHandler
from service.handlers.scrape import MetricsHandler
from service.handlers.sockets import EchoSocket, TickerSocket
from service.handlers.work import ComputeHandler, PollHandler, SleepHandler
from service.state import WorkerState
from service.ticker import Ticker


class ServiceApp(Application):
    """A Tornado Application that also carries what handlers of this worker share."""

    def __init__(self, settings: Settings, state: WorkerState, ticker: Ticker, **extra: Any) -> None:
        self.state = state
        self.ticker = ticker
        self.render_metrics = metrics.renderer()
        routes = [
            url(pattern, handler, {"route": name}, name=name)
            for pattern, handler, name in (
                (r"/", HelloHandler, "hello"),
                (r"/api/hello", ApiHelloHandler, "api_hello"),
                (r"/api/sleep", SleepHandler, "api_sleep"),
                (r"/api/compute", ComputeHandler, "api_compute"),
                (r"/api/poll", PollHandler, "api_poll"),
                (r"/ws/echo", EchoSocket, "ws_echo"),
                (r"/ws/ticker", TickerSocket, ticker_module.ROUTE),
                (r"/healthz", HealthzHandler, "healthz"),
                (r"/readyz", ReadyzHandler, "readyz"),
                (r"/metrics", MetricsHandler, "metrics"),
            )
        ]
        super().__init__(
            routes,
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
            **extra,
        )
