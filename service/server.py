"""Tornado's HTTPServer with a cap on open connections per worker, and on what each may queue.

Without a cap a flood of connections ends in EMFILE: accept() fails, Tornado logs an error per
attempt, and the worker can no longer open anything else either. With it, a connection past the
cap gets a one-line 503 and is closed at once, and the worker keeps serving the ones it holds.

WebSockets count too: Tornado forgets a connection once it is upgraded, so the count is kept
here, on the streams themselves (a stream that closed is pruned when the count is read).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tornado.httpserver import HTTPServer
from tornado.iostream import IOStream

_REFUSAL_BODY = b'{"error":"too many open connections","status":503}'
_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_REFUSAL_BODY), _REFUSAL_BODY)
)


class LimitedHTTPServer(HTTPServer):
    def initialize(
        self, *args: Any, max_connections: int = 10_000, max_write_buffer: int | None = None,
        on_refuse: Callable[[], None] = lambda: None, **kwargs: Any,
    ) -> None:
        super().initialize(*args, **kwargs)
        self.max_connections = max_connections
        self.max_write_buffer = max_write_buffer
        self.on_refuse = on_refuse
        self._streams: set[IOStream] = set()

    def open_connections(self) -> int:
        """Connections open now (HTTP and WebSocket); drops the closed ones it was holding."""
        self._streams = {stream for stream in self._streams if not stream.closed()}
        return len(self._streams)

    def stop_keep_alive(self) -> None:
        """Answer every request from now on with `Connection: close` (used while draining)."""
        self.conn_params.no_keep_alive = True

    def handle_stream(self, stream: IOStream, address: tuple[Any, ...]) -> None:
        if len(self._streams) >= self.max_connections and self.open_connections() >= self.max_connections:
            self.on_refuse()
            stream.write(_REFUSAL).add_done_callback(lambda _: stream.close())
            return
        # A reader that stops reading makes writes queue up; past this the write fails and the
        # connection is dropped (a slow WebSocket consumer), instead of the worker's memory growing.
        stream.max_write_buffer_size = self.max_write_buffer
        self._streams.add(stream)
        super().handle_stream(stream, address)
