"""Rooms against real processes: the embedded bus between 2 workers, and Redis between instances.

Every test opens its clients on every worker (REUSE_PORT spreads them; the handshake's
X-Worker-Id says where each landed, and each message's `worker` field must agree) and checks
that every client gets every message. Redis is Debian's `redis-server` on a free loopback port;
Nginx is the real one, in front of two instances. No timing is asserted: waits are bounded
polls of what a client or an operator sees (answers, log events, scraped series).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import wsclient
from conftest import ROOT, ServiceProcess, http_request
from proxy import Nginx
from redisserver import RedisServer
from tornado.websocket import WebSocketClientConnection

Start = Callable[..., ServiceProcess]
ROOM = "chat.lobby"
HOSTILE_ROOMS = ["", "a" * 65, "bad%20name", "%C3%A4", "..%2Fx", "a%2Fb", "%00", "x;y", "x%0d%0ay", "*"]


# -- helpers -----------------------------------------------------------------------------------
class Member:
    """A WebSocket in a room, and the worker it landed on."""

    def __init__(self, conn: WebSocketClientConnection) -> None:
        self.conn = conn
        self.worker = int(conn.headers["X-Worker-Id"])

    async def read(self, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
        events = []
        for _ in range(count):
            message = await asyncio.wait_for(self.conn.read_message(), timeout)
            assert isinstance(message, str), f"socket closed ({self.conn.close_code}) after {events}"
            events.append(json.loads(message))
        return events


async def open_members(port: int, count: int, room: str = ROOM, spread: int = 0) -> list[Member]:
    """`count` members; with `spread` workers, more (up to 4 x count) until each worker has one.

    SO_REUSEPORT hashes each connection's addresses to a worker: 8 connections all land on one
    of 2 workers about once in 128 runs, which a test of "every worker" must not take as a failure.
    """
    url = f"ws://127.0.0.1:{port}/ws/chat?room={room}"
    members = [Member(await wsclient.connect(url)) for _ in range(count)]
    while len({m.worker for m in members}) < spread and len(members) < 4 * count:
        members.append(Member(await wsclient.connect(url)))
    return members


async def publish(
    port: int, data: str, room: str = ROOM, source: str | None = None
) -> tuple[int, dict[str, str]]:
    status, headers, _ = await asyncio.to_thread(
        http_request, port, f"/api/publish?room={room}", "POST", json.dumps({"data": data}).encode(),
        10.0, None, source,
    )
    return status, headers


def expect_all(members: list[Member], sent: list[str], room: str = ROOM) -> Any:
    """Every member gets exactly `sent` (any interleaving of publishers), from its own worker."""

    async def check() -> None:
        received = await asyncio.gather(*(member.read(len(sent)) for member in members))
        for member, events in zip(members, received, strict=True):
            assert sorted(e["data"] for e in events) == sorted(sent)
            assert {e["type"] for e in events} == {"message"}
            assert {e["room"] for e in events} == {room}
            assert {e["worker"] for e in events} == {member.worker}  # delivered by its own worker
            assert all(isinstance(e["ts"], float) for e in events)
            for publisher in {d.split("#")[0] for d in sent}:  # ordered per publisher
                mine = [e["data"] for e in events if e["data"].split("#")[0] == publisher]
                assert mine == [d for d in sent if d.split("#")[0] == publisher]

    return check()


def scrape(svc: ServiceProcess) -> str:
    status, _, body = svc.request("/metrics")
    assert status == 200
    return body.decode()


def sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        named = line.startswith(name + "{") or line.startswith(name + " ")
        if named and all(f'{key}="{value}"' in line for key, value in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_backplane(svc: ServiceProcess, event: str, after: int = 0, timeout: float = 20.0) -> None:
    """Until every worker has logged `event` ("backplane connected" / "disconnected") since `after`."""
    svc.wait_for(lambda _: len({e["worker"] for e in svc.events[after:] if e.get("event") == event})
                 >= svc.workers, timeout)


def on_every_worker(members: list[Member], workers: int = 2) -> None:
    assert {m.worker for m in members} == set(range(workers)), "clients did not spread over the workers"


# -- the embedded bus --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rooms_service() -> Any:
    svc = ServiceProcess("--reuse-port", "--ws-max-message-size", "1024", "--room-classes", "chat",
                         "--room-publish-rate", "1", "--room-publish-burst", "5")
    svc.start()
    yield svc
    svc.stop()
    assert not svc.bad_lines, svc.bad_lines[:5]


def test_every_member_on_every_worker_gets_every_message(rooms_service: ServiceProcess) -> None:
    port = rooms_service.port

    async def scenario() -> None:
        members = await open_members(port, 24, spread=2)
        on_every_worker(members)
        senders = [next(m for m in members if m.worker == w) for w in (0, 1)]
        sent = []
        for sender in senders:  # WebSocket publishers on each worker, three messages each
            for i in range(3):
                text = f"ws{sender.worker}#{i}"
                await sender.conn.write_message(text)
                sent.append(text)
        for i in range(2):  # and the HTTP publish, from two client addresses
            status, _ = await publish(port, f"http{i}#0", source=f"127.0.0.{11 + i}")
            assert status == 202
            sent.append(f"http{i}#0")
        await expect_all(members, sent)
        for member in members:
            member.conn.close()

    wsclient.run(scenario())
    metrics = scrape(rooms_service)
    assert sample(metrics, "tornado_room_messages_published_total", room_class="chat") >= 8
    assert sample(metrics, "tornado_room_messages_delivered_total", room_class="chat") >= 8 * 24
    assert sample(metrics, "tornado_backplane_up", backplane="embedded") == 2
    assert sample(metrics, "tornado_backplane_latency_seconds_count", backplane="embedded") > 0


def test_long_poll_gets_the_rooms_next_message(rooms_service: ServiceProcess) -> None:
    async def scenario() -> dict[str, Any]:
        poll = asyncio.ensure_future(asyncio.to_thread(
            http_request, rooms_service.port, "/api/poll?room=chat.poll&timeout=20", "GET", None, 30.0))
        for i in range(60):  # the poll may reach its worker after a publish: publish until it answers
            if poll.done():
                break
            assert (await publish(rooms_service.port, f"p#{i}", "chat.poll", f"127.0.1.{i + 1}"))[0] == 202
            await asyncio.sleep(0.1)
        status, headers, body = await poll
        assert status == 200 and headers["content-type"] == "application/json"
        return dict(json.loads(body))

    event = wsclient.run(scenario())
    assert event["type"] == "message" and event["room"] == "chat.poll" and event["data"].startswith("p#")
    status, _, body = rooms_service.request("/api/poll?room=chat.quiet&timeout=0")
    assert (status, body) == (204, b"")
    status, _, body = rooms_service.request("/api/poll?timeout=5")  # no room: a tick, as before
    assert status == 200 and json.loads(body)["type"] == "tick"


@pytest.mark.parametrize("room", HOSTILE_ROOMS)
def test_hostile_room_names_get_400_before_the_upgrade(rooms_service: ServiceProcess, room: str) -> None:
    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    for path, method, headers, body in (
        (f"/ws/chat?room={room}", "GET", upgrade, None),
        (f"/api/publish?room={room}", "POST", None, b'{"data": "x"}'),
        (f"/api/poll?room={room}&timeout=0", "GET", None, None),
    ):
        status, answer_headers, answer = rooms_service.request(path, method, body, headers=headers)
        assert status == 400, (path, status, answer)
        assert answer_headers["content-type"] == "application/json"
        assert "room" in json.loads(answer)["error"]


def test_missing_room_and_bad_bodies_are_400(rooms_service: ServiceProcess) -> None:
    status, _, body = rooms_service.request("/api/publish", "POST", b'{"data": "x"}')
    assert status == 400 and "'room' is required" in json.loads(body)["error"]
    for bad in (b"", b"not json", b"[]", b'{"data": 3}', b'{"text": "x"}', b'{"data": null}'):
        status, _, body = rooms_service.request("/api/publish?room=chat.x", "POST", bad)
        assert status == 400 and "data" in json.loads(body)["error"], bad


def test_oversized_and_binary_messages_get_their_documented_answer(rooms_service: ServiceProcess) -> None:
    status, _, body = rooms_service.request(
        "/api/publish?room=chat.big", "POST", json.dumps({"data": "x" * 1025}).encode())
    assert status == 413 and "WS_MAX_MESSAGE_SIZE" in json.loads(body)["error"]
    at_limit = json.dumps({"data": "é" * 512}).encode()  # 1024 bytes of UTF-8: exactly the limit
    assert rooms_service.request("/api/publish?room=chat.big", "POST", at_limit)[0] == 202

    async def closed_with(message: str | bytes) -> int | None:
        (member,) = await open_members(rooms_service.port, 1, "chat.big")
        await member.conn.write_message(message, binary=isinstance(message, bytes))
        await wsclient.read_until_closed(member.conn, 10)
        return member.conn.close_code

    assert wsclient.run(closed_with("x" * 1025)) == 1009
    assert wsclient.run(closed_with(b"binary")) == 1003


def test_publishing_too_fast_closes_with_4029_or_answers_429(rooms_service: ServiceProcess) -> None:
    async def flood() -> tuple[int | None, list[str | bytes]]:
        (member,) = await open_members(rooms_service.port, 1, "chat.flood")
        for i in range(30):
            await member.conn.write_message(f"f#{i}")
        received = await wsclient.read_until_closed(member.conn, 10)
        return member.conn.close_code, received

    code, received = wsclient.run(flood())
    assert code == 4029
    assert 1 <= len(received) < 30  # its burst went out (to itself, a member) before the close
    answers = [http_request(rooms_service.port, "/api/publish?room=chat.flood", "POST",
                            b'{"data": "h"}', source="127.0.2.1")[:2] for _ in range(30)]
    statuses = [status for status, _ in answers]
    assert statuses[0] == 202 and 429 in statuses and set(statuses) == {202, 429}
    limited = next(headers for status, headers in answers if status == 429)
    assert int(limited["retry-after"]) >= 1
    metrics = scrape(rooms_service)
    name = "tornado_room_publishes_rejected_total"
    assert sample(metrics, name, room_class="chat", reason="rate_limited") >= 2


def test_a_restarted_worker_rejoins_the_bus(start_service: Start) -> None:
    svc = start_service("--reuse-port")
    victim = svc.live_workers()[1]
    mark = len(svc.events)
    os.kill(victim, signal.SIGKILL)
    svc.wait_for(lambda e: e.get("event") == "worker started" and e.get("worker") == 1, 20, after=mark)

    async def scenario() -> None:
        members = await open_members(svc.port, 16, spread=2)
        on_every_worker(members)
        sent = []
        for i in range(3):
            assert (await publish(svc.port, f"after#{i}"))[0] == 202
            sent.append(f"after#{i}")
        await expect_all(members, sent)

    wsclient.run(scenario())
    dropped = sample(scrape(svc), "tornado_backplane_dropped_total", backplane="embedded")
    assert dropped >= 0  # what the dead worker's socket held is counted, never an error


# -- Redis ---------------------------------------------------------------------------------------
def test_two_instances_share_one_redis_behind_one_nginx(start_service: Start, tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis").start()
    nginx: Nginx | None = None
    try:
        first = start_service("--reuse-port", "--broadcast-url", redis.url)
        second = start_service("--reuse-port", "--broadcast-url", redis.url)
        for svc in (first, second):
            wait_backplane(svc, "backplane connected")
        both = f"127.0.0.1:{first.port},127.0.0.1:{second.port}"
        nginx = Nginx(tmp_path / "nginx", first.port, UPSTREAM=both)
        nginx.start()
        proxied = nginx.http_port

        async def scenario() -> None:
            on_first = await open_members(first.port, 8, spread=2)
            on_second = await open_members(second.port, 8, spread=2)
            behind_nginx = await open_members(proxied, 8)
            on_every_worker(on_first)
            on_every_worker(on_second)
            sent = []
            for name, port in (("first", first.port), ("second", second.port), ("nginx", proxied)):
                status, _ = await publish(port, f"{name}#0")
                assert status == 202
                sent.append(f"{name}#0")
            await on_second[0].conn.write_message("ws-second#0")
            sent.append("ws-second#0")
            await expect_all(on_first + on_second + behind_nginx, sent)

        wsclient.run(scenario())
        for svc in (first, second):
            assert sample(scrape(svc), "tornado_backplane_up", backplane="redis") == 2
    finally:
        if nginx is not None:
            nginx.stop()
        redis.stop()


def test_redis_outage_refuses_publishes_and_subscribers_resume(start_service: Start, tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis").start()
    try:
        svc = start_service("--reuse-port", "--broadcast-url", redis.url, "--room-publish-rate", "0")
        wait_backplane(svc, "backplane connected")
        workers = svc.live_workers()

        async def scenario() -> None:
            members = await open_members(svc.port, 12, spread=2)
            on_every_worker(members)
            assert (await publish(svc.port, "before#0"))[0] == 202
            await expect_all(members, ["before#0"])

            mark = len(svc.events)
            redis.kill()
            await asyncio.to_thread(wait_backplane, svc, "backplane disconnected", mark)
            for _ in range(6):  # on whichever worker: refused at once, with a hint when to retry
                status, headers = await publish(svc.port, "lost")
                assert status == 503 and headers["retry-after"] == "1"
            sender = members[0]
            await sender.conn.write_message("lost too")
            (error,) = await sender.read(1)
            assert error["type"] == "error" and error["status"] == 503
            assert all(m.conn.close_code is None for m in members)  # nobody was disconnected

            mark = len(svc.events)
            redis.start()
            await asyncio.to_thread(wait_backplane, svc, "backplane connected", mark, 30.0)
            sent = []
            for i in range(2):
                status, _ = await publish(svc.port, f"after#{i}")
                assert status == 202
                sent.append(f"after#{i}")
            await expect_all(members, sent)

        wsclient.run(scenario())
        assert svc.live_workers() == workers  # no worker died or restarted
        metrics = scrape(svc)
        assert sample(metrics, "tornado_worker_restarts_total") == 0
        assert sample(metrics, "tornado_room_publishes_rejected_total", reason="backplane_down") >= 7
        assert sample(metrics, "tornado_backplane_up", backplane="redis") == 2
        disconnects = svc.named("backplane disconnected")
        assert disconnects and all(e["level"] == "warning" and "redis://" in e["url"] for e in disconnects)
    finally:
        redis.stop()


def test_bad_broadcast_url_stops_start_up_naming_the_setting() -> None:
    proc = subprocess.run([sys.executable, "-m", "service", "--broadcast-url", "redis://user:pw@127.0.0.1/0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "BROADCAST_URL" in proc.stderr and "--broadcast-url" in proc.stderr
    assert "user:pw" not in proc.stderr  # the value is shown without its credentials
