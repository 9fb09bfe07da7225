"""Tornado's HTTPServer with a cap on open connections per worker, and on what each may queue.

Without a cap a flood of connections ends in EMFILE: accept() fails, Tornado logs an error per
attempt, and the worker can no longer open anything else either. With it, a connection past the
cap gets a one-line 503 and is closed at once, and the worker keeps serving the ones it holds.
Should descriptors run out all the same (refusals lingering past the 256 of headroom under a
flood, a limit lowered from outside, the system's ENFILE), accept() failing does not spin the
worker: the listener rests for half a second at a time (`PausingAcceptor`).

While memory is nearly full (service.process.memguard), a second cap, as low as the connections open
then, is refused the same way, with a body that says why.

WebSockets count too: Tornado forgets a connection once it is upgraded, so the count is kept
here, on the streams themselves (a stream that closed is pruned when the count is read).

Forwarded headers are believed only from a trusted proxy (FORWARDED_ALLOW_IPS): service/http/forwarded.py.
"""

from __future__ import annotations

import errno
import socket
import time
from asyncio import Future
from collections.abc import Callable, Iterable
from typing import Any, cast

from tornado import httputil
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream

from service.http.errors import error_json
from service.http.forwarded import ForwardedAddresses, ForwardedHeaders
from service.telemetry import logs

_log = logs.get_logger("service.server")


def refusal(identity: dict[str, str], message: str = "too many open connections") -> bytes:
    """The whole 503 a refused connection gets: the usual JSON error and identity headers."""
    body = error_json(503, message=message)
    headers = "".join(f"{name}: {value}\r\n" for name, value in identity.items())
    return (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
        + headers.encode("latin-1") + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )


REFUSAL_LINGER_SECONDS = 2.0  # how long a refused client may take to close after the 503
REFUSAL_LINGER_BYTES = 64 * 1024  # what it may send meanwhile (read and dropped)


def refuse(stream: IOStream, answer: bytes) -> None:
    """Write the 503 and close the connection so that the client gets to read it.

    The client has usually sent its request by now, and closing a socket with bytes unread makes
    Linux answer with a RST, which discards the 503 from the client's receive queue before it is
    read: the client sees "connection reset", not the 503. So, as Nginx's lingering close does:
    write, send FIN (shutdown for writing), read and drop what the client sends until it closes
    its end (at once, for a client that reads the 503), then close; at most
    REFUSAL_LINGER_SECONDS and REFUSAL_LINGER_BYTES, after which the connection is closed anyway.
    """
    stream.max_buffer_size = REFUSAL_LINGER_BYTES  # more than this while lingering: closed at once
    loop = IOLoop.current()

    def written(done: Future[None]) -> None:
        if done.exception() is not None or stream.closed():
            stream.close()
            return
        try:
            stream.socket.shutdown(socket.SHUT_WR)
        except OSError:  # the client is gone already
            stream.close()
            return
        timer = loop.call_later(REFUSAL_LINGER_SECONDS, stream.close)

        def client_closed(read: Future[bytes]) -> None:
            read.exception()  # StreamClosedError or a full buffer: retrieved, nothing more to do
            loop.remove_timeout(timer)
            stream.close()

        cast("Future[bytes]", stream.read_until_close()).add_done_callback(client_closed)  # a Future

    stream.write(answer).add_done_callback(written)


class PausingAcceptor:
    """Accepts connections on a listener as Tornado's `add_accept_handler` does, except when the
    process is out of descriptors (EMFILE, ENFILE) or kernel memory (ENOBUFS, ENOMEM).

    Tornado lets that error escape to the event loop, which logs a traceback and, the listener
    being still readable, calls the handler again at once: a worker out of descriptors spins at
    full CPU writing a traceback per turn, for as long as it lasts. Here the listener instead
    leaves the loop for `PAUSE` seconds, as Nginx's does (accept_mutex_delay, 500 ms): the
    waiting connections stay in the kernel's backlog, another worker sharing the listener may
    take them, and they are accepted once descriptors are free again. One warning per episode
    (then at most one per `LOG_EVERY` seconds, with the count of pauses since).
    """

    PAUSE = 0.5
    LOG_EVERY = 10.0
    BATCH = 128  # accepts per readiness, Tornado's own bound (_DEFAULT_BACKLOG)
    EXHAUSTED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

    def __init__(self, sock: socket.socket, callback: Callable[[socket.socket, Any], None]) -> None:
        self.sock = sock
        self.callback = callback
        self.io_loop = IOLoop.current()
        self.removed = False
        self.paused = False
        self.pauses = 0
        self.logged_at = -self.LOG_EVERY
        self.io_loop.add_handler(sock, self._on_readable, IOLoop.READ)

    def remove(self) -> None:
        """Stop accepting for good (TCPServer.stop calls this, then closes the socket)."""
        self.removed = True
        if not self.paused:
            self.io_loop.remove_handler(self.sock)

    def _on_readable(self, _fd: Any, _events: int) -> None:
        for _ in range(self.BATCH):
            if self.removed:
                return
            try:
                connection, address = self.sock.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno not in self.EXHAUSTED:
                    raise
                self._pause(exc)
                return
            self.callback(connection, address)

    def _pause(self, exc: OSError) -> None:
        self.io_loop.remove_handler(self.sock)
        self.paused = True
        self.pauses += 1
        now = time.monotonic()
        if now - self.logged_at >= self.LOG_EVERY:
            _log.warning("cannot accept: out of file descriptors or memory; pausing the listener",
                         error=errno.errorcode.get(exc.errno or 0, str(exc)), pause_seconds=self.PAUSE,
                         pauses=self.pauses)
            self.logged_at, self.pauses = now, 0
        self.io_loop.call_later(self.PAUSE, self._resume)

    def _resume(self) -> None:
        self.paused = False
        if not self.removed:
            self.io_loop.add_handler(self.sock, self._on_readable, IOLoop.READ)


# Requests a worker past its cap still serves (probe_or_refuse): the kubelet's probes and
# Prometheus' scrapes, as their request lines start.
PROBE_REQUESTS = (b"GET /healthz ", b"GET /healthz?", b"GET /readyz ", b"GET /readyz?",
                  b"GET /metrics ", b"GET /metrics?")
PROBE_ROOM = 16  # such connections a worker holds at once past its cap
PROBE_WAITS = (0.005, 0.02, 0.05)  # seconds to wait, in turn, for a request line not yet arrived


def _peek(stream: IOStream) -> bytes | None:
    """The first bytes the client sent, left unread; b"" if none yet; None if it has gone."""
    sock = stream.socket
    if sock is None:
        return None
    try:
        data = sock.recv(16, socket.MSG_PEEK)
    except BlockingIOError:
        return b""
    except OSError:
        return None
    return data or None  # b"" from recv: the client closed


class LimitedHTTPServer(HTTPServer):
    def initialize(
        self, *args: Any, max_connections: int = 10_000, max_write_buffer: int | None = None,
        on_refuse: Callable[[], None] = lambda: None, on_shed: Callable[[], None] = lambda: None,
        on_accept: Callable[[], None] | None = None,
        trust_forwarded: Callable[[str], bool] = lambda _: False, identity: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().initialize(*args, **kwargs)  # without xheaders: start_request decides per peer
        self.refusal = refusal(identity or {})
        self.shed_refusal = refusal(identity or {}, "server low on memory")
        self.memory_cap: int | None = None  # set by service.process.memguard while memory is over its mark
        self.on_shed = on_shed
        self.on_accept = on_accept  # service.process.memguard counts accepted connections, to look sooner
        self.trust_forwarded = trust_forwarded
        self.forwarded = ForwardedAddresses()
        self.max_connections = max_connections
        self._probes: set[IOStream] = set()  # connections served past the cap (probe_or_refuse)
        self.max_write_buffer = max_write_buffer
        self.on_refuse = on_refuse
        self._streams: set[IOStream] = set()

    def open_connections(self) -> int:
        """Connections open now (HTTP and WebSocket); drops the closed ones it was holding."""
        self._streams = {stream for stream in self._streams if not stream.closed()}
        return len(self._streams)

    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        """TCPServer's own, with `PausingAcceptor` in place of Tornado's accept handler (the same
        two maps, which `TCPServer.stop` reads to remove the handler and close the socket)."""
        for sock in sockets:
            self._sockets[sock.fileno()] = sock
            self._handlers[sock.fileno()] = PausingAcceptor(sock, self._handle_connection).remove

    def stop_keep_alive(self) -> None:
        """Answer every request from now on with `Connection: close` (used while draining)."""
        self.conn_params.no_keep_alive = True

    def shed(self, cap: int | None) -> None:
        """A second, lower cap while memory is short (service.process.memguard), or None for none."""
        self.memory_cap = cap

    def handle_stream(self, stream: IOStream, address: tuple[Any, ...]) -> None:
        memory_cap = self.memory_cap
        cap = self.max_connections if memory_cap is None else min(memory_cap, self.max_connections)
        if len(self._streams) >= cap and self.open_connections() >= cap:
            for_memory = memory_cap is not None and memory_cap < self.max_connections
            self.probe_or_refuse(stream, address, for_memory)
            return
        # A reader that stops reading makes writes queue up; past this the write fails and the
        # connection is dropped (a slow WebSocket consumer), instead of the worker's memory growing.
        stream.max_write_buffer_size = self.max_write_buffer
        self._streams.add(stream)
        if self.on_accept is not None:
            self.on_accept()
        super().handle_stream(stream, address)

    def probe_or_refuse(
        self, stream: IOStream, address: tuple[Any, ...], for_memory: bool, attempt: int = 0
    ) -> None:
        """Past the cap: serve a health probe or a scrape all the same, refuse anything else.

        A worker at its cap (MAX_CONNECTIONS, or the memory cap) would otherwise refuse the
        kubelet's probes too, for as long as no connection of it closes: its liveness probe
        failing, Kubernetes restarts the container and cuts every connection the cap was
        protecting, and Prometheus loses its scrapes exactly when they matter. The request line
        is read without consuming it (MSG_PEEK); one that has not arrived yet is waited for a
        few ms (PROBE_WAITS). At most PROBE_ROOM such connections at once, so the exception
        cannot be used to get past the cap in numbers.
        """
        head = _peek(stream)
        if head is None:  # the client has gone already
            stream.close()
            return
        self._probes = {probe for probe in self._probes if not probe.closed()}
        if head.startswith(PROBE_REQUESTS) and len(self._probes) < PROBE_ROOM:
            self._probes.add(stream)  # not in _streams: it takes no seat under the cap
            stream.max_write_buffer_size = self.max_write_buffer
            super().handle_stream(stream, address)
            return
        waiting = any(probe.startswith(head) for probe in PROBE_REQUESTS)
        if waiting and attempt < len(PROBE_WAITS):
            IOLoop.current().call_later(
                PROBE_WAITS[attempt], self.probe_or_refuse, stream, address, for_memory, attempt + 1
            )
            return
        (self.on_shed if for_memory else self.on_refuse)()
        refuse(stream, self.shed_refusal if for_memory else self.refusal)

    def start_request(
        self, server_conn: object, request_conn: httputil.HTTPConnection
    ) -> httputil.HTTPMessageDelegate:
        delegate = super().start_request(server_conn, request_conn)
        context = getattr(request_conn, "context", None)  # HTTP1Connection's: HTTPServer's per connection
        address = getattr(context, "address", None)  # the TCP peer
        if isinstance(address, tuple) and self.trust_forwarded(str(address[0])):
            delegate = ForwardedHeaders(delegate, context, self.forwarded)
        return delegate
