"""Who the client is: forwarded headers count only from a trusted proxy (FORWARDED_ALLOW_IPS).

Anyone who reaches the service's port can send X-Forwarded-For or X-Real-IP; believed from
anyone, they let a client choose the address that is logged (and that any rate limit or audit
trail would use). These run the real service and read its access lines. They also prove what
service/http/forwarded.py's `ForwardedHeaders` does in place of Tornado's xheaders (whose private
context attributes tests/test_contracts.py pins): a trusted peer's X-Real-IP or X-Forwarded-For
is applied when it is an address, and nothing leaks to the next request on the same connection.
"""

from __future__ import annotations

import http.client
from collections.abc import Callable

from conftest import ServiceProcess, http_request

Start = Callable[..., ServiceProcess]
SPOOF = "203.0.113.9"


def logged_client(svc: ServiceProcess, request_id: str) -> str:
    line = svc.wait_for(lambda e: e.get("event") == "request" and e.get("request_id") == request_id)
    return str(line["client_ip"])


def ask(svc: ServiceProcess, request_id: str, source: str, **headers: str) -> str:
    status, _, _ = http_request(svc.port, "/api/hello", source=source,
                               headers={"X-Request-ID": request_id, **headers})
    assert status == 200
    return logged_client(svc, request_id)


def test_a_peer_that_is_not_a_trusted_proxy_cannot_choose_the_logged_address(start_service: Start) -> None:
    svc = start_service(env={"FORWARDED_ALLOW_IPS": "127.0.0.2"})
    assert ask(svc, "spoof-real-ip", "127.0.0.1", **{"X-Real-IP": SPOOF}) == "127.0.0.1"
    assert ask(svc, "spoof-xff", "127.0.0.1", **{"X-Forwarded-For": SPOOF}) == "127.0.0.1"
    # the trusted proxy is believed, for both headers (X-Real-IP wins, as with Nginx's pair)
    assert ask(svc, "proxied-real-ip", "127.0.0.2", **{"X-Real-IP": SPOOF}) == SPOOF
    assert ask(svc, "proxied-xff", "127.0.0.2", **{"X-Forwarded-For": f"198.51.100.1, {SPOOF}"}) == SPOOF
    assert ask(svc, "proxied-none", "127.0.0.2") == "127.0.0.2"


def test_default_trusts_only_loopback_and_cidrs_and_star_work(start_service: Start) -> None:
    default = start_service()
    assert ask(default, "default-trusted", "127.0.0.1", **{"X-Real-IP": SPOOF}) == SPOOF
    # 127.0.0.3 is loopback but not 127.0.0.1: the default names the address, not the range
    assert ask(default, "default-untrusted", "127.0.0.3", **{"X-Real-IP": SPOOF}) == "127.0.0.3"

    cidr = start_service(env={"FORWARDED_ALLOW_IPS": "10.0.0.0/8, 127.0.0.0/29"})
    assert ask(cidr, "cidr-in", "127.0.0.5", **{"X-Real-IP": SPOOF}) == SPOOF
    assert ask(cidr, "cidr-out", "127.0.0.9", **{"X-Real-IP": SPOOF}) == "127.0.0.9"

    everyone = start_service(env={"FORWARDED_ALLOW_IPS": "*"})
    assert ask(everyone, "star", "127.0.0.9", **{"X-Real-IP": SPOOF}) == SPOOF

    nobody = start_service(env={"FORWARDED_ALLOW_IPS": ""})
    assert ask(nobody, "nobody", "127.0.0.1", **{"X-Real-IP": SPOOF}) == "127.0.0.1"


def test_forwarded_values_do_not_leak_to_the_next_request_on_a_connection(start_service: Start) -> None:
    svc = start_service()
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=10)
    try:
        conn.request("GET", "/api/hello", headers={"X-Request-ID": "first", "X-Real-IP": SPOOF,
                                                   "X-Forwarded-Proto": "https"})
        conn.getresponse().read()
        conn.request("GET", "/api/hello", headers={"X-Request-ID": "second"})
        conn.getresponse().read()
    finally:
        conn.close()
    assert logged_client(svc, "first") == SPOOF
    assert logged_client(svc, "second") == "127.0.0.1"


def test_a_trusted_proxy_naming_no_valid_address_leaves_the_peer(start_service: Start) -> None:
    """Addresses are checked (once per distinct value) before they are believed: a malformed one,
    even from the trusted proxy, does not become the logged client."""
    svc = start_service(env={"FORWARDED_ALLOW_IPS": "127.0.0.2"})
    proxy = "127.0.0.2"
    for n in range(2):  # the second time from the remembered answer
        assert ask(svc, f"bad-real-ip-{n}", proxy, **{"X-Real-IP": "not-an-address"}) == proxy
        assert ask(svc, f"bad-xff-{n}", proxy, **{"X-Forwarded-For": f"{SPOOF}, 999.1.1.1"}) == proxy
        assert ask(svc, f"v6-{n}", proxy, **{"X-Forwarded-For": "2001:db8::7"}) == "2001:db8::7"
