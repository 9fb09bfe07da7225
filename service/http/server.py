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

Forwarded headers (X-Forwarded-For, X-Real-IP, X-Forwarded-Proto) say who the client is, and
anyone can send them: they are believed only on connections from a trusted proxy
(FORWARDED_ALLOW_IPS), else the peer's own address is the client's. Tornado's `xheaders` is
all-or-nothing per server and validates each forwarded address with a getaddrinfo() per
request, so `ForwardedHeaders` does the same job per request here, only for a trusted peer's
requests and only when they carry such a header, validating each distinct address once. It
sets what Tornado's own xheaders sets, the connection context's `remote_ip` and `protocol`,
which `HTTPServerRequest` copies when it is made (tests/test_contracts.py pins that, and
constraints.txt pins Tornado); tests/test_forwarded.py proves the rule end to end.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import time
from asyncio import Future
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, cast

from tornado import httputil
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream

from service.http.errors import error_json
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


class TrustedProxies:
    """Whether a peer address is one of FORWARDED_ALLOW_IPS; answers are remembered per address."""

    def __init__(self, allowed: Sequence[str]) -> None:
        self.everyone = "*" in allowed
        self.networks = [ipaddress.ip_network(item, strict=False) for item in allowed if item != "*"]
        self._known: dict[str, bool] = {}

    def __call__(self, peer: str) -> bool:
        known = self._known.get(peer)
        if known is None:
            known = self.everyone or self._lookup(peer)
            if len(self._known) < 4096:  # peers are proxies, a handful; never grow without bound
                self._known[peer] = known
        return known

    def _lookup(self, peer: str) -> bool:
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:  # not an IP peer (a Unix socket): nothing to trust
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)


class ForwardedAddresses:
    """The client a trusted proxy's headers name, each distinct header value checked once.

    The rule is Tornado's xheaders': X-Real-IP if present, else the last X-Forwarded-For entry
    (the one the trusted proxy added), believed only if it is an IP address; X-Forwarded-Proto's
    last entry if it is http or https. Checking an address with `ipaddress` costs a few
    microseconds, Tornado's getaddrinfo() more: the answers are remembered, a bounded number of
    them (a proxy's clients are many, but each sends many requests).
    """

    LIMIT = 4096

    def __init__(self) -> None:
        self._known: dict[str, bool] = {}

    def valid(self, address: str) -> bool:
        known = self._known.get(address)
        if known is None:
            try:
                ipaddress.ip_address(address)
                known = True
            except ValueError:
                known = False
            if len(self._known) >= self.LIMIT:
                self._known.clear()
            self._known[address] = known
        return known

    def client(self, headers: httputil.HTTPHeaders) -> str | None:
        """The forwarded client address, or None when the headers name no valid one."""
        real_ip = headers.get_list("X-Real-Ip")  # get_list: no KeyError raised for an absent header
        if real_ip:
            candidate = ",".join(real_ip) if len(real_ip) > 1 else real_ip[0]  # several: never valid
        else:
            forwarded_for = headers.get_list("X-Forwarded-For")
            if not forwarded_for:
                return None
            candidate = forwarded_for[-1].rpartition(",")[2].strip()
        return candidate if self.valid(candidate) else None

    @staticmethod
    def protocol(headers: httputil.HTTPHeaders) -> str | None:
        proto = headers.get_list("X-Forwarded-Proto")
        if not proto:
            return None
        last = proto[-1].rpartition(",")[2].strip()
        return last if last in ("http", "https") else None


class ForwardedHeaders(httputil.HTTPMessageDelegate):
    """A trusted proxy's request: its forwarded client and scheme become the request's.

    Wraps the application's delegate (as Tornado's xheaders does, through the documented
    `HTTPMessageDelegate` interface): when the headers arrive, before the request object is
    made from the connection's context, the context gets the forwarded values; when the request
    ends they are put back, so nothing leaks to the next request on the same connection.
    """

    def __init__(
        self, delegate: httputil.HTTPMessageDelegate, context: Any, addresses: ForwardedAddresses
    ) -> None:
        self.delegate = delegate
        self.context = context
        self.addresses = addresses
        self._saved: tuple[str, str] | None = None

    def headers_received(
        self, start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
        headers: httputil.HTTPHeaders,
    ) -> Awaitable[None] | None:
        client = self.addresses.client(headers)
        protocol = self.addresses.protocol(headers)
        if client is not None or protocol is not None:
            context = self.context
            self._saved = (context.remote_ip, context.protocol)
            if client is not None:
                context.remote_ip = client
            if protocol is not None:
                context.protocol = protocol
        return self.delegate.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        return self.delegate.data_received(chunk)

    def finish(self) -> None:
        self.delegate.finish()
        self._restore()

    def on_connection_close(self) -> None:
        self.delegate.on_connection_close()
        self._restore()

    def _restore(self) -> None:
        if self._saved is not None:
            self.context.remote_ip, self.context.protocol = self._saved
            self._saved = None


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
