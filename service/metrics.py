"""Every Prometheus metric of the service, summed over all worker processes at scrape time.

prometheus-client's multiprocess mode: each process appends to its own files in
PROMETHEUS_MULTIPROC_DIR (see `service.metrics_dir`), and `render` merges them when /metrics is
scraped, in whichever worker answers. Gauges say how a dead worker's value is treated: `live*`
modes drop it once the supervisor calls `mark_dead(pid)`; counters and histograms keep its
history, so a restart does not make `rate()` jump backwards.

Labels are bounded: `handler` is a route's name (unknown paths share `not_found`), `method` one
of the standard verbs or `other`, `worker` a worker id (0..n-1, stable across restarts).

Every metric a worker writes has labels, so importing this module in the supervisor creates no
value and so no file: each worker's files are made by that worker, after the fork.

This module is a leaf: everything may import it and it imports nothing from the service.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import psutil
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.exposition import choose_encoder

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# -- HTTP --------------------------------------------------------------------------------------
REQUESTS = Counter("http_requests_total", "HTTP requests finished", ["method", "handler", "code"])
DURATION = Histogram(
    "http_request_duration_seconds", "Time from request received to response finished",
    ["method", "handler"], buckets=LATENCY_BUCKETS,
)
IN_PROGRESS = Gauge(  # sampled once a second, not touched per request (it would cost two writes)
    "http_requests_in_progress", "HTTP requests being handled, per worker (sampled every second)",
    ["worker"], multiprocess_mode="livemax",
)

# -- connections -------------------------------------------------------------------------------
CONNECTIONS = Gauge(
    "tornado_connections_open", "Open TCP connections (HTTP and WebSocket), per worker",
    ["worker"], multiprocess_mode="livemax",
)
CONNECTIONS_REFUSED = Counter(
    "tornado_connections_refused_total", "Connections refused with 503 at MAX_CONNECTIONS", ["worker"]
)
WEBSOCKETS = Gauge(
    "tornado_websocket_connections_open", "Open WebSocket connections", ["handler"],
    multiprocess_mode="livesum",
)
WEBSOCKET_MESSAGES = Counter(
    "tornado_websocket_messages_total", "WebSocket messages received (in) and sent (out)",
    ["handler", "direction"],
)
WEBSOCKET_SLOW = Counter(
    "tornado_websocket_slow_consumers_total",
    "WebSockets disconnected because their reader fell MAX_WRITE_BUFFER bytes behind", ["handler"],
)
LONG_POLLS = Gauge(
    "tornado_long_polls_waiting", "Long polls waiting for a tick", ["worker"], multiprocess_mode="livesum"
)

# -- the event loop and the worker processes -----------------------------------------------------
LOOP_LAG = Histogram(
    "tornado_event_loop_lag_seconds", "How late a periodic timer fires: time the loop was blocked",
    ["worker"], buckets=LAG_BUCKETS,
)
WORKER_CPU = Gauge(
    "tornado_worker_cpu_seconds", "CPU time (user+system) used by the worker process",
    ["worker"], multiprocess_mode="livemax",
)
WORKER_MEMORY = Gauge(
    "tornado_worker_resident_memory_bytes", "Resident memory of the worker process",
    ["worker"], multiprocess_mode="livemax",
)
WORKER_FDS = Gauge(
    "tornado_worker_open_fds", "Open file descriptors of the worker process",
    ["worker"], multiprocess_mode="livemax",
)

# -- the supervisor ----------------------------------------------------------------------------
WORKERS_ALIVE = Gauge(
    "tornado_workers_alive", "Worker processes running (1 per live worker)", ["worker"],
    multiprocess_mode="livesum",
)
WORKER_RESTARTS = Counter("tornado_worker_restarts_total", "Workers restarted after dying", ["worker"])
BUILD_INFO = Gauge(
    "tornado_build_info", "Always 1; the labels say what is running",
    ["version", "tornado", "python", "workers"], multiprocess_mode="max",
)


def method_label(method: str | None) -> str:
    return method if method in METHODS else "other"


def mark_dead(pid: int) -> None:
    """A worker is gone: its live gauges stop counting (its counters stay)."""
    multiprocess.mark_process_dead(pid)


def sample_process(worker: str, process: psutil.Process) -> None:
    """Per-worker figures the multiprocess collector does not export by itself."""
    with process.oneshot():
        cpu = process.cpu_times()
        WORKER_CPU.labels(worker).set(cpu.user + cpu.system)
        WORKER_MEMORY.labels(worker).set(process.memory_info().rss)
        WORKER_FDS.labels(worker).set(process.num_fds())


def renderer() -> Callable[[str | None], tuple[bytes, str]]:
    """A function from an Accept header to (body, content type), summing every process's files."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=path)
    else:  # one process, no directory (an embedded app, a test): the default registry has it all
        registry = REGISTRY

    def render(accept: str | None) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept or "")
        return encoder(registry), content_type

    return render
