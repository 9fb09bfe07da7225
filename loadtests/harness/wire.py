"""Exact bytes to a server and what came back: raw HTTP/1.x and WebSocket frames on a socket, for
hostile-input, slow-client and exposure tests, and for load tests that need a client no library
would be (one that misbehaves on purpose).

Nothing here waits without a bound: a reply is read until the server closes the connection or a
deadline passes, and a connection the server left open past it is reported (`closed` false), not
waited on. Loopback only: every function connects to 127.0.0.1.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import socket
import struct
import time
from dataclasses import dataclass, field

OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class Reply:
    """Everything the server sent on one connection, and whether it closed it in time."""

    data: bytes
    closed: bool  # the server closed the connection (FIN or RST) before the deadline
    reset: bool = False  # ... with an RST (data it had not read yet, or a hard abort)

    @property
    def responses(self) -> list[Response]:
        return parse_responses(self.data)

    @property
    def statuses(self) -> list[int]:
        return [r.status for r in self.responses]


_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})[^\r\n]*\r\n")


def parse_responses(data: bytes) -> list[Response]:
    """The HTTP/1.x responses in `data`, one after the other (Content-Length or chunked bodies);
    stops at the first thing that is not a whole response."""
    found: list[Response] = []
    rest = data
    while rest:
        match = _STATUS_LINE.match(rest)
        end = rest.find(b"\r\n\r\n")
        if match is None or end < 0:
            break
        status = int(match.group(1))
        headers: dict[str, str] = {}
        for line in rest[match.end():end].split(b"\r\n"):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        rest = rest[end + 4:]
        if status in (101, 204, 304) or 100 <= status < 200:
            body = b""
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body, rest = _unchunk(rest)
        elif "content-length" in headers:
            length = int(headers["content-length"])
            body, rest = rest[:length], rest[length:]
        else:  # read until close
            body, rest = rest, b""
        found.append(Response(status, headers, body))
    return found


def _unchunk(data: bytes) -> tuple[bytes, bytes]:
    body = b""
    while True:
        line_end = data.find(b"\r\n")
        if line_end < 0:
            return body, b""
        size = int(data[:line_end].split(b";")[0], 16)
        data = data[line_end + 2:]
        if size == 0:
            trailer_end = data.find(b"\r\n")
            return body, data[trailer_end + 2:] if trailer_end >= 0 else b""
        body, data = body + data[:size], data[size + 2:]


def read_until_closed(sock: socket.socket, timeout: float) -> Reply:
    """Read until the peer closes or `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    data = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return Reply(bytes(data), closed=False)
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return Reply(bytes(data), closed=False)
        except ConnectionResetError:
            return Reply(bytes(data), closed=True, reset=True)
        if not chunk:
            return Reply(bytes(data), closed=True)
        data += chunk


def exchange(port: int, *pieces: bytes, timeout: float = 5.0, pause: float = 0.0) -> Reply:
    """Send `pieces` on one new connection (`pause` seconds apart), then read until the server
    closes it or `timeout` passes. The server may close before it has read everything: sending
    stops then, and what it answered is still read."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for index, piece in enumerate(pieces):
            if index and pause:
                time.sleep(pause)
            try:
                sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                break
        return read_until_closed(sock, timeout)


# -- WebSocket ----------------------------------------------------------------------------------


def frame(
    opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, mask: bool = True,
) -> bytes:
    """One WebSocket frame as a client would send it (masked unless `mask` is false); `rsv` is the
    three reserved bits (0..7), any `opcode` 0..15 goes, and control frames may be as long as asked."""
    head = bytes([(0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 0xF)])
    mask_bit = 0x80 if mask else 0
    length = len(payload)
    if length < 126:
        head += bytes([mask_bit | length])
    elif length < 1 << 16:
        head += bytes([mask_bit | 126]) + struct.pack("!H", length)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", length)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def close_frame(code: int | None = None, reason: bytes = b"") -> bytes:
    payload = b"" if code is None else struct.pack("!H", code) + reason
    return frame(OP_CLOSE, payload)


@dataclass
class WsOutcome:
    """How a WebSocket connection ended: the server's frames, its close code, the TCP close."""

    frames: list[tuple[int, bytes]] = field(default_factory=list)  # (opcode, payload) from the server
    closed: bool = False  # the server closed the TCP connection before the deadline
    leftover: bytes = b""  # bytes after the last whole frame

    @property
    def close_code(self) -> int | None:
        """The code of the server's close frame; None without one (a bare TCP close) or without a code."""
        for opcode, payload in self.frames:
            if opcode == OP_CLOSE:
                return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
        return None

    @property
    def messages(self) -> list[bytes]:
        return [payload for opcode, payload in self.frames if opcode in (OP_TEXT, OP_BINARY)]


def parse_frames(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """Unmasked (server) frames from `data`; the rest that is not a whole frame."""
    frames: list[tuple[int, bytes]] = []
    while len(data) >= 2:
        opcode, length, offset = data[0] & 0xF, data[1] & 0x7F, 2
        if length == 126:
            if len(data) < 4:
                break
            length, offset = struct.unpack("!H", data[2:4])[0], 4
        elif length == 127:
            if len(data) < 10:
                break
            length, offset = struct.unpack("!Q", data[2:10])[0], 10
        if data[1] & 0x80:
            offset += 4  # a masked frame from a server is itself an error; skip the key anyway
        if len(data) < offset + length:
            break
        frames.append((opcode, data[offset:offset + length]))
        data = data[offset + length:]
    return frames, data


class RawWebSocket:
    """A WebSocket client that sends whatever bytes it is told to, for protocol-error tests."""

    def __init__(
        self, port: int, path: str = "/ws/echo", timeout: float = 5.0, request_id: str | None = None
    ) -> None:
        self.timeout = timeout
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16)).decode()
        extra = f"X-Request-ID: {request_id}\r\n" if request_id else ""
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"{extra}\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            head += chunk
        head, _, self._buffer = head.partition(b"\r\n\r\n")
        self.handshake = head.decode("latin-1")
        if not self.handshake.startswith("HTTP/1.1 101"):
            self.sock.close()
            raise AssertionError(f"no WebSocket upgrade: {self.handshake!r}")

    def __enter__(self) -> RawWebSocket:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, *data: bytes) -> None:
        """Send bytes as they are; a server that already closed is not an error here."""
        for piece in data:
            try:
                self.sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                return

    def roundtrip(self, message: bytes) -> bytes:
        """Send a text message and read one whole data frame back (the echo)."""
        self.send(frame(OP_TEXT, message))
        deadline = time.monotonic() + self.timeout
        while True:
            frames, rest = parse_frames(self._buffer)
            data = [payload for opcode, payload in frames if opcode in (OP_TEXT, OP_BINARY)]
            if data:
                self._buffer = rest
                return data[0]
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError("closed before the echo came back")
            self._buffer += chunk

    def outcome(self, timeout: float | None = None) -> WsOutcome:
        """Read until the server closes the TCP connection (or the deadline); never answers a
        close frame, so a server that fails the connection must close it by itself."""
        reply = read_until_closed(self.sock, self.timeout if timeout is None else timeout)
        frames, rest = parse_frames(self._buffer + reply.data)
        return WsOutcome(frames=frames, closed=reply.closed, leftover=rest)
