"""What a worker hands its handlers: its state, its tick bus, the /metrics renderer, its rooms.

The worker builds one `WorkerContext` after the fork and puts it in the Tornado Application's
settings (`worker`), Tornado's documented place for what handlers share; handlers read it from
there. So handlers depend on this small type, not on the application that routes to them, and
data flows one way: config -> supervisor -> worker -> app -> handlers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from service.http.state import WorkerState
from service.rooms.hub import Hub
from service.ws.ticker import Ticker

SETTING = "worker"  # the key of the context in Application.settings

MetricsRenderer = Callable[[str | None], tuple[bytes, str]]


@dataclass(frozen=True)
class WorkerContext:
    state: WorkerState
    ticker: Ticker
    render_metrics: MetricsRenderer
    hub: Hub | None = None  # rooms and their backplane (None: the rooms' routes answer 503)
