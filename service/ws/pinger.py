"""WebSocket keep-alive pings for a whole worker from one timer, instead of one task per socket.

Tornado's `websocket_ping_interval` gives every socket its own ping coroutine: a task, its
coroutine frames, a sleeping future and an event-loop timer, about 1.7 KiB of memory per idle
socket here (bench/README.md), more than a tenth of what a socket costs in all. This timer does
the same job for every socket of the worker, and keeps nothing per socket but the pings that are
waiting for their pong (a pong comes back within a round trip, so that is almost none):

- each socket is pinged once per WS_PING_INTERVAL; the sweep is spread over the interval, a
  slice a second, so thousands of sockets do not get their pings in one burst;
- a socket whose ping is still unanswered WS_PING_INTERVAL later is closed with the reason
  "ping timed out", as Tornado does with its default ping timeout (equal to the interval).

Sockets say how to ping them and how to close them when they do not answer (`Pingable`: either
may drop a socket whose queue is full) and tell the pinger of pongs (`answered`) and of their
end (`forget`). The app hands the pinger to its handlers in the Application settings, under
`SETTING`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from typing import Protocol

from tornado.ioloop import PeriodicCallback

SETTING = "ws_pinger"  # the key of the worker's SocketPinger in Application.settings


class Pingable(Protocol):
    def send_ping(self) -> bool:
        """Send a ping frame; False when the socket is closed (or had to be dropped)."""

    def ping_timed_out(self) -> None:
        """Close the socket: its ping went unanswered for a whole interval."""


class SocketPinger:
    """Pings every socket of `sockets` (the worker's open WebSockets) once per `interval` seconds.

    The interval is cut into steps (a second each); a socket belongs to step `hash % steps`
    for its whole life, so each is visited once per round whatever opens and closes meanwhile,
    and nothing is held of a socket between visits but an unanswered ping.
    """

    def __init__(
        self, sockets: Collection[Pingable], interval: float, step: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sockets = sockets
        self.interval = interval
        self.steps = max(1, round(interval / min(step, interval)))
        self.clock = clock
        self._next = 0  # the step visited next
        self._waiting: dict[Pingable, float] = {}  # socket -> when its unanswered ping went out
        self._timer = PeriodicCallback(self._visit, interval / self.steps * 1000.0)

    def start(self) -> None:
        self._timer.start()

    def stop(self) -> None:
        self._timer.stop()

    def answered(self, socket: Pingable) -> None:
        """A pong came (any pong: as with Tornado, it need not echo the latest ping)."""
        self._waiting.pop(socket, None)

    def forget(self, socket: Pingable) -> None:
        """The socket closed: hold nothing of it."""
        self._waiting.pop(socket, None)

    def _visit(self) -> None:
        steps, step = self.steps, self._next
        self._next = (step + 1) % steps
        now, waiting = self.clock(), self._waiting
        for socket in [s for s in self.sockets if hash(s) % steps == step]:
            sent = waiting.get(socket)
            if sent is None:
                if socket.send_ping():
                    waiting[socket] = now
            elif now - sent >= self.interval:
                del waiting[socket]
                socket.ping_timed_out()
