"""What crosses the backplane between workers, and what every backplane offers.

A backplane carries each published message once to every worker that must deliver it: the
embedded backplane (service.rooms.embedded) to the other workers of this service, Redis
(service.rooms.redis) to every worker of every instance. The worker that publishes delivers to its own members
itself, at once; the backplane only ever carries a message to the others.

On the wire a message is one record: its publish time, its room and its data, the data as the
publisher's UTF-8 bytes (no JSON escaping, so a message of WS_MAX_MESSAGE_SIZE bytes stays that
size plus the header). A datagram or a Redis message holds one or more records, in the order
they were published: when a backplane falls behind, it sends what queued up in one go.

This module is a leaf: it imports nothing from the service.
"""

from __future__ import annotations

import itertools
import struct
from collections import deque
from collections.abc import Callable, Iterator
from typing import Protocol

HEADER = struct.Struct("!dBI")  # ts (seconds since the epoch), room length, data length
BATCH_BYTES = 64 * 1024  # records packed into one datagram or Redis message, at most (one is always sent)
MAX_ROOM_BYTES = 64

Receiver = Callable[[memoryview], None]  # takes one datagram or message: records, decoded at once
StateListener = Callable[[bool], None]  # told when the backplane goes up (True) or down (False)
DropListener = Callable[[str, int], None]  # (reason, records): messages a backplane could not carry


def encode(room: str, data: bytes, ts: float) -> bytes:
    name = room.encode()
    return HEADER.pack(ts, len(name), len(data)) + name + data


def decode(buffer: memoryview) -> Iterator[tuple[str, memoryview, float]]:
    """(room, data as UTF-8 bytes, ts) of every record in a datagram or message; stops at a torn one."""
    offset, end = 0, len(buffer)
    while offset + HEADER.size <= end:
        ts, room_length, data_length = HEADER.unpack_from(buffer, offset)
        room_at = offset + HEADER.size
        data_at = room_at + room_length
        offset = data_at + data_length
        if offset > end:
            return
        yield str(buffer[room_at:data_at], "utf-8"), buffer[data_at:offset], ts


def take_batch(records: deque[bytes]) -> tuple[bytes, int]:
    """(the first records of `records`, at least one, joined into at most BATCH_BYTES; how many).

    The records stay queued: the caller removes them once the payload was sent.
    """
    taken = [records[0]]
    size = len(taken[0])
    for record in itertools.islice(records, 1, None):
        if size + len(record) > BATCH_BYTES:
            break
        taken.append(record)
        size += len(record)
    return (b"".join(taken) if len(taken) > 1 else taken[0]), len(taken)


class Backplane(Protocol):
    """What service.rooms.hub needs of a backplane; both kinds are driven by the worker's loop."""

    kind: str  # "embedded" or "redis": a metric label and a log field

    @property
    def up(self) -> bool:
        """Whether a publish can be taken now: while not, publishes are refused (503)."""

    def start(self) -> None:
        """Begin receiving (and, for Redis, connecting); returns at once, never fails on an outage."""

    async def stop(self) -> None:
        """Stop receiving and sending; what is still queued is dropped."""

    def send(self, record: bytes) -> bool:
        """Carry one record to the other workers; False when it cannot be taken (down, queue full)."""
