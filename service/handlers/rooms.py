"""Rooms: a WebSocket per member, a POST to publish, a long poll for the next message.

- `GET /ws/chat?room=NAME` (WebSocket): every text message the client sends is published to the
  room; every message of the room reaches the socket as
  `{"type": "message", "room", "data", "ts", "worker"}` (the sender's own included). A binary
  message closes the socket with 1003; publishing faster than ROOM_PUBLISH_RATE (after a burst
  of ROOM_PUBLISH_BURST) closes it with 4029; a message over WS_MAX_MESSAGE_SIZE, 1009
  (Tornado's own limit). While the backplane is down, a message is not published and the
  sender alone gets `{"type": "error", "status": 503, "error": ...}`; the socket stays open.
- `POST /api/publish?room=NAME` with `{"data": "<text>"}`: 202, or 400 (room, body), 413
  (data over WS_MAX_MESSAGE_SIZE bytes), 429 (rate, per client address, with Retry-After), 503
  (backplane down, Retry-After: 1).
- `GET /api/poll?room=NAME&timeout=S`: the room's next message, or 204 after S seconds; without
  `room`, the tick long poll of service.handlers.work, unchanged.

A room name that is not 1-64 characters of [A-Za-z0-9_.-] is a 400, before any upgrade.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import orjson
from tornado.httputil import HTTPServerRequest
from tornado.web import Application

from service.handlers.base import BaseHandler, ServiceHandler
from service.handlers.poll import POLL_DEFAULT_SECONDS, POLL_MAX_SECONDS, PollHandler
from service.handlers.sockets import TrackedSocket
from service.http.errors import ApiError, error_json
from service.rooms.hub import RATE_LIMITED, TOO_LARGE, Hub
from service.rooms.members import RoomMessage, valid_room
from service.rooms.ratelimit import TokenBucket
from service.telemetry import metrics

UNSUPPORTED_DATA = 1003  # RFC 6455: a binary message, where rooms carry text
RATE_LIMIT_CLOSE = 4029  # an application's code (4000-4999): the socket published too fast (as HTTP's 429)
ROOM_RULE = "1-64 characters of A-Z, a-z, 0-9, '_', '.' and '-'"


class RoomArgs(ServiceHandler):
    """The `room` query parameter and the worker's Hub, for every rooms handler."""

    def room_arg(self) -> str:
        room = self.get_query_argument("room", None, strip=False)
        if room is None:
            raise ApiError(400, f"query parameter 'room' is required ({ROOM_RULE})")
        if not valid_room(room):
            raise ApiError(400, f"query parameter 'room' must be {ROOM_RULE}")
        return room

    @property
    def hub(self) -> Hub:
        hub = self.worker.hub
        if hub is None:
            raise ApiError(503, "rooms are not available in this worker")
        return hub


class Seat(NamedTuple):
    """A member's place: its room and its own publish rate (one attribute on the socket, see __init__)."""

    room: str
    bucket: TokenBucket


class ChatSocket(RoomArgs, TrackedSocket):
    def __init__(self, application: Application, request: HTTPServerRequest, **kwargs: Any) -> None:
        """Registers `seat`, the one attribute this socket adds, while the class's key table is open
        (TrackedSocket.__init__ says why: a handler's attributes then need no dict of their own)."""
        super().__init__(application, request, **kwargs)
        self.seat: Seat | None = None

    def prepare(self) -> None:
        super().prepare()  # a draining worker refuses the upgrade (503)
        room = self.room_arg()
        self.seat = Seat(room, self.hub.new_bucket())

    def open(self, *args: str, **kwargs: str) -> None:
        super().open()
        assert self.seat is not None
        push = self.push_frame if self.takes_prepared_frames() else self.push_text
        self.hub.join(self.seat.room, push)

    def push_frame(self, message: RoomMessage) -> None:
        self.send_prepared(message.frame)

    def push_text(self, message: RoomMessage) -> None:
        """The fallback: Tornado's own `write_message`, which frames (and compresses) per socket."""
        self.send(message.text)

    def _drop_slow_consumer(self) -> None:
        if self.seat is not None:
            self.hub.slow_subscriber(self.seat.room)
        super()._drop_slow_consumer()

    def on_message(self, message: str | bytes) -> None:
        metrics.WEBSOCKET_MESSAGES.labels(self.route, "in").inc()
        connection = self.ws_connection
        if connection is None or connection.is_closing():
            return
        seat, hub = self.seat, self.hub
        if seat is None:
            return
        if isinstance(message, bytes):
            self.close(UNSUPPORTED_DATA, "rooms carry text messages")
            return
        if not seat.bucket.take():
            hub.reject(seat.room, RATE_LIMITED)
            self.close(RATE_LIMIT_CLOSE, "publish rate exceeded")
            return
        refused = hub.publish(seat.room, message)
        if refused is not None:
            self.send(orjson.dumps(
                {"type": "error", "status": 503, "error": f"not published: {refused.replace('_', ' ')}"}
            ).decode())

    def on_close(self) -> None:
        hub = self.worker.hub
        if self.seat is not None and hub is not None:
            hub.leave(self.seat.room, self.push_frame)
            hub.leave(self.seat.room, self.push_text)
        super().on_close()


class PublishHandler(RoomArgs, BaseHandler):
    def post(self) -> None:
        hub = self.hub
        room = self.room_arg()
        data = self._data()
        size = len(data.encode())
        if size > hub.max_message_size:
            hub.reject(room, TOO_LARGE)
            self._refuse(413, f"'data' is {size} bytes, more than WS_MAX_MESSAGE_SIZE "
                              f"({hub.max_message_size})")
            return
        allowed, wait = hub.address_buckets.take(self.request.remote_ip or "")
        if not allowed:
            hub.reject(room, RATE_LIMITED)
            self._refuse(429, "publish rate exceeded", retry_after=wait)
            return
        refused = hub.publish(room, data)
        if refused is not None:
            self._refuse(503, f"not published: {refused.replace('_', ' ')}", retry_after=1.0)
            return
        self.write_json({"status": "accepted", "room": room}, 202)

    def _data(self) -> str:
        try:
            body: Any = orjson.loads(self.request.body)
        except orjson.JSONDecodeError:
            body = None
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, str):
            raise ApiError(400, 'the body must be a JSON object {"data": "<text>"}')
        return data

    def _refuse(self, status: int, message: str, retry_after: float | None = None) -> None:
        """An error answer that keeps its Retry-After (an ApiError would go through clear())."""
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        if retry_after is not None:
            self.set_header("Retry-After", str(max(1, math.ceil(retry_after))))
        self.finish(error_json(status, message=message))


class RoomPollHandler(RoomArgs, PollHandler):
    """`/api/poll`: with `room`, the room's next message; without, the tick long poll as before."""

    async def get(self) -> None:
        if self.get_query_argument("room", None, strip=False) is None:
            await super().get()
            return
        room = self.room_arg()
        timeout = self.seconds_arg("timeout", 0.0, POLL_MAX_SECONDS, POLL_DEFAULT_SECONDS)
        hub = self.hub
        await self.answer_next(lambda: hub.next_message(room), timeout)
