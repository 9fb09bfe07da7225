"""Endpoints that stand for real work: waiting on I/O without blocking, and burning CPU.

/api/sleep is what a Tornado service is good at (thousands can wait at once);
/api/compute is what it is bad at (the whole worker stalls), kept to show the difference.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from service.handlers.base import BaseHandler
from service.telemetry import metrics

SLEEP_MAX_MS = 60_000
COMPUTE_MAX_N = 10_000_000
POLL_MAX_SECONDS = 300.0
POLL_DEFAULT_SECONDS = 30.0


class SleepHandler(BaseHandler):
    async def get(self) -> None:
        ms = self.int_arg("ms", 0, SLEEP_MAX_MS)
        started = time.monotonic()
        await asyncio.sleep(ms / 1000.0)
        state = self.worker.state
        self.write_json({
            "worker": state.worker_id,
            "pid": state.pid,
            "slept_ms": ms,
            "elapsed_ms": round((time.monotonic() - started) * 1000.0, 3),
        })


class ComputeHandler(BaseHandler):
    def get(self) -> None:
        n = self.int_arg("n", 1, COMPUTE_MAX_N)
        started = time.monotonic()
        result = sum(i * i for i in range(n)) % 1_000_000_007  # blocks the event loop, on purpose
        state = self.worker.state
        self.write_json({
            "worker": state.worker_id,
            "pid": state.pid,
            "n": n,
            "result": result,
            "elapsed_ms": round((time.monotonic() - started) * 1000.0, 3),
        })


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
