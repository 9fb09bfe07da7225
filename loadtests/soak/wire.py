"""The soak's client side of HTTP/1.1 and RFC 6455, on asyncio streams: thousands of connections
in one process, each error on the wire raised as it is (nothing between the clients and the
socket retries or hides one). loadtests/harness/wire.py is its blocking sibling, for tests that
send exact bytes one connection at a time; this one keeps connections alive, answers pings and
counts ticks, which that one does not need to.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import socket
import struct
from dataclasses import dataclass


class ProtocolError(Exception):
    pass


# What a request or an upgrade on the wire may raise when the other end misbehaves or goes away
# (a failure to count, not a bug of the driver): both the HTTP and the WebSocket clients catch these.
WIRE_ERRORS = (
    OSError,
    asyncio.IncompleteReadError,
    asyncio.LimitOverrunError,
    ProtocolError,
    TimeoutError,
    ValueError,
)


class Refused(Exception):
    """A WebSocket upgrade answered with something other than 101."""

    def __init__(self, status: int, pid: int | None) -> None:
        super().__init__(f"status {status}")
        self.status = status
        self.pid = pid


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def pid(self) -> int | None:
        value = self.headers.get("x-worker-pid", "")
        return int(value) if value.isdigit() else None


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ProtocolError(f"bad status line {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def read_body(reader: asyncio.StreamReader, method: str, status: int, headers: dict[str, str]) -> bytes:
    if method == "HEAD" or status in (204, 304) or status < 200:
        return b""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        chunks: list[bytes] = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass
                return b"".join(chunks)
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    return await reader.read()


def abort_connection(writer: asyncio.StreamWriter | None, rst: bool) -> None:
    """Drop the connection at once: with `rst`, a TCP reset (SO_LINGER 0) instead of a FIN."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if rst and sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def request_bytes(
    method: str, target: str, port: int, body: bytes = b"", close: bool = False, extra: str = ""
) -> bytes:
    head = f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: soak\r\n{extra}"
    if body or method == "POST":
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    if close:
        head += "Connection: close\r\n"
    return head.encode() + b"\r\n" + body


class HttpConnection:
    """One client connection, kept alive between requests unless told otherwise."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.used = 0
        self.pid: int | None = None  # the worker that answered last on it (X-Worker-PID)
        self.answered = False  # whether the current request got any byte back

    async def request(self, method: str, target: str, body: bytes = b"", close: bool = False) -> Response:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
            self.used, self.pid = 0, None
        assert self.reader is not None
        self.answered = False
        self.writer.write(request_bytes(method, target, self.port, body, close))
        await self.writer.drain()
        status, headers = await read_head(self.reader)
        self.answered = True
        response = Response(status, headers, await read_body(self.reader, method, status, headers))
        self.used += 1
        self.pid = response.pid or self.pid
        if close or headers.get("connection", "").lower() == "close":
            await self.close()
        return response

    @property
    def reused(self) -> bool:
        return self.writer is not None and self.used > 0

    def abort(self, rst: bool = False) -> None:
        abort_connection(self.writer, rst)
        self.reader = self.writer = None

    async def close(self) -> None:
        writer, self.reader, self.writer = self.writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 2)


WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TEXT, CLOSE, PING, PONG = 0x1, 0x8, 0x9, 0xA


class WebSocket:
    """A client WebSocket: the handshake, masked frames out, one reader task (`pump`) for frames in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pid: int | None) -> None:
        self.reader = reader
        self.writer = writer
        self.pid = pid
        self.texts = 0
        self.ticks = 0
        self.token = b""
        self.echoed = False
        self.close_code: int | None = None
        self.sent_close = False

    @classmethod
    async def connect(cls, port: int, path: str) -> WebSocket:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            key = base64.b64encode(os.urandom(16))
            extra = (
                f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
                "Sec-WebSocket-Version: 13\r\n"
            )
            writer.write(request_bytes("GET", path, port, extra=extra))
            status, headers = await read_head(reader)
            pid_text = headers.get("x-worker-pid", "")
            pid = int(pid_text) if pid_text.isdigit() else None
            if status != 101:
                raise Refused(status, pid)
            accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest()).decode()
            if headers.get("sec-websocket-accept") != accept:
                raise ProtocolError("bad Sec-WebSocket-Accept")
        except BaseException:
            abort_connection(writer, rst=False)
            raise
        return cls(reader, writer, pid)

    def send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        size = len(payload)
        if size < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
        elif size < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, size)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(head + mask + masked)

    async def pump(self) -> None:
        """Every frame until the server's close frame; answers pings, counts ticks, finds the token."""
        reader = self.reader
        message = b""
        while True:
            first, second = await reader.readexactly(2)
            if second & 0x80:
                raise ProtocolError("the server masked a frame")
            size = second & 0x7F
            if size == 126:
                (size,) = struct.unpack("!H", await reader.readexactly(2))
            elif size == 127:
                (size,) = struct.unpack("!Q", await reader.readexactly(8))
            payload = await reader.readexactly(size)
            opcode = first & 0x0F
            if opcode == PING:
                self.send(PONG, payload)
                continue
            if opcode == PONG:
                continue
            if opcode == CLOSE:
                self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                if not self.sent_close:  # the server closed first: answer, as RFC 6455 says
                    self.send(CLOSE, payload[:2])
                return
            message += payload
            if not first & 0x80:
                continue  # a fragment: the rest follows in continuation frames
            self.texts += 1
            if b'"tick"' in message:
                self.ticks += 1
            if self.token and self.token in message:
                self.echoed = True
            message = b""

    def start_close(self, code: int = 1000) -> None:
        self.sent_close = True
        self.send(CLOSE, struct.pack("!H", code))

    def abort(self, rst: bool = False) -> None:
        abort_connection(self.writer, rst)

    async def finish(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(self.writer.wait_closed(), 2)
