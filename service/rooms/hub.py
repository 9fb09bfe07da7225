"""A worker's rooms joined to its backplane: publish, receive, and count both.

`build` makes the one `Hub` of a worker, after the fork, from its settings: the embedded
bus (service.rooms.embedded) when BROADCAST_URL is empty, Redis (service.rooms.redis) otherwise. The
handlers (service.handlers.rooms) only ever talk to it:

- `publish(room, data)`: refused at once while the backplane is down (503); else stamped with
  the time, handed to the backplane for the other workers and delivered to this worker's own
  members at once. So each message crosses the backplane once per worker, never once per socket.
- what the backplane brings in (`receive`) is delivered to this worker's members of the room,
  if it has any, and skipped without being decoded otherwise.

This is the one module that counts rooms' metrics (service.rooms.metrics): service.rooms.members and the
backplanes only report through callbacks, as the tick bus does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from tornado.ioloop import PeriodicCallback

from service.config import Settings
from service.rooms import metrics as rooms_metrics
from service.rooms.embedded import EmbeddedBackplane
from service.rooms.members import Delivery, Member, Rooms, room_class
from service.rooms.ratelimit import AddressBuckets, TokenBucket
from service.rooms.records import Backplane, decode, encode
from service.rooms.redis import RedisBackplane

BACKPLANE_DOWN = "backplane_down"
BACKPLANE_FULL = "backplane_full"
RATE_LIMITED = "rate_limited"
TOO_LARGE = "too_large"


class Hub:
    def __init__(
        self, settings: Settings, worker_id: int, on_sent: Callable[[int], None] = lambda _: None
    ) -> None:
        self.worker_id = worker_id
        self.worker_label = str(worker_id)
        self.rooms = Rooms(worker_id)
        self.classes = frozenset(settings.room_classes)
        self.max_message_size = settings.ws_max_message_size
        self.rate, self.burst = settings.room_publish_rate, settings.room_publish_burst
        self.address_buckets = AddressBuckets(self.rate, self.burst)
        self.on_sent = on_sent
        self.backplane: Backplane = self._backplane(settings)
        self._latency = rooms_metrics.BACKPLANE_LATENCY.labels(self.backplane.kind)
        self._sampler = PeriodicCallback(self._sample, 1000.0)

    def _backplane(self, settings: Settings) -> Backplane:
        if settings.broadcast_url:
            return RedisBackplane(settings.broadcast_url, settings.broadcast_channel, self.receive,
                            on_drop=self._dropped("redis"), on_state=self._state("redis"))
        if not settings.broadcast_dir or settings.workers is None:
            raise RuntimeError(
                "the embedded backplane needs BROADCAST_DIR and the worker count (embedded.prepare)"
            )
        return EmbeddedBackplane(
            settings.broadcast_dir, self.worker_id, settings.workers, self.max_message_size,
            self.receive, on_drop=self._dropped("embedded"), on_state=self._state("embedded"),
        )

    # -- life --------------------------------------------------------------------------------
    def start(self) -> None:
        self.backplane.start()
        self._sampler.start()
        self._sample()

    async def stop(self) -> None:
        self._sampler.stop()
        await self.backplane.stop()

    def release_waiters(self) -> int:
        return self.rooms.release_waiters()

    # -- members -----------------------------------------------------------------------------
    def join(self, room: str, member: Member) -> None:
        self.rooms.join(room, member)

    def leave(self, room: str, member: Member) -> None:
        self.rooms.leave(room, member)

    def next_message(self, room: str) -> asyncio.Future[str | None]:
        return self.rooms.next_message(room)

    def new_bucket(self) -> TokenBucket:
        """A publisher's own rate limit (one per WebSocket)."""
        return TokenBucket(self.rate, self.burst)

    def room_class(self, room: str) -> str:
        return room_class(room, self.classes)

    # -- messages ----------------------------------------------------------------------------
    def publish(self, room: str, data: str) -> str | None:
        """None once the message is on its way; else why it was refused (a reason label)."""
        if not self.backplane.up:
            return self.reject(room, BACKPLANE_DOWN)
        encoded = data.encode()
        if len(encoded) > self.max_message_size:
            return self.reject(room, TOO_LARGE)
        ts = time.time()
        if not self.backplane.send(encode(room, encoded, ts)):
            return self.reject(room, BACKPLANE_FULL)
        label = self.room_class(room)
        rooms_metrics.PUBLISHED.labels(label).inc()
        self._count(label, self.rooms.deliver(room, data, ts))
        return None

    def reject(self, room: str, reason: str) -> str:
        rooms_metrics.REJECTED.labels(self.room_class(room), reason).inc()
        return reason

    def receive(self, buffer: memoryview) -> None:
        """What the backplane brought: delivered to the room's members here, if there are any."""
        rooms = self.rooms
        try:
            for room, data, ts in decode(buffer):
                if rooms.has_members(room):
                    delivery = rooms.deliver(room, str(data, "utf-8"), ts)
                    self._latency.observe(max(0.0, time.time() - ts))
                    self._count(self.room_class(room), delivery)
        except UnicodeDecodeError:  # not written by this service (a stranger on the Redis channel)
            self._dropped(self.backplane.kind)("malformed", 1)

    def slow_subscriber(self, room: str) -> None:
        rooms_metrics.SLOW_SUBSCRIBERS.labels(self.room_class(room)).inc()

    # -- counting ----------------------------------------------------------------------------
    def _count(self, label: str, delivery: Delivery) -> None:
        reached = delivery.sockets + delivery.polls
        if reached:
            rooms_metrics.DELIVERED.labels(label).inc(reached)
        if delivery.sockets:
            self.on_sent(delivery.sockets)

    def _dropped(self, kind: str) -> Callable[[str, int], None]:
        def dropped(reason: str, records: int) -> None:
            rooms_metrics.BACKPLANE_DROPPED.labels(kind, reason).inc(records)

        return dropped

    def _state(self, kind: str) -> Callable[[bool], None]:
        gauge = rooms_metrics.BACKPLANE_UP.labels(self.worker_label, kind)
        return lambda up: gauge.set(1 if up else 0)

    def _sample(self) -> None:
        rooms, members = self.rooms.size()
        rooms_metrics.ROOMS.labels(self.worker_label).set(rooms)
        rooms_metrics.MEMBERS.labels(self.worker_label).set(members)


def build_hub(
    settings: Settings, worker_id: int, on_sent: Callable[[int], None] = lambda _: None
) -> Hub:
    """The worker's Hub (after the fork: the backplane's sockets are this process's own)."""
    return Hub(settings, worker_id, on_sent)
