"""WebSocket frames made once and written to many sockets (RFC 6455, section 5.2).

Tornado's `write_message` encodes, frames and schedules a task per call, so a fan-out to N
sockets does that N times for the same bytes. A server's frame depends only on the payload (the
server never masks), so the tick bus builds it once and every socket gets the same `bytes`.

Only for sockets that did not negotiate permessage-deflate: a compressed socket's frame depends
on its own compressor state. This service never enables compression (no handler overrides
`get_compression_options`), and the ticker socket falls back to `write_message` if one ever does.
`send_frame` then sends the frame for less than `IOStream.write` costs (bench/README.md).
"""

from __future__ import annotations

import struct

from tornado.iostream import IOStream

FIN = 0x80
TEXT = 0x1


def text_frame(payload: bytes) -> bytes:
    """One final, unmasked text frame carrying `payload` (UTF-8), as a server sends it.

    Byte for byte what Tornado's own server-side framing writes for the same message
    (tests/test_contracts.py checks it at every length boundary).
    """
    size = len(payload)
    if size < 126:
        header = bytes((FIN | TEXT, size))
    elif size <= 0xFFFF:
        header = struct.pack("!BBH", FIN | TEXT, 126, size)
    else:
        header = struct.pack("!BBQ", FIN | TEXT, 127, size)
    return header + payload


def send_frame(stream: IOStream, frame: bytes) -> None:
    """Sends a prepared frame on a WebSocket's stream; raises as `IOStream.write` does.

    While nothing is queued on the stream (`writing()` is false), the frame goes straight to the
    kernel with one send(2): no future, no callback, nothing kept, where `IOStream.write` makes
    a future per call and schedules its resolution. Whatever is not sent at once (a full socket
    buffer, an error) goes to the stream's own `write`, which queues it, closes the stream on an
    error, and raises StreamBufferFullError past the stream's `max_write_buffer_size`. Once
    anything is queued, every frame goes through `write`, so frames keep their order, and
    Tornado's own frames (pings, pongs, close) written through `write` stay whole.

    Only for a plain TCP `IOStream` (not TLS), as the socket is written directly.
    """
    sock = stream.socket  # None once the stream is closed: `write` raises StreamClosedError then
    if sock is not None and not stream.writing():
        try:
            sent = sock.send(frame)
        except OSError:  # EAGAIN, or the peer is gone: `write` deals with both as it always does
            sent = 0
        if sent == len(frame):
            return
        frame = frame[sent:]
    stream.write(frame)  # its future needs no one: IOStream retrieves its errors itself
