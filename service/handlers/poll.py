"""Long polls: a GET that waits for the next event of the worker, or answers 204 after its timeout.

`GET /api/poll` waits for the next tick of the tick bus; the rooms' poll (service/handlers/rooms.py)
answers the next message of a room the same way, through `answer_next`. A draining worker
answers 204 at once, so clients reconnect to a worker that stays.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from service.handlers.base import BaseHandler
from service.telemetry import metrics

POLL_MAX_SECONDS = 300.0
POLL_DEFAULT_SECONDS = 30.0


class PollHandler(BaseHandler):
    """Long poll: the next tick event, or 204 after `timeout` seconds (or at once when draining)."""

    _waiter: asyncio.Future[str | None] | None = None

    async def get(self) -> None:
        timeout = self.seconds_arg("timeout", 0.0, POLL_MAX_SECONDS, POLL_DEFAULT_SECONDS)
        await self.answer_next(self.worker.ticker.next_event, timeout, counted=True)

    async def answer_next(
        self, next_event: Callable[[], asyncio.Future[str | None]], timeout: float, counted: bool = False,
    ) -> None:
        """Waits for `next_event()` (a JSON text, or None when the worker drains) at most `timeout`
        seconds and answers it, or 204; `counted`: in the long-polls-waiting gauge meanwhile."""
        worker = self.worker
        event: str | None = None
        if not worker.state.draining:
            self._waiter = next_event()
            waiting = metrics.LONG_POLLS.labels(worker.state.worker_id_header) if counted else None
            if waiting is not None:
                waiting.inc()
            try:
                event = await asyncio.wait_for(self._waiter, timeout)
            except TimeoutError:
                event = None
            finally:
                if waiting is not None:
                    waiting.dec()
        if event is None:
            self.set_status(204)
            self.finish()
        else:
            self.set_header("Content-Type", "application/json")
            self.finish(event)

    def on_connection_close(self) -> None:
        """The client left: stop waiting for it (the response goes nowhere)."""
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        super().on_connection_close()
