"""Malformed and hostile input, straight to the service and through Nginx.

Every case is sent as exact bytes on a raw socket (loadtests/harness/wire.py) and must get its answer
(a 4xx, or the RFC's own 501/505, or a bare close) and a closed connection within a bound: a
connection left open is a failure. After each case every worker is the one that was there
before, /metrics counts no restart, and every line the service wrote is one JSON object. The
docs/hostile-input.md is this file as a table.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from conftest import ServiceProcess
from metrics_client import eventually, scrape
from proxy import Nginx

from loadtests.harness.wire import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_TEXT,
    RawWebSocket,
    Reply,
    close_frame,
    exchange,
    frame,
)

BODY_LIMIT = 4096  # MAX_BODY_SIZE and Nginx's client_max_body_size
HEAD_LIMIT = 8192  # MAX_HEADER_SIZE (Nginx's own: large_client_header_buffers, 8k a line)
WS_LIMIT = 1024  # WS_MAX_MESSAGE_SIZE
DEADLINE = 5.0  # every answer comes at once; this only bounds a failing run
SANE_ID = re.compile(r"[A-Za-z0-9._:+/=-]{1,128}")
BANNER = re.compile(rb"(?i)(nginx|tornado\w*|python)/\d")


@pytest.fixture(scope="module")
def service() -> Iterator[ServiceProcess]:
    svc = ServiceProcess(
        "--max-body-size", str(BODY_LIMIT), "--max-header-size", str(HEAD_LIMIT),
        "--ws-max-message-size", str(WS_LIMIT), "--tick-interval", "0.5",
    )
    svc.start()
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def nginx(service: ServiceProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    proxy = Nginx(tmp_path_factory.mktemp("nginx"), service.port, CLIENT_MAX_BODY_SIZE=str(BODY_LIMIT))
    proxy.start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def workers(service: ServiceProcess) -> dict[int, int]:
    """The workers as they were before the first hostile byte."""
    return service.live_workers()


@pytest.fixture(params=["direct", "nginx"])
def via(request: pytest.FixtureRequest, service: ServiceProcess, nginx: Nginx) -> str:
    return str(request.param)


def port_of(via: str, service: ServiceProcess, nginx: Nginx) -> int:
    return service.port if via == "direct" else nginx.http_port


def assert_unharmed(service: ServiceProcess, workers: dict[int, int]) -> None:
    """Same worker processes as before, no restart counted, the log still one JSON object a line."""
    assert service.live_workers() == workers
    assert scrape(service).total("tornado_worker_restarts_total") == 0
    assert not service.bad_lines, f"non-JSON log lines: {service.bad_lines[:3]}"


# -- HTTP ---------------------------------------------------------------------------------------


def http(head: str, body: bytes = b"", *, close: bool = False) -> bytes:
    """A request from its head (lines joined with CRLF, Host added) and body."""
    lines = head.split("\n")
    lines.insert(1, "Host: 127.0.0.1")
    if close:
        lines.insert(2, "Connection: close")
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body


def chunked(*chunks: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


def post(*headers: str, body: bytes = b"", close: bool = False) -> bytes:
    return http("\n".join(("POST / HTTP/1.1", *headers)), body, close=close)


def chunked_post(body: bytes, close: bool = False) -> bytes:
    return post("Transfer-Encoding: chunked", body=body, close=close)


SMUGGLED = b"GET /api/hello HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
END_AND_SMUGGLED = b"0\r\n\r\n" + SMUGGLED  # an empty chunked body, then a request of its own


def smuggle(*headers: str) -> bytes:
    return post(*headers, body=END_AND_SMUGGLED)


def upgrade(*headers: str, version: str = "1.1") -> bytes:
    """A WebSocket handshake with `headers` (the valid key and version unless given)."""
    names = {h.split(":")[0] for h in headers}
    key = [] if "Sec-WebSocket-Key" in names else ["Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="]
    ws_version = [] if "Sec-WebSocket-Version" in names else ["Sec-WebSocket-Version: 13"]
    lines = [f"GET /ws/echo HTTP/{version}", "Upgrade: websocket", "Connection: Upgrade", *key, *ws_version]
    return http("\n".join([*lines, *headers]))


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    direct: tuple[int, ...]  # status of every response, in order; () is a close without an answer
    nginx: tuple[int, ...]


TOO_LONG = "a" * HEAD_LIMIT
CASES = [
    # The request line.
    Case("garbage", b"GARBAGE\r\n\r\n", (400,), (400,)),
    Case("extra token", http("GET / HTTP/1.1 extra"), (400,), (400,)),
    Case("no version (HTTP/0.9)", b"GET /\r\n\r\n", (400,), ()),
    Case("unknown version", http("GET / HTTP/9.9"), (400,), (505,)),
    Case("not HTTP", http("GET / FOO/1.1"), (400,), (400,)),
    Case("NUL in the method", http("G\x00T / HTTP/1.1"), (400,), (400,)),
    Case("control character in the target", http("GET /a\x01b HTTP/1.1"), (400,), (400,)),
    Case("space in the target", http("GET /a b HTTP/1.1"), (400,), (400,)),
    Case("request line over the head limit", http(f"GET /{TOO_LONG} HTTP/1.1"), (), (414,)),
    Case("TLS handshake on the plain port", b"\x16\x03\x01\x02\x00\x01\x00\r\n\r\n", (400,), (400,)),
    # Header lines. Nginx drops a header line it cannot use (ignore_invalid_headers) and serves the rest.
    Case("header without a colon", http("GET / HTTP/1.1\nX-A", close=True), (400,), (200,)),
    Case("space in a header name", http("GET / HTTP/1.1\nX A: 1"), (400,), (400,)),
    Case("space before the colon", http("GET / HTTP/1.1\nX-A : 1"), (400,), (400,)),
    Case("folded header (obs-fold)", http("GET / HTTP/1.1\nX-A: 1\n 2"), (400,), (400,)),
    Case("NUL in a header value", http("GET / HTTP/1.1\nX-A: a\x00b"), (400,), (400,)),
    Case("bare CR in a header value", http("GET / HTTP/1.1\nX-A: a\rb"), (400,), (400,)),
    Case("non-ASCII header name", http("GET / HTTP/1.1\nX-\xff: 1", close=True), (400,), (200,)),
    Case("header over the head limit", http(f"GET / HTTP/1.1\nX-A: {TOO_LONG}"), (), (400,)),
    Case("1,000 headers", http("GET / HTTP/1.1\n" + "\n".join(f"X-{i}: 1" for i in range(1000))), (), (400,)),
    Case("no Host in HTTP/1.1", b"GET / HTTP/1.1\r\n\r\n", (400,), (400,)),
    Case("two Host headers", http("GET / HTTP/1.1\nHost: other"), (400,), (400,)),
    # Content-Length.
    Case("Content-Length not a number", post("Content-Length: abc"), (400,), (400,)),
    Case("negative Content-Length", post("Content-Length: -1"), (400,), (400,)),
    Case("Content-Length with a sign", post("Content-Length: +3", body=b"abc"), (400,), (400,)),
    Case("Content-Length over 2^64", post("Content-Length: " + "9" * 30), (400,), (400,)),
    Case("Content-Length with a space", post("Content-Length: 1 0", body=b"0" * 10), (400,), (400,)),
    Case("two different Content-Lengths", post("Content-Length: 3", "Content-Length: 4", body=b"abcd"),
         (400,), (400,)),
    Case("Content-Length list", post("Content-Length: 3, 4", body=b"abcd"), (400,), (400,)),
    Case("body over MAX_BODY_SIZE", post(f"Content-Length: {BODY_LIMIT + 1}", body=b"x" * (BODY_LIMIT + 1)),
         (400,), (413,)),
    # Chunked bodies.
    Case("chunked body over MAX_BODY_SIZE", chunked_post(chunked(*[b"x" * 1024] * 5)), (400,), (413,)),
    Case("one chunk over MAX_BODY_SIZE", chunked_post(chunked(b"x" * 2 * BODY_LIMIT)), (400,), (413,)),
    Case("chunk size not hex", chunked_post(b"zz\r\nabc\r\n0\r\n\r\n"), (400,), (400,)),
    Case("chunk size 0x3", chunked_post(b"0x3\r\nabc\r\n0\r\n\r\n"), (400,), (400,)),
    Case("negative chunk size", chunked_post(b"-3\r\nabc\r\n0\r\n\r\n"), (400,), (400,)),
    Case("chunk size with a sign", chunked_post(b"+3\r\nabc\r\n0\r\n\r\n"), (400,), (400,)),
    Case("chunk size over 2^64", chunked_post(b"f" * 24 + b"\r\nabc\r\n0\r\n\r\n"), (400,), (400,)),
    Case("chunk longer than its size", chunked_post(b"3\r\nabcXX0\r\n\r\n"), (400,), (400,)),
    Case("chunk shorter than its size", chunked_post(b"5\r\nabc\r\n0\r\n\r\n"), (400,), (400,)),
    Case("space before the chunk size", chunked_post(b" 3\r\nabc\r\n0\r\n\r\n"), (400,), (400,)),
    # Valid (RFC 9112 7.1.1: unknown extensions are ignored), but Tornado refuses it; Nginx drops
    # extensions and trailers (it sends the body on with a Content-Length).
    Case("chunk extension", chunked_post(b"3;x=y\r\nabc\r\n0\r\n\r\n", close=True), (400,), (405,)),
    Case("trailer without a colon", chunked_post(b"3\r\nabc\r\n0\r\nbad trailer\r\n\r\n", close=True),
         (400,), (405,)),
    # Smuggling: a second request hidden in the first must never be answered.
    Case("CL.TE", smuggle("Content-Length: 5", "Transfer-Encoding: chunked"), (400,), (400,)),
    Case("TE.CL", post("Transfer-Encoding: chunked", "Content-Length: 4",
                       body=chunked(SMUGGLED)), (400,), (400,)),
    Case("TE: xchunked", smuggle("Transfer-Encoding: xchunked"), (400,), (501,)),
    Case("TE: chunked, identity", smuggle("Transfer-Encoding: chunked, identity"), (400,), (501,)),
    Case("TE: identity", post("Transfer-Encoding: identity", body=SMUGGLED), (400,), (501,)),
    Case("TE: gzip, chunked", smuggle("Transfer-Encoding: gzip, chunked"), (400,), (501,)),
    Case("TE twice", smuggle("Transfer-Encoding: chunked", "Transfer-Encoding: chunked"), (400,), (400,)),
    Case("TE: chunked, then TE: cow", smuggle("Transfer-Encoding: chunked", "Transfer-Encoding: cow"),
         (400,), (400,)),
    Case("TE with a space before the colon", smuggle("Transfer-Encoding : chunked"), (400,), (400,)),
    Case("TE with a vertical tab", smuggle("Transfer-Encoding:\x0bchunked"), (400,), (501,)),
    Case("TE quoted", smuggle('Transfer-Encoding: "chunked"'), (400,), (501,)),
    Case("TE folded (obs-fold)", smuggle("Transfer-Encoding: x\n chunked"), (400,), (400,)),
    Case("TE in HTTP/1.0 (the connection closes after it)",
         http("POST / HTTP/1.0\nTransfer-Encoding: chunked", END_AND_SMUGGLED), (405,), (400,)),
    # Tab is whitespace, coding names ignore case, a bare LF ends a line: both sides read these as
    # chunked, so each request is answered once.
    Case("TE with a tab", smuggle("Transfer-Encoding:\tchunked"), (405, 200), (501,)),
    Case("TE: CHUNKED", smuggle("Transfer-Encoding: CHUNKED"), (405, 200), (405, 200)),
    Case("bare LF before TE",
         smuggle("X-A: 1\nTransfer-Encoding: chunked").replace(b"X-A: 1\r\n", b"X-A: 1\n"),
         (405, 200), (405, 200)),
    Case("GET with a request as its body",
         http(f"GET /api/hello HTTP/1.1\nContent-Length: {len(SMUGGLED)}", SMUGGLED, close=True),
         (200,), (200,)),
    # The WebSocket handshake (RFC 6455 4.2.1). A refused handshake leaves the connection usable:
    # the plain request after it is answered too.
    Case("WebSocket upgrade over HTTP/1.0", upgrade(version="1.0"), (400,), (400,)),
    Case("WebSocket with an empty key", upgrade("Sec-WebSocket-Key:") + SMUGGLED, (400, 200), (400, 200)),
    Case("WebSocket key not 16 bytes", upgrade("Sec-WebSocket-Key: abc") + SMUGGLED, (400, 200), (400, 200)),
    Case("WebSocket version 12", upgrade("Sec-WebSocket-Version: 12") + SMUGGLED, (426, 200), (426, 200)),
    Case("WebSocket path without Upgrade", http("GET /ws/echo HTTP/1.1") + SMUGGLED, (400, 200), (400, 200)),
    Case("WebSocket from a foreign Origin", upgrade("Origin: http://evil.example") + SMUGGLED,
         (403, 200), (403, 200)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_malformed_http_is_refused_at_once(
    case: Case, via: str, service: ServiceProcess, nginx: Nginx, workers: dict[int, int]
) -> None:
    reply = exchange(port_of(via, service, nginx), case.data, timeout=DEADLINE)
    expected = case.direct if via == "direct" else case.nginx
    assert reply.closed, f"connection left open after {reply.data[:200]!r}"
    assert tuple(reply.statuses) == expected, reply.data[:300]
    assert_no_banner(reply, via)
    if via == "direct":
        for response in reply.responses:  # the service's answers are JSON (Tornado's bare 400 has no body)
            if response.status >= 400 and response.body:
                assert json.loads(response.body)["status"] == response.status
        if 426 in expected:
            assert reply.responses[0].headers["sec-websocket-version"] == "13"
    assert_unharmed(service, workers)


def assert_no_banner(reply: Reply, via: str) -> None:
    """No product version anywhere: not in a Server header, not in an error page."""
    assert not BANNER.search(reply.data), reply.data[:300]
    for response in reply.responses:
        if via == "direct":
            assert "server" not in response.headers
        else:
            assert response.headers.get("server") == "nginx"


def test_pipelined_requests_are_each_answered(
    via: str, service: ServiceProcess, nginx: Nginx, workers: dict[int, int]
) -> None:
    """The control for the smuggling cases: two honest requests in one write get two answers."""
    data = http("GET /api/hello HTTP/1.1") + SMUGGLED
    reply = exchange(port_of(via, service, nginx), data, timeout=DEADLINE)
    assert reply.closed and reply.statuses == [200, 200]
    assert_unharmed(service, workers)


# -- X-Request-ID -------------------------------------------------------------------------------

HOSTILE_IDS = [
    'quote"inside', "back\\slash", '{"json":1}', "</script><script>", "' OR 1=1 --", "%0d%0aSet-Cookie:x",
    "tab\tinside", "latin-1 \xe9", "a,b", "x" * 129, "x" * 4000, '","level":"critical","event":"forged',
]
# Not allowed in a header value: Tornado answers 400; Nginx refuses NUL and CR too, but passes
# other control characters, and then replaces the id like any other insane one.
REFUSED_IDS = {
    "nul\x00": (400, 400), "bare\rcr": (400, 400), "del\x7f": (400, 200), "esc\x1b[31m": (400, 200),
}


@pytest.mark.parametrize("given", HOSTILE_IDS + list(REFUSED_IDS), ids=repr)
def test_hostile_request_ids_are_replaced_not_logged(
    given: str, via: str, service: ServiceProcess, nginx: Nginx, workers: dict[int, int]
) -> None:
    data = http("GET /api/hello HTTP/1.1\nX-Request-ID: " + given, close=True)
    reply = exchange(port_of(via, service, nginx), data, timeout=DEADLINE)
    assert reply.closed
    direct, proxied = REFUSED_IDS.get(given, (200, 200))
    if (direct if via == "direct" else proxied) == 400:
        assert reply.statuses == [400]
    else:
        [response] = reply.responses
        assert response.status == 200
        rid = response.headers["x-request-id"]
        assert SANE_ID.fullmatch(rid) and rid != given
        line = service.wait_for(lambda e: e.get("event") == "request" and e.get("request_id") == rid)
        assert line["path"] == "/api/hello"
        if via == "nginx":
            assert nginx.log_line(rid)["status"] == 200  # Nginx's own log parses as JSON, line by line
    assert not any(given in str(value) for event in service.events for value in event.values())
    assert_unharmed(service, workers)


def test_a_long_id_is_cut_by_the_head_limit(
    via: str, service: ServiceProcess, nginx: Nginx, workers: dict[int, int]
) -> None:
    data = http("GET /api/hello HTTP/1.1\nX-Request-ID: " + "x" * HEAD_LIMIT, close=True)
    reply = exchange(port_of(via, service, nginx), data, timeout=DEADLINE)
    assert reply.closed and reply.statuses == ([] if via == "direct" else [400])
    assert_unharmed(service, workers)


def test_no_log_line_is_longer_than_pipe_buf(service: ServiceProcess, workers: dict[int, int]) -> None:
    """Lines up to PIPE_BUF are written whole (service/telemetry/logs.py); longer ones can mix."""
    mark = len(service.events)
    long_request = http("GET /" + "p" * 3000 + " HTTP/1.1\nUser-Agent: " + "u" * 3000, close=True)
    bad_version = b"GET / HTTP/1.1" + b"v" * 5000 + b"\r\nHost: x\r\n\r\n"
    for data in (long_request, bad_version):
        assert exchange(service.port, data, timeout=DEADLINE).closed
    service.wait_for(lambda e: e.get("event") == "request" and e["path"].startswith("/ppp"), after=mark)
    lengths = [len(json.dumps(e, separators=(",", ":")).encode()) for e in service.events[mark:]]
    assert max(lengths) <= 4096, lengths
    assert_unharmed(service, workers)


# -- WebSocket frames ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WsCase:
    name: str
    frames: tuple[bytes, ...]
    code: int | None  # the close code the server must send before it closes the connection


WS_CASES = [
    WsCase("unmasked frame", (frame(OP_TEXT, b"hi", mask=False),), 1002),
    WsCase("RSV1 without an extension", (frame(OP_TEXT, b"hi", rsv=4),), 1002),
    WsCase("RSV2 and RSV3", (frame(OP_BINARY, b"hi", rsv=3),), 1002),
    WsCase("unknown data opcode 0x3", (frame(0x3, b"hi"),), 1002),
    WsCase("unknown control opcode 0xB", (frame(0xB, b"hi"),), 1002),
    WsCase("fragmented ping", (frame(OP_PING, b"hi", fin=False),), 1002),
    WsCase("ping of 126 bytes", (frame(OP_PING, b"x" * 126),), 1002),
    WsCase("close of 126 bytes", (frame(OP_CLOSE, struct.pack("!H", 1000) + b"x" * 124),), 1002),
    WsCase("continuation without a start", (frame(OP_CONTINUATION, b"hi"),), 1002),
    WsCase("new message inside a fragmented one",
           (frame(OP_TEXT, b"a", fin=False), frame(OP_TEXT, b"b")), 1002),
    WsCase("text not UTF-8", (frame(OP_TEXT, b"ok \xff\xfe"),), 1007),
    WsCase("text not UTF-8 across fragments",
           (frame(OP_TEXT, b"caf\xc3", fin=False), frame(OP_CONTINUATION, b"(")), 1007),
    WsCase("close with a 1-byte body", (frame(OP_CLOSE, b"\x03"),), 1002),
    *[WsCase(f"close code {code}", (close_frame(code),), 1002)
      for code in (0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535)],
    WsCase("close reason not UTF-8", (close_frame(1000, b"bye \xff"),), 1007),
    WsCase("message over the limit", (frame(OP_TEXT, b"x" * (WS_LIMIT + 1)),), 1009),
    WsCase("fragments over the limit",
           (frame(OP_BINARY, b"x" * 600, fin=False), frame(OP_CONTINUATION, b"x" * 600)), 1009),
    WsCase("length of 2^62 announced", (bytes([0x82, 0x80 | 127]) + struct.pack("!Q", 1 << 62),), 1009),
    # Valid closes are answered with the same code (the closing handshake), then the TCP close.
    *[WsCase(f"valid close code {code}", (close_frame(code, b"bye"),), code)
      for code in (1000, 1001, 3000, 4999)],
    WsCase("close without a code", (close_frame(),), None),
]


@pytest.mark.parametrize("case", WS_CASES, ids=[c.name for c in WS_CASES])
def test_invalid_websocket_frames_fail_the_connection(
    case: WsCase, via: str, service: ServiceProcess, nginx: Nginx, workers: dict[int, int]
) -> None:
    rid = f"ws-{via}-{abs(hash(case.name)):x}"
    with RawWebSocket(port_of(via, service, nginx), request_id=rid, timeout=DEADLINE) as ws:
        assert ws.roundtrip(b"hello") == b"hello"  # a working socket first
        ws.send(*case.frames)
        outcome = ws.outcome()
    assert outcome.closed, "the server left the connection open"
    assert outcome.messages == [], "nothing of an invalid message may reach the handler (echo)"
    # a server may ping whenever it likes (the worker's pinger), so pings are not part of the answer
    assert [op for op, _ in outcome.frames if op != OP_PING] == [OP_CLOSE]
    assert outcome.close_code == case.code
    if case.code in (1002, 1007):
        line = service.wait_for(lambda e: e.get("event") == "websocket protocol error"
                                and e["request_id"] == rid)
        assert line["code"] == case.code and line["handler"] == "ws_echo"
    eventually(service, lambda s: s.total("tornado_websocket_connections_open") == 0)
    assert_unharmed(service, workers)


def test_valid_fragments_and_control_frames_still_pass(
    via: str, service: ServiceProcess, nginx: Nginx, workers: dict[int, int]
) -> None:
    """The guard refuses only what the RFC refuses: a message in fragments with a ping between."""
    with RawWebSocket(port_of(via, service, nginx), timeout=DEADLINE) as ws:
        ws.send(frame(OP_TEXT, b"caf", fin=False), frame(OP_PING, b"p"),
                frame(OP_CONTINUATION, "é ✓".encode()))
        assert ws.roundtrip(b"next") == "café ✓".encode()
        ws.send(frame(OP_BINARY, b"\xff\xfe"))  # binary is not UTF-8 and need not be
        ws.send(close_frame(1000))
        outcome = ws.outcome()
    assert outcome.closed and outcome.close_code == 1000
    assert (OP_BINARY, b"\xff\xfe") in outcome.frames
    assert_unharmed(service, workers)


def test_the_ticker_socket_is_guarded_too(
    via: str, service: ServiceProcess, nginx: Nginx, workers: dict[int, int]
) -> None:
    with RawWebSocket(port_of(via, service, nginx), "/ws/ticker", timeout=DEADLINE) as ws:
        ws.send(frame(OP_TEXT, b"hi", mask=False))
        outcome = ws.outcome()
    assert outcome.closed and outcome.close_code == 1002
    assert_unharmed(service, workers)
