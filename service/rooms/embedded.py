"""The embedded backplane: Unix datagram sockets between the workers of one service.

The design, and why (README.md, Rooms, says the same for operators):

- **One datagram socket per worker**, bound at `BROADCAST_DIR/w<id>.sock`. The supervisor makes
  the directory (mode 0700) before the fork, so every worker, and every worker restarted later,
  knows where the others listen without asking anyone; nothing but this service can write to
  them. The default is a private temporary directory the supervisor removes when it exits.
- **A publish is sent once to every other worker** (each worker keeps one socket connected to
  each other worker's address) and delivered to the publisher's own members at once. So each
  message crosses the bus once per worker, whatever the number of sockets, and needs no process
  besides the service's own: no broker to run, to monitor, or to lose.
- **Why datagrams**, rather than a stream per pair of workers: the kernel keeps message
  boundaries (a datagram is one or more whole records, never half of one) and the order of one
  sender's datagrams; a worker that restarts rebinds the same address and is found by the next
  datagram, with no handshake, reconnect loop or accept loop; a dead or not yet started worker
  costs its peers one failed send(2), not a connection timeout. Unix datagrams are not lost by
  the kernel: a receiver that falls behind makes the send fail with EAGAIN instead (Linux queues
  `net.unix.max_dgram_qlen` datagrams per receiver, 10 by default).
- **Backpressure is bounded and counted.** A datagram that cannot be sent at once is queued for
  that peer (at most QUEUE_RECORDS records or QUEUE_BYTES bytes) and sent when the peer's queue
  has room again (the connected socket polls writable then), batched: what queued up goes in
  datagrams of up to BATCH_BYTES. Past the bound, or to a peer that is down, a record is
  dropped and reported (`on_drop`): delivery is at most once, never a blocked worker.
- **Size.** Linux refuses a datagram larger than the sending socket's buffer (twice
  `net.core.wmem_max`); service.config refuses a WS_MAX_MESSAGE_SIZE that would not fit.

What a worker restart loses: the records queued for it or in its socket when it died, and those
its peers send before its new socket is bound (dropped as `peer_down`). Its own members were
disconnected with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import os
import shutil
import socket
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from service.config import EMBEDDED_BUS_OVERHEAD, Settings
from service.rooms.records import BATCH_BYTES, DropListener, Receiver, take_batch
from service.telemetry import logs

_log = logs.get_logger("service.localbus")

QUEUE_RECORDS = 10_000  # records one worker holds for one slow peer, at most
QUEUE_BYTES = 16 * 1024 * 1024  # and bytes
RETRY_SECONDS = 0.25  # a peer found down is tried again after this long, not on every publish
READS_PER_WAKE = 64  # datagrams read per readiness callback before the loop serves others


def socket_path(directory: str | Path, worker_id: int) -> str:
    return os.path.join(directory, f"w{worker_id}.sock")


@dataclass(frozen=True)
class SocketDirectory:
    """Where the embedded backplane's sockets live; the supervisor removes it (or its sockets) at exit."""

    path: Path | None  # None: the backplane is Redis, no directory
    owned: bool  # made by `prepare`, so removed whole

    def remove(self) -> None:
        if self.path is None:
            return
        if self.owned:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        for stale in self.path.glob("w*.sock"):
            stale.unlink(missing_ok=True)


def prepare(settings: Settings, workers: int) -> tuple[Settings, SocketDirectory]:
    """In the supervisor, before the fork: the directory, and settings that name it and the pool size.

    Every worker reads both from its settings: where its peers' sockets are, and how many peers
    there are (WEB_CONCURRENCY may have been `auto`).
    """
    settings = dataclasses.replace(settings, workers=workers)
    if settings.broadcast_url:
        return settings, SocketDirectory(None, owned=False)
    if settings.broadcast_dir:
        path = Path(settings.broadcast_dir)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory = SocketDirectory(path, owned=False)
        directory.remove()  # a previous run's sockets
    else:
        directory = SocketDirectory(Path(tempfile.mkdtemp(prefix="tornado-service-bus-")), owned=True)
    return dataclasses.replace(settings, broadcast_dir=str(directory.path)), directory


class Peer:
    """Another worker, as this one sends to it: a connected datagram socket and a bounded queue."""

    def __init__(self, worker_id: int, path: str, on_drop: DropListener) -> None:
        self.worker_id = worker_id
        self.path = path
        self.on_drop = on_drop
        self.sock: socket.socket | None = None
        self.queue: deque[bytes] = deque()
        self.queued_bytes = 0
        self.retry_at = 0.0
        self.writing = False

    def send(self, record: bytes) -> None:
        if self.queue:  # behind what is queued, to keep the order
            self._enqueue(record)
            return
        for attempt in range(2):
            sock = self.sock if self.sock is not None else self._connect(force=attempt > 0)
            if sock is None:
                self.on_drop("peer_down", 1)
                return
            try:
                sock.send(record)
                return
            except BlockingIOError:  # its queue is full: wait until it has room
                self._enqueue(record)
                self._want_write(sock)
                return
            except OSError as exc:
                if exc.errno == errno.EMSGSIZE:
                    self.on_drop("too_large", 1)
                    return
                self._lost(exc)  # it died or restarted: one fresh connect, at once
        self.on_drop("peer_down", 1)

    def _connect(self, force: bool = False) -> socket.socket | None:
        now = time.monotonic()
        if not force and now < self.retry_at:
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 30)  # the kernel grants its maximum
        try:
            sock.connect(self.path)
        except OSError:  # not bound yet, or its worker is gone
            sock.close()
            self.retry_at = now + RETRY_SECONDS
            return None
        self.sock = sock
        return sock

    def _lost(self, exc: OSError | None) -> None:
        if self.sock is not None:
            if exc is not None:
                _log.warning("backplane peer lost", backplane="embedded", peer=self.worker_id, error=str(exc))
            self._stop_writing()
            self.sock.close()
            self.sock = None

    def _enqueue(self, record: bytes) -> None:
        if len(self.queue) >= QUEUE_RECORDS or self.queued_bytes + len(record) > QUEUE_BYTES:
            self.on_drop("queue_full", 1)
            return
        self.queue.append(record)
        self.queued_bytes += len(record)

    def _want_write(self, sock: socket.socket) -> None:
        if not self.writing:
            asyncio.get_running_loop().add_writer(sock.fileno(), self._flush)
            self.writing = True

    def _stop_writing(self) -> None:
        if self.writing and self.sock is not None:
            asyncio.get_running_loop().remove_writer(self.sock.fileno())
        self.writing = False

    def _flush(self) -> None:
        """The peer has room again: send what queued up, many records to a datagram."""
        sock = self.sock
        while self.queue and sock is not None:
            payload, count = take_batch(self.queue)
            try:
                sock.send(payload)
            except BlockingIOError:
                return
            except OSError as exc:
                self._lost(exc)
                self.drop_queue("peer_down")
                return
            for _ in range(count):
                self.queued_bytes -= len(self.queue.popleft())
        self._stop_writing()

    def drop_queue(self, reason: str) -> None:
        if self.queue:
            self.on_drop(reason, len(self.queue))
            self.queue.clear()
            self.queued_bytes = 0

    def close(self) -> None:
        self.drop_queue("shutdown")
        self._lost(None)


class EmbeddedBackplane:
    """The embedded backplane of one worker: its own socket to read, and one `Peer` per other worker."""

    kind = "embedded"

    def __init__(
        self, directory: str, worker_id: int, workers: int, max_record: int,
        receive: Receiver, on_drop: DropListener, on_state: Callable[[bool], None] = lambda _: None,
    ) -> None:
        self.directory = directory
        self.worker_id = worker_id
        self.receive = receive
        self.on_state = on_state
        self.peers = [Peer(other, socket_path(directory, other), on_drop)
                      for other in range(workers) if other != worker_id]
        # One datagram is one record of up to WS_MAX_MESSAGE_SIZE bytes, or a batch of smaller ones.
        self._buffer = bytearray(max(BATCH_BYTES, max_record + EMBEDDED_BUS_OVERHEAD))
        self._inbox: socket.socket | None = None

    @property
    def up(self) -> bool:
        """Always: the bus is this service's own processes; a peer that is down loses its share only."""
        return True

    def start(self) -> None:
        path = socket_path(self.directory, self.worker_id)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # this worker's previous life's socket
        inbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        inbox.bind(path)
        inbox.setblocking(False)
        asyncio.get_running_loop().add_reader(inbox.fileno(), self._read)
        self._inbox = inbox
        self.on_state(True)
        _log.info("backplane connected", backplane="embedded", directory=self.directory,
                  peers=len(self.peers))

    async def stop(self) -> None:
        inbox, self._inbox = self._inbox, None
        if inbox is not None:
            asyncio.get_running_loop().remove_reader(inbox.fileno())
            inbox.close()
            with contextlib.suppress(OSError):
                os.unlink(socket_path(self.directory, self.worker_id))
        for peer in self.peers:
            peer.close()
        self.on_state(False)
        _log.info("backplane disconnected", backplane="embedded", reason="worker stopping")

    def send(self, record: bytes) -> bool:
        for peer in self.peers:
            peer.send(record)
        return True

    def _read(self) -> None:
        inbox, buffer = self._inbox, self._buffer
        if inbox is None:
            return
        view = memoryview(buffer)
        for _ in range(READS_PER_WAKE):
            try:
                size = inbox.recv_into(buffer)
            except (BlockingIOError, InterruptedError):
                return
            self.receive(view[:size])  # decoded at once: the buffer is reused by the next read
