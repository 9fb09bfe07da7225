"""Publish rates: a token bucket per publisher, and a bounded set of them per client address.

A bucket holds up to `burst` tokens and gains `rate` a second; each publish takes one, and a
publish that finds none is refused. Time is the caller's monotonic clock, passed in (tests give
their own). A rate of 0 means no limit.

This module is a leaf: it imports nothing from the service.
"""

from __future__ import annotations

import time
from collections import OrderedDict


class TokenBucket:
    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, now: float | None = None) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic() if now is None else now

    def take(self, now: float | None = None) -> bool:
        """One token if there is one (True), else False; refilled for the time since the last call."""
        if self.rate <= 0:
            return True
        now = time.monotonic() if now is None else now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def wait(self) -> float:
        """Seconds until the next token (for Retry-After)."""
        return 0.0 if self.rate <= 0 or self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate


class AddressBuckets:
    """One bucket per client address, the `limit` most recently seen kept (a worker's memory is bounded).

    An address pushed out by `limit` newer ones starts again with a full bucket: with the default
    limit that takes ten thousand other addresses publishing in between.
    """

    def __init__(self, rate: float, burst: int, limit: int = 10_000) -> None:
        self.rate = rate
        self.burst = burst
        self.limit = limit
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, address: str, now: float | None = None) -> tuple[bool, float]:
        """(allowed, seconds until the next token when not)."""
        if self.rate <= 0:
            return True, 0.0
        now = time.monotonic() if now is None else now
        bucket = self._buckets.get(address)
        if bucket is None:
            bucket = self._buckets[address] = TokenBucket(self.rate, self.burst, now)
            if len(self._buckets) > self.limit:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(address)
        allowed = bucket.take(now)
        return allowed, 0.0 if allowed else bucket.wait()

    def __len__(self) -> int:
        return len(self._buckets)
