"""WebSockets: an echo, and a ticker that pushes every tick of the worker's tick bus.

Each socket registers with the worker's state so the drain can close it with 1001 (going away),
and a draining worker refuses new upgrades with 503 so clients reconnect elsewhere.
"""

from __future__ import annotations

from asyncio import Future
from typing import Any

from tornado.httputil import HTTPHeaders, HTTPServerRequest
from tornado.iostream import IOStream, StreamBufferFullError, StreamClosedError
from tornado.web import Application
from tornado.websocket import WebSocketClosedError

from service.handlers.base import ServiceHandler
from service.http.errors import ApiError
from service.telemetry import logs, metrics
from service.ws.frames import send_frame
from service.ws.pinger import SETTING as PINGER
from service.ws.pinger import SocketPinger
from service.ws.ticker import Tick
from service.ws.wsguard import GuardedWebSocketHandler

_log = logs.get_logger("service.handlers")

# What Tornado 6.6 sets on a WebSocket handler after its __init__: in `_execute`, in `get`, and
# when the stream is detached (the methods it disables). See TrackedSocket.__init__.
LATE_ATTRIBUTES = (
    "_transforms", "path_args", "path_kwargs", "open_args", "open_kwargs",
    "write", "redirect", "set_header", "set_cookie", "set_status", "flush", "finish",
)


def _retrieve(future: Future[None]) -> None:
    """A write to a socket that closed meanwhile fails; that is expected, not worth a log line."""
    if not future.cancelled():
        future.exception()


class TrackedSocket(ServiceHandler, GuardedWebSocketHandler):  # RFC 6455 errors: service/ws/wsguard.py
    def __init__(self, application: Application, request: HTTPServerRequest, **kwargs: Any) -> None:
        """Keeps the handler's attributes in CPython's compact layout, without a dict of its own.

        CPython 3.11 stores an object's attributes in an inline array while every name is in its
        class's shared key table. The table has room for 30 names, and each new instance takes a
        free place away (down to one): names must be known early. Tornado sets 12 of a WebSocket
        handler's names late (LATE_ATTRIBUTES: in `_execute`, `get`, and when it detaches the
        stream); with handshakes in flight together, many handlers exist before the first gets
        that far, the table is closed to those names, and every handler gets a real dict, about
        730 bytes more per socket. Setting and deleting them here registers them while there is
        room (29 names in all, the most that fits); the handler's state is as if this had not
        run. tests/test_contracts.py checks that they still fit.
        """
        super().__init__(application, request, **kwargs)
        for name in LATE_ATTRIBUTES:
            setattr(self, name, None)
            delattr(self, name)

    def prepare(self) -> None:
        super().prepare()
        if self.worker.state.draining:
            raise ApiError(503, "server is shutting down")

    def open(self, *args: str, **kwargs: str) -> None:
        self._release_handshake()
        self.worker.state.websockets.add(self)
        metrics.WEBSOCKETS.labels(self.route).inc()

    def _release_handshake(self) -> None:
        """Lets go of what only the handshake needed, which a socket otherwise keeps for its life.

        Tornado keeps the upgraded request's handler, and with it everything the handler points
        to, until the socket closes. Of that, these are done with once the 101 is sent (what each
        costs per socket: bench/README.md):

        - the request's HTTP/1.1 connection objects (parser, futures, start lines) and the
          server connection with its finished serving task: the stream belongs to the WebSocket
          now. The request itself stays, for what log lines read (method, path, peer);
        - `ui`, the template namespace (Tornado itself drops it when the socket closes);
        - the 101's response headers, sent and frozen: after the upgrade Tornado refuses
          `set_header`, `flush` and `finish`. `_headers` is private (tests/test_contracts.py pins
          it, constraints.txt pins Tornado).
        """
        request = self.request
        request.connection = None
        request.server_connection = None
        self.ui = None  # type: ignore[assignment]  # as RequestHandler._break_cycles does at close
        self._headers = HTTPHeaders()

    def on_close(self) -> None:
        if self in self.worker.state.websockets:
            self.worker.state.websockets.discard(self)
            metrics.WEBSOCKETS.labels(self.route).dec()
        pinger: SocketPinger | None = self.settings.get(PINGER)
        if pinger is not None:
            pinger.forget(self)

    def send_ping(self) -> bool:
        """The worker's pinger (service/ws/pinger.py) pings every socket through this."""
        try:
            self.ping()
        except (WebSocketClosedError, StreamClosedError):
            return False
        except StreamBufferFullError:  # not even a ping fits: as slow a consumer as can be
            self._drop_slow_consumer()
            return False
        return True

    def ping_timed_out(self) -> None:
        """No pong for a whole WS_PING_INTERVAL: closed as Tornado's own ping closes it."""
        try:
            self.close(reason="ping timed out")
        except StreamBufferFullError:  # a peer that reads nothing: not even the close frame fits
            self._drop_slow_consumer()

    def on_pong(self, data: bytes) -> None:
        pinger: SocketPinger | None = self.settings.get(PINGER)
        if pinger is not None:
            pinger.answered(self)

    def send(self, message: str | bytes) -> None:
        try:
            future = self.write_message(message, binary=isinstance(message, bytes))
        except WebSocketClosedError:
            return
        except StreamBufferFullError:
            self._drop_slow_consumer()
            return
        future.add_done_callback(_retrieve)

    def takes_prepared_frames(self) -> bool:
        """Whether `send_prepared` may be used: a plain TCP stream (not TLS) on which Tornado
        negotiated no permessage-deflate (a compressed socket's frames depend on its own state)."""
        connection = self.ws_connection
        return (
            self.get_compression_options() is None
            and connection is not None
            and type(connection.stream) is IOStream
        )

    def send_prepared(self, frame: bytes) -> None:
        """Sends a prepared frame, the same bytes for every socket of a broadcast (service/ws/frames.py).

        What `write_message` does, minus what is the same for every socket (encoding, framing)
        and the task it makes per call; only where `takes_prepared_frames` said yes. A full
        queue (MAX_WRITE_BUFFER, the bound of a slow consumer's backlog) drops the consumer.
        """
        connection = self.ws_connection
        if connection is None or connection.stream is None or connection.is_closing():
            return  # as write_message: nothing after a close frame, nothing on a closed socket
        try:
            send_frame(connection.stream, frame)
        except StreamClosedError:
            return
        except StreamBufferFullError:
            self._drop_slow_consumer()

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
        self.worker.ticker.subscribe(self.push_frame if self.takes_prepared_frames() else self.push_text)

    def push_frame(self, tick: Tick) -> None:
        self.send_prepared(tick.frame)

    def push_text(self, tick: Tick) -> None:
        """The fallback: Tornado's own `write_message`, which frames (and compresses) per socket."""
        self.send(tick.text)

    def on_message(self, message: str | bytes) -> None:
        """Clients only listen; what they send is counted and otherwise ignored."""
        metrics.WEBSOCKET_MESSAGES.labels(self.route, "in").inc()

    def on_close(self) -> None:
        ticker = self.worker.ticker
        ticker.unsubscribe(self.push_frame)
        ticker.unsubscribe(self.push_text)
        super().on_close()
