"""Every Prometheus metric of the service, summed over all worker processes at scrape time.

prometheus-client's multiprocess mode: each process appends to its own files in
PROMETHEUS_MULTIPROC_DIR, and `renderer` merges them when /metrics is scraped, in whichever
worker answers. `service.metrics_dir` holds the directory's contract: this module may be imported
only once the directory is prepared, and only the supervisor marks a process dead. Gauges say how
a dead worker's value is treated: `live*` modes drop it once it is marked dead; counters and
histograms keep its history, so a restart does not make `rate()` jump backwards.

Labels are bounded: `handler` is a route's name (unknown paths share `not_found`), `method` one
of the standard verbs or `other`, `worker` a worker id (0..n-1, stable across restarts).

Every metric has labels, so importing this module creates no value and so no file. The
supervisor writes three things of its own: the build info, and a 0 for every worker id in
`tornado_worker_restarts_total` and `tornado_workers_alive` (`declare_workers`), so those series
exist from the start and `increase()` sees the first restart. Nothing is counted twice: a forked
worker inherits the parent's values, but prometheus-client notices the new pid at the worker's
first metric write, opens files of its own and re-reads every inherited value from them (0).

This module is a leaf: everything may import it and it imports nothing from the service.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

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
MAX_CONNECTIONS = Gauge(  # the cap, so an alert can say how close to it a worker is
    "tornado_max_connections", "MAX_CONNECTIONS: open connections a worker holds before refusing with 503",
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
WORKER_MAX_FDS = Gauge(  # the other half of the ratio an alert watches: open / limit
    "tornado_worker_max_fds", "Open-files soft limit (RLIMIT_NOFILE) of the worker process",
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


def declare_workers(workers: int) -> None:
    """In the supervisor, before the fork: every worker id's restart count and liveness exist at 0.

    A series that appears only at its first increment hides that increment from `increase()`
    and `rate()` (there is no earlier sample to compare with), so a worker's first restart would
    never alert. `tornado_workers_alive` is a livesum: the supervisor's file contributes this 0
    for as long as the service runs, each live worker adds its 1, and a dead worker's 1 leaves
    with its file (`mark_dead`), so a worker that is down reads 0 instead of vanishing.
    """
    for worker_id in range(workers):
        label = str(worker_id)
        WORKER_RESTARTS.labels(label).inc(0)
        WORKERS_ALIVE.labels(label).set(0)


def sample_process(worker: str, process: psutil.Process) -> None:
    """Per-worker figures the multiprocess collector does not export by itself."""
    with process.oneshot():
        cpu = process.cpu_times()
        WORKER_CPU.labels(worker).set(cpu.user + cpu.system)
        WORKER_MEMORY.labels(worker).set(process.memory_info().rss)
        WORKER_FDS.labels(worker).set(process.num_fds())
    # Read each time, not once: the limit can be changed from outside (prlimit) while we run.
    soft = process.rlimit(psutil.RLIMIT_NOFILE)[0]
    WORKER_MAX_FDS.labels(worker).set(math.inf if soft == psutil.RLIM_INFINITY else soft)


def renderer(path: Path | None) -> Callable[[str | None], tuple[bytes, str]]:
    """A function from an Accept header to (body, content type), summing every process's files."""
    if path is not None:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(path))
    else:  # one process, no directory (an embedded app, a test): the default registry has it all
        registry = REGISTRY

    def render(accept: str | None) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept or "")
        return encoder(registry), content_type

    return render
