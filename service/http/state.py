"""What one worker knows about its own life: ready or draining, requests in flight, sockets open.

Handlers report into it (a request started, a WebSocket opened) and the drain reads it
(wait until no request is in flight, close every WebSocket with 1001). It lives in the worker
process only; the supervisor never sees it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Protocol


class Closable(Protocol):
    def close(self, code: int | None = None, reason: str | None = None) -> None: ...


@dataclass
class WorkerState:
    worker_id: int
    pid: int = field(default_factory=os.getpid)
    ready: bool = False
    draining: bool = False
    in_flight: int = 0
    websockets: set[Closable] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.worker_id_header = str(self.worker_id)
        self.pid_header = str(self.pid)

    def request_started(self) -> None:
        self.in_flight += 1

    def request_finished(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)

    @property
    def busy(self) -> bool:
        """Something the drain must wait for: a request in flight or a WebSocket not yet closed."""
        return self.in_flight > 0 or bool(self.websockets)

    def close_websockets(self, code: int, reason: str) -> int:
        sockets = list(self.websockets)
        for ws in sockets:
            ws.close(code, reason)
        return len(sockets)
