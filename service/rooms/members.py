"""The rooms of one worker: who is in which room here, and one message's fan-out to them.

A room exists in a worker only while it has members there: WebSockets (`join`) and long polls
waiting for its next message (`next_message`). A message that reaches the worker, from one of
its own publishers or from the backplane, is encoded and framed once (`RoomMessage`: the JSON
text and the WebSocket frame of it, service.ws.frames), and every member is handed the same
object, as the tick bus hands every subscriber the same `Tick`: with thousands of members, the
per-socket cost is one send(2) of bytes made once.

The `worker` field of a message names the worker that delivers it (the one the member's socket
or poll is on, as its `X-Worker-Id` said), so a message is made once per worker, not once per
service; `ts` is the publisher's clock at the publish.

Like the tick bus, this module knows nothing of routes, metrics or backplanes: its owner
(service.rooms.hub) counts what `deliver` reports.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Collection
from typing import NamedTuple

import orjson

from service.ws.frames import text_frame

ROOM_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # the whole name must match (fullmatch)
OTHER_CLASS = "other"


def valid_room(name: str) -> bool:
    """1-64 characters of [A-Za-z0-9_.-]: safe in a URL, a log line, a channel, a label-free metric."""
    return ROOM_NAME.fullmatch(name) is not None


def room_class(name: str, classes: Collection[str]) -> str:
    """The metric label of a room: its name up to the first '.', when that is a listed class.

    Room names are unbounded (any client makes one up), so no metric carries them; classes are
    the operator's fixed list (ROOM_CLASSES), and every room not in one is `other`.
    """
    prefix = name.split(".", 1)[0]
    return prefix if prefix in classes else OTHER_CLASS


class RoomMessage(NamedTuple):
    """One message, encoded once per worker: what every member of the room here is handed."""

    text: str  # the JSON event, as a long poll answers it
    frame: bytes  # the same JSON as one complete server-to-client WebSocket text frame


Member = Callable[[RoomMessage], None]


class Delivery(NamedTuple):
    sockets: int  # members handed the message
    polls: int  # long polls answered with it


class Rooms:
    def __init__(self, worker_id: int) -> None:
        self.worker_id = worker_id
        self._members: dict[str, set[Member]] = {}
        self._waiters: dict[str, set[asyncio.Future[str | None]]] = {}

    def join(self, room: str, member: Member) -> None:
        self._members.setdefault(room, set()).add(member)

    def leave(self, room: str, member: Member) -> None:
        members = self._members.get(room)
        if members is not None:
            members.discard(member)
            if not members:
                del self._members[room]

    def next_message(self, room: str) -> asyncio.Future[str | None]:
        """A future resolved with the room's next message (JSON), or None when the worker drains."""
        waiter: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(room, set()).add(waiter)
        waiter.add_done_callback(lambda done: self._forget(room, done))
        return waiter

    def _forget(self, room: str, waiter: asyncio.Future[str | None]) -> None:
        waiters = self._waiters.get(room)
        if waiters is not None:
            waiters.discard(waiter)
            if not waiters:
                del self._waiters[room]

    def release_waiters(self) -> int:
        """Answer every long poll now (with None) so a draining worker does not hold them."""
        waiters = [waiter for room in self._waiters.values() for waiter in room]
        self._waiters.clear()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        return len(waiters)

    def has_members(self, room: str) -> bool:
        """Whether a message for `room` would reach anyone here (the backplane skips it if not)."""
        return room in self._members or room in self._waiters

    def size(self) -> tuple[int, int]:
        """(rooms with a member here, members here: sockets and waiting long polls)."""
        rooms = self._members.keys() | self._waiters.keys()
        members = sum(map(len, self._members.values())) + sum(map(len, self._waiters.values()))
        return len(rooms), members

    def deliver(self, room: str, data: str, ts: float) -> Delivery:
        """Hand the message to every member of `room` here; encoded and framed once, if anyone is in."""
        members = self._members.get(room)
        waiters = self._waiters.pop(room, None)
        if not members and not waiters:
            return Delivery(0, 0)
        body = orjson.dumps(
            {"type": "message", "room": room, "data": data, "ts": ts, "worker": self.worker_id}
        )
        message = RoomMessage(body.decode(), text_frame(body))
        sockets = list(members) if members else []  # a member may leave while the message goes out
        for member in sockets:
            member(message)
        answered = 0
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(message.text)
                answered += 1
        return Delivery(len(sockets), answered)
