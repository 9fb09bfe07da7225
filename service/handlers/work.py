"""Endpoints that stand for real work: waiting on I/O without blocking, and burning CPU.

/api/sleep is what a Tornado service is good at (thousands can wait at once);
/api/compute is what it is bad at (the whole worker stalls), kept to show the difference.
"""

from __future__ import annotations

import asyncio
import time

from service.handlers.base import BaseHandler

SLEEP_MAX_MS = 60_000
COMPUTE_MAX_N = 10_000_000


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
