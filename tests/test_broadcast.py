"""The tick fan-out and the sockets' keep-alive, against the real service.

A tick is framed once per worker and the same bytes are sent on every ticker socket
(service/ws/frames.py, TickerSocket.push_frame): these read those bytes as a client gets them, with
several sockets on one worker, sockets that vanish while ticks go out, a reader that stops
reading, and a peer that never answers a ping. No timing is asserted: waits are bounded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any

import wsclient
from conftest import ServiceProcess
from metrics_client import eventually

Start = Callable[..., ServiceProcess]
TICK_FIELDS = ["type", "seq", "ts", "worker", "interval"]  # and in this order


# -- a raw client: the exact bytes on the wire --------------------------------------------------
@contextlib.contextmanager
def raw_socket(
    port: int, path: str = "/ws/ticker", extensions: str | None = None,
    options: Callable[[socket.socket], None] = lambda _: None,
) -> Iterator[tuple[socket.socket, bytes]]:
    """A WebSocket handshake by hand; yields the socket and the 101's head (what followed it is
    left in the socket's buffer, for `read_frame`)."""
    sock = socket.socket()
    options(sock)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    offer = f"Sec-WebSocket-Extensions: {extensions}\r\n" if extensions else ""
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                  f"{offer}\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:  # byte by byte: not one byte of the first frame is taken
        byte = sock.recv(1)
        assert byte, f"closed during the handshake: {head!r}"
        head += byte
    try:
        yield sock, head
    finally:
        sock.close()


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "the server closed the connection"
        data += chunk
    return data


def read_frame(sock: socket.socket) -> tuple[int, int, bytes]:
    """(first byte, second byte, payload) of the next frame; the server's frames are never masked."""
    first, second = read_exactly(sock, 2)
    size = second & 0x7F
    if size == 126:
        size = struct.unpack("!H", read_exactly(sock, 2))[0]
    elif size == 127:
        size = struct.unpack("!Q", read_exactly(sock, 8))[0]
    assert not second & 0x80, "a server frame must not be masked"
    return first, second, read_exactly(sock, size)


def assert_tick(payload: bytes, worker: int, interval: float) -> dict[str, Any]:
    event = json.loads(payload)
    assert list(event) == TICK_FIELDS, event
    assert event["type"] == "tick" and event["worker"] == worker and event["interval"] == interval
    assert isinstance(event["seq"], int) and isinstance(event["ts"], float)
    return dict(event)


def worker_of(head: bytes) -> int:
    for line in head.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        if name.lower() == "x-worker-id":
            return int(value)
    raise AssertionError(f"no X-Worker-Id in {head!r}")


# -- the tests ----------------------------------------------------------------------------------
def test_ticks_are_well_formed_text_frames_even_when_compression_is_offered(start_service: Start) -> None:
    svc = start_service("--tick-interval", "0.05", workers=1)
    offer = "permessage-deflate; client_max_window_bits"
    with raw_socket(svc.port, extensions=offer) as (sock, head):
        assert head.startswith(b"HTTP/1.1 101")
        assert b"sec-websocket-extensions" not in head.lower(), "the service must not enable compression"
        seqs = []
        for _ in range(5):
            first, second, payload = read_frame(sock)
            assert first == 0x81, f"FIN + text, no RSV bits (no compression): {first:#x}"
            assert second == len(payload) < 126  # a tick fits the 7-bit length
            seqs.append(assert_tick(payload, worker=worker_of(head), interval=0.05)["seq"])
        assert seqs == list(range(seqs[0], seqs[0] + 5)), "every tick, in order"


def test_every_socket_of_a_worker_gets_the_same_ticks_and_a_vanishing_one_harms_none(
    start_service: Start,
) -> None:
    """Sockets reset (RST) by their peer while ticks go out every 10 ms: the fan-out meets them
    mid-tick; the others keep getting every tick, byte for byte the same, and the gauge drops."""
    svc = start_service("--tick-interval", "0.01", workers=1)
    keep, vanish = 8, 24

    async def scenario() -> list[list[dict[str, Any]]]:
        url = svc.url("/ws/ticker", "ws")
        kept = [await wsclient.connect(url) for _ in range(keep)]
        doomed = []
        for _ in range(vanish):
            sock = socket.create_connection(("127.0.0.1", svc.port))
            doomed.append(sock)
            key = base64.b64encode(os.urandom(16)).decode()
            sock.sendall((f"GET /ws/ticker HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade"
                          f"\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        for conn in kept:  # every socket is subscribed by now: ticks flow to all of them
            await conn.read_message()
        await asyncio.sleep(0.3)
        for sock in doomed:  # RST, no close frame: the server learns it from a failing send
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            await asyncio.sleep(0.005)
        received: list[list[dict[str, Any]]] = []
        for conn in kept:
            events = []
            for _ in range(40):
                message = await asyncio.wait_for(conn.read_message(), 10)
                assert isinstance(message, str)
                events.append(json.loads(message))
            received.append(events)
        for conn in kept:
            conn.close()
        return received

    received = wsclient.run(scenario())
    for events in received:
        seqs = [e["seq"] for e in events]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "a socket missed a tick"
        assert all(list(e) == TICK_FIELDS for e in events)
    by_seq: dict[int, dict[str, Any]] = {}
    for event in (e for events in received for e in events):
        assert by_seq.setdefault(event["seq"], event) == event, "one tick, one body, for every socket"
    eventually(svc, lambda s: s.total("tornado_websocket_connections_open", handler="ws_ticker") == 0)
    assert not [e for e in svc.events if e.get("level") in ("error", "critical")]
    assert svc.request("/")[0] == 200


def test_a_ticker_reader_that_stops_reading_is_dropped_and_counted(start_service: Start) -> None:
    """A reader that stops reading: once the kernel's buffers are full, ticks queue in the stream
    until MAX_WRITE_BUFFER, and then the connection is dropped (not a close frame: none fits)."""
    svc = start_service("--tick-interval", "0.01", "--max-write-buffer", "65536", "--ws-ping-interval", "0",
                        workers=1)

    def small_buffers(sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)

    mask = os.urandom(4)
    ping = bytes((0x89, 0x80 | 125)) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(b"p" * 125))
    with raw_socket(svc.port, options=small_buffers) as (sock, head):
        assert head.startswith(b"HTTP/1.1 101")
        # Pongs fill the kernel's buffers in a moment (ticks alone take half a minute): from then on
        # every tick waits in the stream's queue, which MAX_WRITE_BUFFER bounds.
        sock.sendall(ping * 2000)
        line = svc.wait_for(lambda e: e.get("event") == "slow websocket consumer disconnected", 60)
        assert line["handler"] == "ws_ticker" and line["level"] == "warning"
        eventually(svc, lambda s: s.total("tornado_websocket_slow_consumers_total", handler="ws_ticker") == 1)
    eventually(svc, lambda s: s.total("tornado_websocket_connections_open", handler="ws_ticker") == 0)

    async def still_ticking() -> str | bytes | None:
        conn = await wsclient.connect(svc.url("/ws/ticker", "ws"))
        message = await conn.read_message()
        conn.close()
        return message

    message = wsclient.run(still_ticking())
    assert isinstance(message, str) and json.loads(message)["type"] == "tick"


def test_a_peer_that_never_answers_pings_is_closed_and_one_that_does_stays(start_service: Start) -> None:
    """WS_PING_INTERVAL is served by one pinger per worker (service/ws/pinger.py), not by a task per
    socket: pings still go out, and a socket whose ping goes unanswered is closed as Tornado
    closes it (1000, "ping timed out"); a socket that answers is left alone."""
    svc = start_service("--ws-ping-interval", "1", workers=1)

    async def scenario() -> tuple[int, bytes, int, str | bytes | None]:
        answering = await wsclient.connect(svc.url("/ws/echo", "ws"))  # Tornado's client answers pings
        answered: list[bytes] = []
        answering.on_ping = answered.append  # type: ignore[method-assign,assignment]  # told of pings
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((f"GET /ws/echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101")
        ignored = 0
        while True:  # the silent peer: reads every frame, answers none
            first, second = await asyncio.wait_for(reader.readexactly(2), 20)
            payload = await reader.readexactly(second & 0x7F)  # control frames: at most 125 bytes
            if first & 0x0F == 0x9:
                ignored += 1
            elif first & 0x0F == 0x8:
                break
        writer.close()
        while len(answered) < 2:  # pinged again after the silent one was closed: still open
            await asyncio.sleep(0.1)
        await answering.write_message("still here")
        echoed = await asyncio.wait_for(answering.read_message(), 10)
        answering.close()
        return struct.unpack("!H", payload[:2])[0], payload[2:], ignored, echoed

    code, reason, ignored, echoed = wsclient.run(asyncio.wait_for(scenario(), 60))
    assert (code, reason) == (1000, b"ping timed out")
    assert ignored >= 1
    assert echoed == "still here"
