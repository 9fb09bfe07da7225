"""The routes, and the Tornado Application that carries one worker's state and tick bus."""

from __future__ import annotations

from typing import Any

from tornado.web import Application, RequestHandler, url

from service import logs
from service.config import Settings
from service.handlers.base import NotFoundHandler
from service.handlers.health import HealthzHandler, ReadyzHandler
from service.handlers.hello import ApiHelloHandler, HelloHandler
from service.handlers.sockets import EchoSocket, TickerSocket
from service.handlers.work import ComputeHandler, PollHandler, SleepHandler
from service.state import WorkerState
from service.ticker import Ticker

_access = logs.get_logger("access")


def access_log(handler: RequestHandler) -> None:
    """One structured line per finished request (Tornado's `log_function` hook)."""
    request = handler.request
    status = handler.get_status()
    log = _access.info if status < 400 else _access.warning if status < 500 else _access.error
    log(
        "request",
        method=request.method,
        path=request.path,
        handler=type(handler).__name__,
        status=status,
        duration_ms=round(request.request_time() * 1000.0, 3),
        client_ip=request.remote_ip,
        user_agent=request.headers.get("User-Agent", ""),
    )


class ServiceApp(Application):
    """A Tornado Application that also carries what handlers of this worker share."""

    def __init__(self, settings: Settings, state: WorkerState, ticker: Ticker, **extra: Any) -> None:
        self.state = state
        self.ticker = ticker
        routes = [
            url(r"/", HelloHandler, name="hello"),
            url(r"/api/hello", ApiHelloHandler, name="api_hello"),
            url(r"/api/sleep", SleepHandler, name="api_sleep"),
            url(r"/api/compute", ComputeHandler, name="api_compute"),
            url(r"/api/poll", PollHandler, name="api_poll"),
            url(r"/ws/echo", EchoSocket, name="ws_echo"),
            url(r"/ws/ticker", TickerSocket, name="ws_ticker"),
            url(r"/healthz", HealthzHandler, name="healthz"),
            url(r"/readyz", ReadyzHandler, name="readyz"),
        ]
        super().__init__(
            routes,
            default_handler_class=NotFoundHandler,
            log_function=access_log,
            websocket_max_message_size=settings.ws_max_message_size,
            websocket_ping_interval=settings.ws_ping_interval or None,
            debug=False,
            serve_traceback=False,
            compress_response=False,
            **extra,
        )
