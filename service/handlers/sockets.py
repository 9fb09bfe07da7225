"""WebSockets: an echo, and a ticker that pushes every tick of the worker's tick bus.

Each socket registers with the worker's state so the drain can close it with 1001 (going away),
and a draining worker refuses new upgrades with 503 so clients reconnect elsewhere.
"""

from __future__ import annotations

from asyncio import Future

from tornado.iostream import StreamBufferFullError
from tornado.websocket import WebSocketClosedError, WebSocketHandler

from service import logs, metrics
from service.errors import ApiError
from service.handlers.base import ServiceHandler

_log = logs.get_logger("service.handlers")


def _retrieve(future: Future[None]) -> None:
    """A write to a socket that closed meanwhile fails; that is expected, not worth a log line."""
    if not future.cancelled():
        future.exception()


class TrackedSocket(ServiceHandler, WebSocketHandler):
    def prepare(self) -> None:
        super().prepare()
        if self.worker.state.draining:
            raise ApiError(503, "server is shutting down")

    def open(self, *args: str, **kwargs: str) -> None:
        self.worker.state.websockets.add(self)
        metrics.WEBSOCKETS.labels(self.route).inc()

    def on_close(self) -> None:
        if self in self.worker.state.websockets:
            self.worker.state.websockets.discard(self)
            metrics.WEBSOCKETS.labels(self.route).dec()

    def send(self, message: str | bytes) -> None:
        try:
            future = self.write_message(message, binary=isinstance(message, bytes))
        except WebSocketClosedError:
            return
        except StreamBufferFullError:
            self._drop_slow_consumer()
            return
        future.add_done_callback(_retrieve)

    def _drop_slow_consumer(self) -> None:
        """Its queue is full, so not even a close frame fits: drop the connection itself."""
        metrics.WEBSOCKET_SLOW.labels(self.route).inc()
        _log.warning("slow websocket consumer disconnected", handler=self.route, request_id=self.request_id)
        if self.ws_connection is not None and self.ws_connection.stream is not None:
            self.ws_connection.stream.close()


class EchoSocket(TrackedSocket):
    def on_message(self, message: str | bytes) -> None:
        counter = metrics.WEBSOCKET_MESSAGES
        counter.labels(self.route, "in").inc()
        self.send(message)
        counter.labels(self.route, "out").inc()


class TickerSocket(TrackedSocket):
    """Pushes ticks; the tick bus counts them (once per tick, not once per socket)."""

    def open(self, *args: str, **kwargs: str) -> None:
        super().open()
        self.worker.ticker.subscribe(self.send)

    def on_message(self, message: str | bytes) -> None:
        """Clients only listen; what they send is counted and otherwise ignored."""
        metrics.WEBSOCKET_MESSAGES.labels(self.route, "in").inc()

    def on_close(self) -> None:
        self.worker.ticker.unsubscribe(self.send)
        super().on_close()
