"""RFC 6455 where Tornado's WebSocket server falls short of it: every protocol error a closed socket.

Tornado 6.6 (pinned in constraints.txt; tests/test_hostile.py pins what it does):

- accepts a client frame that is not masked and hands it to `on_message`; section 5.1 says the
  server MUST close the connection;
- echoes whatever close code a client sends, also ones outside the ranges of section 7.4 (0-999,
  1004, 1016-2999, 5000 and up) and the three that MUST NOT be sent in a frame (1005, 1006,
  1015), and answers a close frame with a 1-byte body (no code, section 5.5.1) like an empty one;
- lets a close reason that is not UTF-8 escape its frame loop as a UnicodeDecodeError;
- fails every other protocol error with a bare TCP close. Allowed ("Fail the WebSocket
  Connection", section 7.1.7), but the RFC asks for a close frame first;
- upgrades an HTTP/1.0 request, and one whose Sec-WebSocket-Key is not the base64 of 16 bytes
  (section 4.2.1: the server MUST answer such a handshake with an error such as 400);
- refuses a bad handshake (no Upgrade, no Connection: Upgrade, a foreign Origin, another
  version) with a plain-text body, where every other error of the service is JSON.

Here each of those fails the connection the same way Tornado's own 1009 ("message too big")
does: a close frame with 1002 (protocol error) or 1007 (text or close reason not UTF-8), one
warning log line, and the TCP connection closed at once (no wait for the client's close). The
frame header is checked when its first two bytes are read, before any payload is. A bad
handshake gets a JSON 400 (403 for the Origin, 426 with `Sec-WebSocket-Version: 13`).

Tornado has no public hook for this, so `GuardedProtocol` overrides three private methods of
`WebSocketProtocol13` (`_receive_frame`, `_read_bytes`, `_handle_message`): an upgrade of Tornado
must keep tests/test_hostile.py passing, as for server.py's use of `_ProxyAdapter`.
"""

from __future__ import annotations

import base64
import binascii
import struct
from asyncio import Future
from collections.abc import Coroutine
from typing import Any

from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketHandler, WebSocketProtocol, WebSocketProtocol13

from service.http.errors import ApiError, error_json
from service.telemetry import logs

_log = logs.get_logger("service.wsguard")

PROTOCOL_ERROR = 1002
INVALID_DATA = 1007

_FIN, _RSV, _RSV1, _OPCODE = 0x80, 0x70, 0x40, 0x0F
_MASKED, _LENGTH = 0x80, 0x7F
_CONTINUATION, _TEXT, _BINARY, _CLOSE, _PING, _PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_KNOWN_OPCODES = frozenset({_CONTINUATION, _TEXT, _BINARY, _CLOSE, _PING, _PONG})


def valid_close_code(code: int) -> bool:
    """A code a peer may send in a close frame: RFC 6455's 1000-1003 and 1007-1011, IANA's
    1012-1014, and 3000-4999 (libraries, applications). 1005, 1006, 1015 are never sent."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def header_problem(first: int, second: int, in_message: bool, rsv1_allowed: bool = False) -> str | None:
    """What is wrong with a client frame whose header starts with these two bytes, or None.

    `in_message`: a fragmented data message was started and not finished; `rsv1_allowed`:
    permessage-deflate was negotiated (RSV1 then marks a compressed message's first frame).
    """
    opcode = first & _OPCODE
    if not second & _MASKED:
        return "client frame not masked"
    rsv = first & _RSV
    if rsv1_allowed and opcode != _CONTINUATION:
        rsv &= ~_RSV1
    if rsv:
        return "reserved bits set without an extension"
    if opcode not in _KNOWN_OPCODES:
        return f"unknown opcode {opcode:#x}"
    if opcode & 0x8:
        if not first & _FIN:
            return "fragmented control frame"
        if second & _LENGTH > 125:
            return "control frame payload over 125 bytes"
    elif opcode == _CONTINUATION:
        if not in_message:
            return "continuation frame with no message to continue"
    elif in_message:
        return "new data frame inside a fragmented message"
    return None


def key_problem(key: str) -> str | None:
    """What is wrong with a handshake's Sec-WebSocket-Key (base64 of 16 bytes), or None."""
    try:
        decoded = base64.b64decode(key.strip(), validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    return None if len(decoded) == 16 else "Sec-WebSocket-Key must be the base64 of 16 bytes"


def close_problem(payload: bytes) -> tuple[int, str] | None:
    """The close code and reason to fail with for a client's close frame body, or None if valid."""
    if not payload:
        return None
    if len(payload) == 1:
        return PROTOCOL_ERROR, "close frame with a 1-byte body"
    code = struct.unpack("!H", payload[:2])[0]
    if not valid_close_code(code):
        return PROTOCOL_ERROR, f"invalid close code {code}"
    try:
        payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        return INVALID_DATA, "close reason not UTF-8"
    return None


class GuardedProtocol(WebSocketProtocol13):
    """Tornado's server side of RFC 6455, failing every protocol error with a close frame."""

    # The next read is a frame's first two bytes. The one attribute this class adds: Tornado's
    # protocol object already has 29, and past 30 CPython gives each instance a dict of its own
    # (about 1.3 KiB a socket). Whether a fragmented message is open is Tornado's own
    # `_fragmented_message_buffer` (None between messages), not a second flag.
    _frame_start = False

    async def _receive_frame(self) -> None:
        self._frame_start = True
        await super()._receive_frame()

    def _read_bytes(self, n: int) -> Coroutine[Any, Any, bytes]:
        """Tornado's own read, except that a frame's first two bytes are checked as they arrive
        (no coroutine of ours around the other reads: this runs three or four times a frame)."""
        if self._frame_start:
            self._frame_start = False
            return self._read_header(n)
        return super()._read_bytes(n)

    async def _read_header(self, n: int) -> bytes:
        data = await super()._read_bytes(n)
        first, second = data[0], data[1]
        in_message = self._fragmented_message_buffer is not None
        problem = header_problem(first, second, in_message, rsv1_allowed=self._decompressor is not None)
        if problem is not None:
            self._fail(PROTOCOL_ERROR, problem)
        return data

    def _handle_message(self, opcode: int, data: bytes) -> Future[None] | None:
        if not self.client_terminated:
            if opcode == _CLOSE:
                problem = close_problem(data)
                if problem is not None:
                    self._fail(*problem)
            elif opcode == _TEXT and not self._frame_compressed:
                try:
                    data.decode("utf-8")
                except UnicodeDecodeError:
                    self._fail(INVALID_DATA, "text message not UTF-8")
        return super()._handle_message(opcode, data)

    def _fail(self, code: int, reason: str) -> None:
        """Close frame, TCP close, and out of the frame loop (which ends on StreamClosedError)."""
        handler = self.handler
        _log.warning(
            "websocket protocol error", code=code, reason=reason,
            handler=getattr(handler, "route", None), request_id=getattr(handler, "request_id", None),
        )
        self.close(code, reason)
        self._abort()
        raise StreamClosedError()


class GuardedWebSocketHandler(WebSocketHandler):
    """A WebSocketHandler that checks the handshake as RFC 6455 asks, answers a refused one in
    JSON, and whose connections are `GuardedProtocol`s."""

    async def get(self, *args: Any, **kwargs: Any) -> None:
        headers = self.request.headers
        if headers.get("Upgrade", "").lower() == "websocket":  # else Tornado's own 400 says so
            if self.request.version == "HTTP/1.0":
                raise ApiError(400, "a WebSocket handshake needs HTTP/1.1")
            problem = key_problem(headers.get("Sec-WebSocket-Key", ""))
            if problem is not None:
                raise ApiError(400, problem)
        await super().get(*args, **kwargs)

    def finish(self, chunk: str | bytes | dict[str, Any] | None = None) -> Future[None]:
        """Tornado's own handshake refusals finish with a plain-text message (or none, the 426):
        the same JSON as every other error instead. Errors of the service itself are bytes."""
        status = self.get_status()
        if status >= 400 and (chunk is None or isinstance(chunk, str)):
            self.set_header("Content-Type", "application/json")
            chunk = error_json(status, message=chunk or None)
        return super().finish(chunk)

    def get_websocket_protocol(self) -> WebSocketProtocol | None:
        protocol = super().get_websocket_protocol()
        if type(protocol) is WebSocketProtocol13:
            return GuardedProtocol(self, protocol.mask_outgoing, protocol.params)
        return protocol
