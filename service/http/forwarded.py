"""Who the client is when a trusted proxy says so: X-Forwarded-For, X-Real-IP, X-Forwarded-Proto.

Anyone can send these headers: they are believed only on connections from a trusted proxy
(FORWARDED_ALLOW_IPS), else the peer's own address is the client's. Tornado's `xheaders` is
all-or-nothing per server and validates each forwarded address with a getaddrinfo() per
request, so `ForwardedHeaders` does the same job per request here, only for a trusted peer's
requests and only when they carry such a header, validating each distinct address once. It
sets what Tornado's own xheaders sets, the connection context's `remote_ip` and `protocol`,
which `HTTPServerRequest` copies when it is made (tests/test_contracts.py pins that, and
constraints.txt pins Tornado); tests/test_forwarded.py proves the rule end to end.

service/http/server.py wraps a trusted peer's requests in `ForwardedHeaders`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Sequence
from typing import Any

from tornado import httputil


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
