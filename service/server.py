"""Tornado's HTTPServer with a cap on open connections per worker, and on what each may queue.

Without a cap a flood of connections ends in EMFILE: accept() fails, Tornado logs an error per
attempt, and the worker can no longer open anything else either. With it, a connection past the
cap gets a one-line 503 and is closed at once, and the worker keeps serving the ones it holds.

WebSockets count too: Tornado forgets a connection once it is upgraded, so the count is kept
here, on the streams themselves (a stream that closed is pruned when the count is read).

Forwarded headers (X-Forwarded-For, X-Real-IP, X-Forwarded-Proto) say who the client is, and
anyone can send them: they are believed only on connections from a trusted proxy
(FORWARDED_ALLOW_IPS), else the peer's own address is the client's. Tornado's `xheaders` is
all-or-nothing per server, so the choice is made per request here, wrapping the request in
Tornado's own xheaders adapter (`_ProxyAdapter`, private: tests/test_forwarded.py pins what it
does, and constraints.txt pins Tornado).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from typing import Any

from tornado import httputil
from tornado.httpserver import HTTPServer, _ProxyAdapter
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
        address = getattr(getattr(request_conn, "context", None), "address", None)  # the TCP peer
        if isinstance(address, tuple) and self.trust_forwarded(str(address[0])):
            delegate = _ProxyAdapter(delegate, request_conn)
        return delegate
