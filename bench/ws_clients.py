"""A load generator for bench/broadcast.py: N idle WebSocket clients in one process, reading.

Each client does the RFC 6455 handshake by hand on a raw asyncio connection, never sends a
frame, and reads (and counts) whatever the server pushes. That is all a ticker client does, and
doing it without a WebSocket library keeps this process cheap: it shares the machine's cores with
the server being measured. It talks to its parent over stdin/stdout, one JSON object per line:

    -> {"opened": 5000, "failed": 0, "seconds": 2.1}     once every client is connected (or failed)
    <- stats                                              any time
    -> {"open": 5000, "frames": 123456, "bytes": 11728320, "latency_ms": {"count": ..., "p50": ...}}
    <- close N                                            close N clients (the server sees them go)
    -> {"open": 4000, ...}
    (stdin closed, or SIGTERM)                            exit

`frames` counts tick events (occurrences of `"tick"`), so a parent can tell how many ticks
reached every client in a window without this process parsing frames. `latency_ms` is receive
time minus the tick's `ts` for the last tick of each read since the previous `stats` (so it
includes this process's own delay in reading: it shares the machine with the server).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import signal
import sys
import time
from typing import cast

import uvloop

MARK = b'"tick"'  # once per tick event, whichever JSON encoder wrote it
TS = b'"ts":'


class Client(asyncio.Protocol):
    def __init__(self, request: bytes, counts: list[int], latencies: list[float]) -> None:
        self.request = request
        self.counts = counts  # [frames, bytes], shared by every client
        self.latencies = latencies  # seconds, shared by every client
        self.upgraded: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.head = b""
        self.tail = b""  # the last bytes of the previous read: a mark may straddle two reads
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's TCPTransport, not a subclass
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if not self.upgraded.done():
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            ok = self.head.startswith(b"HTTP/1.1 101")
            data, self.head = self.head[end + 4:], b""
            self.upgraded.set_result(ok)
            if not ok:
                assert self.transport is not None
                self.transport.close()
                return
        counts = self.counts
        counts[1] += len(data)
        joined = self.tail + data
        counts[0] += joined.count(MARK)
        self.tail = data[-(len(MARK) - 1):] if not data.endswith(b"}") else b""
        start = data.rfind(TS)
        end = data.find(b",", start)
        if start >= 0 and end > 0:
            with contextlib.suppress(ValueError):  # a read that ends inside the number
                self.latencies.append(time.time() - float(data[start + len(TS):end]))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.upgraded.done():
            self.upgraded.set_result(False)


def handshake(host: str, port: int, path: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def open_one(host: str, port: int, path: str, counts: list[int], latencies: list[float],
                   limit: asyncio.Semaphore, timeout: float) -> Client | None:
    loop = asyncio.get_running_loop()
    async with limit:
        try:
            _, client = await asyncio.wait_for(
                loop.create_connection(
                    lambda: Client(handshake(host, port, path), counts, latencies), host, port
                ),
                timeout,
            )
            if await asyncio.wait_for(client.upgraded, timeout):
                return client
            if client.transport is not None:
                client.transport.close()
        except (OSError, TimeoutError):
            pass
    return None


def percentiles(seconds: list[float]) -> dict[str, float]:
    if not seconds:
        return {"count": 0}
    ordered = sorted(seconds)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000.0, 1)

    return {"count": len(ordered), "p50": at(0.50), "p95": at(0.95), "max": at(1.0)}


def say(record: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


async def main_async(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    counts = [0, 0]
    latencies: list[float] = []
    limit = asyncio.Semaphore(args.concurrency)
    started = time.monotonic()
    opened = await asyncio.gather(*(
        open_one(args.host, args.port, args.path, counts, latencies, limit, args.timeout)
        for _ in range(args.count)
    ))
    clients = [c for c in opened if c is not None]
    say({"opened": len(clients), "failed": args.count - len(clients),
         "seconds": round(time.monotonic() - started, 3)})

    done = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, done.set)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def commands() -> None:
        while line := (await reader.readline()).decode().strip():
            if line.startswith("close "):
                for _ in range(min(int(line.split()[1]), len(clients))):
                    client = clients.pop()
                    if client.transport is not None:
                        client.transport.close()
            open_now = sum(1 for c in clients if c.transport is not None and not c.transport.is_closing())
            say({"open": open_now, "frames": counts[0], "bytes": counts[1],
                 "latency_ms": percentiles(latencies)})
            latencies.clear()
        done.set()

    task = asyncio.create_task(commands())
    await done.wait()
    task.cancel()
    for client in clients:
        if client.transport is not None:
            client.transport.abort()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/ws/ticker")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=200, help="handshakes in flight at once")
    parser.add_argument("--timeout", type=float, default=30.0)
    uvloop.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
