"""Event-loop lag: how late a timer fires, the one number that shows blocking work.

A worker blocked by CPU-bound code (`/api/compute`) cannot run anything else: every request,
tick and WebSocket frame of that worker waits. Throughput metrics hide it; this does not.
"""

from __future__ import annotations

import asyncio

from prometheus_client import Histogram


class LoopLagMonitor:
    def __init__(self, histogram: Histogram, interval: float = 0.25) -> None:
        self._histogram = histogram
        self._interval = interval
        self._handle: asyncio.TimerHandle | None = None
        self._expected = 0.0

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._expected = loop.time() + self._interval
        self._handle = loop.call_at(self._expected, self._fire)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._histogram.observe(max(0.0, now - self._expected))
        self._expected = now + self._interval
        self._handle = loop.call_at(self._expected, self._fire)
