"""The pure parts of rooms, table-driven: names and classes, the wire records, the rate limits,
and one message made once per worker (the processes themselves: tests/test_rooms.py)."""

from __future__ import annotations

import asyncio
import json
from collections import deque

import pytest

from service.rooms.members import RoomMessage, Rooms, room_class, valid_room
from service.rooms.ratelimit import AddressBuckets, TokenBucket
from service.rooms.records import BATCH_BYTES, decode, encode, take_batch
from service.ws.frames import text_frame


@pytest.mark.parametrize(
    ("name", "valid"),
    [("lobby", True), ("chat.42", True), ("a-b_c.D9", True), ("x" * 64, True), ("", False),
     ("x" * 65, False), ("a b", False), ("a/b", False), ("ä", False), ("a\n", False), ("*", False)],
)
def test_room_names(name: str, valid: bool) -> None:
    assert valid_room(name) is valid


@pytest.mark.parametrize(
    ("name", "classes", "label"),
    [("chat.42", {"chat"}, "chat"), ("chat", {"chat"}, "chat"), ("chatty.1", {"chat"}, "other"),
     ("feed.x.y", {"chat", "feed"}, "feed"), ("lobby", set(), "other")],
)
def test_room_classes_bound_the_labels(name: str, classes: set[str], label: str) -> None:
    assert room_class(name, classes) == label


@pytest.mark.parametrize("data", ["", "hello", "é✓ and \u0000 quotes \"'", "x" * 70_000])
def test_records_round_trip_and_batch(data: str) -> None:
    records = [encode("chat.1", data.encode(), 1.5), encode("r", b"second", 2.0)]
    decoded = [(room, str(raw, "utf-8"), ts) for room, raw, ts in decode(memoryview(b"".join(records)))]
    assert decoded == [("chat.1", data, 1.5), ("r", "second", 2.0)]
    payload, count = take_batch(deque(records))
    assert count == (2 if len(records[0]) + len(records[1]) <= BATCH_BYTES else 1)
    assert payload == b"".join(records[:count])


def test_a_torn_record_is_not_decoded() -> None:
    record = encode("room", b"data", 1.0)
    assert list(decode(memoryview(record[:-1]))) == []


@pytest.mark.parametrize(
    ("rate", "burst", "times", "allowed"),
    [
        (1.0, 3, [0, 0, 0, 0, 0], [True, True, True, False, False]),
        (1.0, 3, [0, 0, 0, 0, 1.0], [True, True, True, False, True]),
        (2.0, 1, [0, 0, 0.25, 0.5], [True, False, False, True]),
        (0.0, 1, [0, 0, 0], [True, True, True]),  # 0: no limit
    ],
)
def test_token_bucket(rate: float, burst: int, times: list[float], allowed: list[bool]) -> None:
    bucket = TokenBucket(rate, burst, now=0.0)
    assert [bucket.take(now) for now in times] == allowed


def test_address_buckets_are_per_address_and_bounded() -> None:
    buckets = AddressBuckets(1.0, 1, limit=2)
    assert buckets.take("a", 0.0) == (True, 0.0)
    allowed, wait = buckets.take("a", 0.0)
    assert not allowed and wait == pytest.approx(1.0)
    assert buckets.take("b", 0.0)[0] and buckets.take("c", 0.0)[0]
    assert len(buckets) == 2  # "a", the oldest, was forgotten
    assert buckets.take("a", 0.0)[0]


def test_a_message_is_made_once_for_every_member_here() -> None:
    async def scenario() -> None:
        rooms = Rooms(worker_id=3)
        got: list[RoomMessage] = []
        rooms.join("r", got.append)
        rooms.join("r", got.append.__call__)
        rooms.join("other", lambda _: pytest.fail("another room's member"))
        waiter = rooms.next_message("r")
        delivery = rooms.deliver("r", "hi", 12.5)
        assert (delivery.sockets, delivery.polls) == (2, 1)
        assert got[0] is got[1]  # one object, one frame, for every member
        event = json.loads(got[0].text)
        assert event == {"type": "message", "room": "r", "data": "hi", "ts": 12.5, "worker": 3}
        assert got[0].frame == text_frame(got[0].text.encode())
        assert await waiter == got[0].text
        assert rooms.deliver("empty", "x", 1.0) == (0, 0)
        rooms.leave("r", got.append)
        assert rooms.size() == (2, 2)

    asyncio.run(scenario())
