"""Tornado's HTTPServer with a cap on open connections per worker, and on what each may queue.

Without a cap a flood of connections ends in EMFILE: accept() fails, Tornado logs an error per
attempt, and the worker can no longer open anything else either. With it, a connection past the
cap gets a one-line 503 and is closed at once, and the worker keeps serving the ones it holds.

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

import ipaddress
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from tornado import httputil
from tornado.httpserver import HTTPServer
from tornado.iostream import IOStream

from service.errors import error_json


def refusal(identity: dict[str, str]) -> bytes:
    """The whole 503 a connection past the cap gets: the usual JSON error and identity headers."""
    body = error_json(503, message="too many open connections")
    headers = "".join(f"{name}: {value}\r\n" for name, value in identity.items())
    return (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
        + headers.encode("latin-1") + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )


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


class LimitedHTTPServer(HTTPServer):
    def initialize(
        self, *args: Any, max_connections: int = 10_000, max_write_buffer: int | None = None,
        on_refuse: Callable[[], None] = lambda: None,
        trust_forwarded: Callable[[str], bool] = lambda _: False, identity: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().initialize(*args, **kwargs)  # without xheaders: start_request decides per peer
        self.refusal = refusal(identity or {})
        self.trust_forwarded = trust_forwarded
        self.forwarded = ForwardedAddresses()
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
            stream.write(self.refusal).add_done_callback(lambda _: stream.close())
            return
        # A reader that stops reading makes writes queue up; past this the write fails and the
        # connection is dropped (a slow WebSocket consumer), instead of the worker's memory growing.
        stream.max_write_buffer_size = self.max_write_buffer
        self._streams.add(stream)
        super().handle_stream(stream, address)

    def start_request(
        self, server_conn: object, request_conn: httputil.HTTPConnection
    ) -> httputil.HTTPMessageDelegate:
        delegate = super().start_request(server_conn, request_conn)
        context = getattr(request_conn, "context", None)  # HTTP1Connection's: HTTPServer's per connection
        address = getattr(context, "address", None)  # the TCP peer
        if isinstance(address, tuple) and self.trust_forwarded(str(address[0])):
            delegate = ForwardedHeaders(delegate, context, self.forwarded)
        return delegate
