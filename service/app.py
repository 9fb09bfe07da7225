"""The routes: one Tornado Application per worker, carrying that worker's context for its handlers."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, cast

from tornado.web import Application, url

from service.config import Settings
from service.handlers.base import NotFoundHandler
from service.handlers.health import HealthzHandler, ReadyzHandler
from service.handlers.hello import ApiHelloHandler, HelloHandler
from service.handlers.rooms import ChatSocket, PublishHandler, RoomPollHandler
from service.handlers.scrape import MetricsHandler
from service.handlers.sockets import EchoSocket, TickerSocket
from service.handlers.work import ComputeHandler, SleepHandler
from service.http.access import request_observer
from service.http.context import SETTING, WorkerContext
from service.telemetry import metrics
from service.ws.pinger import SETTING as PINGER
from service.ws.pinger import Pingable, SocketPinger

TICKER_ROUTE = "ws_ticker"
CHAT_ROUTE = "ws_chat"
ROUTES = (  # (pattern, handler, route name: the `handler` label of every metric)
    (r"/", HelloHandler, "hello"),
    (r"/api/hello", ApiHelloHandler, "api_hello"),
    (r"/api/sleep", SleepHandler, "api_sleep"),
    (r"/api/compute", ComputeHandler, "api_compute"),
    (r"/api/poll", RoomPollHandler, "api_poll"),  # with ?room=: a room's next message; without: a tick
    (r"/api/publish", PublishHandler, "api_publish"),
    (r"/ws/echo", EchoSocket, "ws_echo"),
    (r"/ws/ticker", TickerSocket, TICKER_ROUTE),
    (r"/ws/chat", ChatSocket, CHAT_ROUTE),
    (r"/healthz", HealthzHandler, "healthz"),
    (r"/readyz", ReadyzHandler, "readyz"),
    (r"/metrics", MetricsHandler, "metrics"),
)


def count_ticks_sent(subscribers: int) -> None:
    """The tick bus's fan-out, counted as messages out of the ticker route: once per tick."""
    if subscribers:
        metrics.WEBSOCKET_MESSAGES.labels(TICKER_ROUTE, "out").inc(subscribers)


def count_chat_sent(members: int) -> None:
    """A room message's fan-out in a worker, counted as messages out of the chat route: once per message."""
    metrics.WEBSOCKET_MESSAGES.labels(CHAT_ROUTE, "out").inc(members)


class ServiceApp(Application):
    """Tornado's Application with this service's routes, hooks and limits."""

    def __init__(self, settings: Settings, context: WorkerContext, **extra: Any) -> None:
        state = context.state
        # WS_PING_INTERVAL: one timer pings every WebSocket of the worker (service/ws/pinger.py says why)
        pinger = None
        if settings.ws_ping_interval:
            sockets = cast(Collection[Pingable], state.websockets)  # every one a TrackedSocket
            pinger = SocketPinger(sockets, settings.ws_ping_interval)
        options: dict[str, Any] = {SETTING: context, PINGER: pinger, **extra}  # handlers read these
        super().__init__(
            [url(pattern, handler, {"route": name}, name=name) for pattern, handler, name in ROUTES],
            default_handler_class=NotFoundHandler,
            default_handler_args={"route": "not_found"},
            log_function=request_observer(
                settings.access_log, settings.access_log_sample, worker=state.worker_id, pid=state.pid
            ),
            websocket_max_message_size=settings.ws_max_message_size,
            websocket_ping_interval=None,  # no ping task per socket: the pinger pings them all
            debug=False,
            serve_traceback=False,
            compress_response=False,
            **options,
        )
        self.pinger = pinger
        if pinger is not None:
            pinger.start()
