"""The tick bus: one timer per worker that fans each tick out to every WebSocket and long poll.

Every event carries `ts`, the server's wall-clock time when the fan-out began, so a client can
measure fan-out latency as (receive time - ts). The event is encoded and framed once per tick,
not once per subscriber: each subscriber gets the same `Tick`, the JSON text (long polls, and any
socket that must go through Tornado's `write_message`) and the WebSocket frame of it, ready to be
written as is (service.ws.frames). With thousands of sockets, per-socket encoding and framing was
most of a tick's cost (bench/broadcast.py measures it).

The bus knows nothing of routes or metrics: whoever builds it passes `on_fanout`, told how many
subscribers each tick reached (the app counts them as WebSocket messages of its ticker route).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import NamedTuple

import orjson
from tornado.ioloop import PeriodicCallback

from service.ws.frames import text_frame


class Tick(NamedTuple):
    """One tick event, encoded once: what every subscriber of that tick is handed."""

    text: str  # the JSON event, as a long poll answers it
    frame: bytes  # the same JSON as one complete server-to-client WebSocket text frame


Subscriber = Callable[[Tick], None]


class Ticker:
    def __init__(
        self, interval: float, worker_id: int, on_fanout: Callable[[int], None] = lambda _: None
    ) -> None:
        self.interval = interval
        self.worker_id = worker_id
        self.on_fanout = on_fanout
        self.seq = 0
        self._subscribers: set[Subscriber] = set()
        self._waiters: set[asyncio.Future[str | None]] = set()
        self._timer = PeriodicCallback(self._tick, interval * 1000.0)

    def start(self) -> None:
        self._timer.start()

    def stop(self) -> None:
        self._timer.stop()

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.add(subscriber)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.discard(subscriber)

    def next_event(self) -> asyncio.Future[str | None]:
        """A future resolved with the next tick's JSON, or None when the worker drains."""
        waiter: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        waiter.add_done_callback(self._waiters.discard)
        return waiter

    def release_waiters(self) -> int:
        """Answer every long poll now (with None) so a draining worker does not hold them."""
        return self._resolve(None)

    def _resolve(self, value: str | None) -> int:
        waiters, self._waiters = self._waiters, set()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(value)
        return len(waiters)

    def _tick(self) -> None:
        self.seq += 1
        body = orjson.dumps(
            {"type": "tick", "seq": self.seq, "ts": time.time(), "worker": self.worker_id,
             "interval": self.interval}
        )
        tick = Tick(body.decode(), text_frame(body))
        subscribers = list(self._subscribers)  # a subscriber may leave while the tick goes out
        for subscriber in subscribers:
            subscriber(tick)
        self.on_fanout(len(subscribers))
        self._resolve(tick.text)
