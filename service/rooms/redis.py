"""The Redis backplane: pub/sub through a real Redis, between every worker of every instance.

Each worker subscribes to one channel (BROADCAST_CHANNEL) and publishes every record there, so
a message crosses Redis once per worker of the whole deployment, as Socket.IO's Redis adapter
does it; its own copy comes back and is skipped (every payload starts with the worker's random
`origin`), because the publishing worker has already delivered it to its members. One channel
for all rooms keeps a member's join instant and local (no SUBSCRIBE per room and no window in
which a new room's first messages pass by); its price is that every worker reads every room's
messages and skips those of rooms it has no member in, before decoding them.

Two connections per worker, from one client: the subscriber, which in Redis's RESP2 protocol may
run no other command once subscribed, and the publisher. One task (`_run`) owns both: it
connects with exponential backoff (0.1 s doubling to 5 s, with jitter), marks the backplane up,
and when either connection fails (Redis gone, or a PING unanswered for PING_TIMEOUT) closes both,
marks it down and starts over. Nothing here raises into the worker: while Redis is away,
publishes are refused at once (`send` is False, the handlers answer 503) and the members stay
connected, to get messages again once it is back. Records that were queued when the connection
failed are dropped and reported (at most once).

The publisher sends what queued up since its last PUBLISH as one message (up to BATCH_BYTES of
records), and waits for Redis's answer before the next: one PUBLISH in flight per worker keeps a
publisher's order, and the batches grow by themselves under load.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections import deque
from collections.abc import Callable

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from service.config import redis_address
from service.rooms.records import DropListener, Receiver, take_batch
from service.telemetry import logs

_log = logs.get_logger("service.redisbus")

ORIGIN_BYTES = 8
CONNECT_TIMEOUT = 2.0  # seconds to connect (and to get a PONG back) before the attempt counts as failed
PING_INTERVAL = 5.0  # an idle publisher pings Redis this often: a hung Redis is found within it
PING_TIMEOUT = 2.0  # a PUBLISH or PING unanswered for this long fails the connection
BACKOFF_MIN, BACKOFF_MAX = 0.1, 5.0
LOG_RETRY_EVERY = 30.0  # seconds between two "connect failed" lines of one outage
QUEUE_RECORDS = 10_000  # records waiting for the publisher, at most: beyond, publishes are refused
QUEUE_BYTES = 16 * 1024 * 1024


class RedisBackplane:
    kind = "redis"

    def __init__(
        self, url: str, channel: str, receive: Receiver, on_drop: DropListener,
        on_state: Callable[[bool], None] = lambda _: None,
    ) -> None:
        self.url = url
        self.host, self.port, self.db = redis_address(url)
        self.channel = channel.encode()
        self.receive = receive
        self.on_drop = on_drop
        self.on_state = on_state
        self.origin = os.urandom(ORIGIN_BYTES)  # this worker's life: its own messages come back with it
        self._up = False
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def up(self) -> bool:
        return self._up

    def start(self) -> None:
        self._wake = asyncio.Event()
        self.on_state(False)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def send(self, record: bytes) -> bool:
        if not self._up or len(self._queue) >= QUEUE_RECORDS:
            return False
        if self._queued_bytes + len(record) > QUEUE_BYTES:
            return False
        self._queue.append(record)
        self._queued_bytes += len(record)
        assert self._wake is not None
        self._wake.set()
        return True

    # -- the connection's life ---------------------------------------------------------------
    async def _run(self) -> None:
        delay, failures, logged_at = BACKOFF_MIN, 0, -LOG_RETRY_EVERY
        while True:
            client = Redis(
                host=self.host, port=self.port, db=self.db, protocol=2,
                socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=PING_TIMEOUT,
                retry=Retry(NoBackoff(), 0),  # no hidden retries: this loop decides, and says so
                single_connection_client=True,  # the publisher's; the subscriber has one of its own
            )
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                try:
                    await asyncio.wait_for(client.ping(), CONNECT_TIMEOUT)
                    await asyncio.wait_for(pubsub.subscribe(self.channel), CONNECT_TIMEOUT)
                except (RedisError, OSError, TimeoutError) as exc:
                    failures += 1
                    now = time.monotonic()
                    if now - logged_at >= LOG_RETRY_EVERY:
                        logged_at = now
                        _log.warning("backplane connect failed", backplane="redis", url=self.url,
                                     attempts=failures, error=str(exc) or type(exc).__name__)
                    await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                    delay = min(delay * 2, BACKOFF_MAX)
                    continue
                _log.info("backplane connected", backplane="redis", url=self.url,
                          channel=self.channel.decode(), failed_attempts=failures)
                delay, failures, logged_at = BACKOFF_MIN, 0, -LOG_RETRY_EVERY
                self._set_up(True)
                error = await self._serve(client, pubsub)
                self._set_up(False)
                self._drop_queue("disconnected")
                _log.warning("backplane disconnected", backplane="redis", url=self.url, error=error)
            except asyncio.CancelledError:
                self._set_up(False)
                self._drop_queue("shutdown")
                raise
            except Exception:  # a bug here must not end the backplane for the worker's life
                self._set_up(False)
                self._drop_queue("disconnected")
                _log.exception("backplane error", backplane="redis", url=self.url)
                await asyncio.sleep(BACKOFF_MAX)
            finally:
                await _close(client, pubsub)

    async def _serve(self, client: Redis, pubsub: PubSub) -> str:
        """Read and publish until a connection fails; what failed, for the log line."""
        reader = asyncio.ensure_future(self._read(pubsub))
        writer = asyncio.ensure_future(self._write(client))
        try:
            done, _ = await asyncio.wait((reader, writer), return_when=asyncio.FIRST_COMPLETED)
            exc = next(iter(done)).exception()
            return (str(exc) or type(exc).__name__) if exc is not None else "connection closed"
        finally:
            for task in (reader, writer):
                task.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)

    def _set_up(self, up: bool) -> None:
        if up != self._up:
            self._up = up
            self.on_state(up)

    def _drop_queue(self, reason: str) -> None:
        if self._queue:
            self.on_drop(reason, len(self._queue))
            self._queue.clear()
            self._queued_bytes = 0

    # -- the two directions ------------------------------------------------------------------
    async def _read(self, pubsub: PubSub) -> None:
        origin, size = self.origin, ORIGIN_BYTES
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
            if message is None or message.get("type") != "message":
                continue
            payload = message["data"]
            if isinstance(payload, bytes) and payload[:size] != origin:
                self.receive(memoryview(payload)[size:])

    async def _write(self, client: Redis) -> None:
        wake, queue = self._wake, self._queue
        assert wake is not None
        while True:
            if not queue:
                wake.clear()
                try:
                    await asyncio.wait_for(wake.wait(), PING_INTERVAL)
                except TimeoutError:
                    await asyncio.wait_for(client.ping(), PING_TIMEOUT)
                    continue
            payload, count = take_batch(queue)
            await asyncio.wait_for(client.publish(self.channel, self.origin + payload), PING_TIMEOUT)
            for _ in range(count):
                self._queued_bytes -= len(queue.popleft())


async def _close(client: Redis, pubsub: PubSub) -> None:
    for closing in (pubsub.aclose(), client.aclose()):
        with contextlib.suppress(Exception):
            await asyncio.wait_for(closing, 1.0)
