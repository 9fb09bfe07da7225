"""Every Prometheus metric of the service, summed over all worker processes at scrape time.

prometheus-client's multiprocess mode: each process appends to its own files in
PROMETHEUS_MULTIPROC_DIR, and `renderer` merges them when /metrics is scraped, in whichever
worker answers. `service.telemetry.metrics_dir` holds the directory's contract: this module may be imported
only once the directory is prepared, and only the supervisor marks a process dead. Gauges say how
a dead worker's value is treated: `live*` modes drop it once it is marked dead; counters and
histograms keep its history, so a restart does not make `rate()` jump backwards.

Labels are bounded: `handler` is a route's name (unknown paths share `not_found`), `method` one
of the standard verbs or `other`, `worker` a worker id (0..n-1, stable across restarts).

The two per-request metrics are not written per request: a worker adds each request to plain
Python totals (`RequestTotals`), and its `Flusher` adds those into the multiprocess values every
100 ms, before it answers a scrape, and when it drains and exits. A scrape must also see the
other workers' latest requests, so the answering worker asks them all through a page of shared
memory the supervisor makes before the fork (`FlushBoard`) and waits for them, a bounded time.

Every metric has labels, so importing this module creates no value and so no file. The
supervisor writes three things of its own: the build info, and a 0 for every worker id in
`tornado_worker_restarts_total` and `tornado_workers_alive` (`declare_workers`), so those series
exist from the start and `increase()` sees the first restart. Nothing is counted twice: a forked
worker inherits the parent's values, but prometheus-client notices the new pid at the worker's
first metric write, opens files of its own and re-reads every inherited value from them (0).

This module is a leaf: everything may import it and it imports nothing from the service.
"""

from __future__ import annotations

import asyncio
import math
import mmap
import os
from bisect import bisect_left
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
# Not a `reason` label of the counter above: its alert, runbook and dashboards speak of MAX_CONNECTIONS.
CONNECTIONS_REFUSED_MEMORY = Counter(
    "tornado_connections_refused_memory_total",
    "Connections refused with 503 while the cgroup's memory was over MEMORY_SHED_AT", ["worker"],
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

# -- memory shedding (service.process.memguard), sampled every second by each worker that has a limit -----
MEMORY_USED = Gauge(
    "tornado_memory_working_set_bytes",
    "Working set (usage less inactive file cache) of the fullest memory-limited cgroup of the worker",
    ["worker"], multiprocess_mode="livemax",
)
MEMORY_LIMIT = Gauge(
    "tornado_memory_limit_bytes", "Memory limit of that cgroup (what the OOM killer enforces)",
    ["worker"], multiprocess_mode="livemax",
)
MEMORY_SHEDDING = Gauge(
    "tornado_memory_shedding",
    "1 while the worker takes no more connections than it held when memory reached MEMORY_SHED_AT",
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


LATENCY_BOUNDS = (*LATENCY_BUCKETS, math.inf)  # the histogram's buckets as prometheus-client keeps them
FLUSH_SECONDS = 0.1  # what a SIGKILL can lose of a worker's request counts
ASK_CHECK_SECONDS = 0.05  # how often a worker looks whether another worker's scrape asked for a flush
SCRAPE_WAIT_SECONDS = 0.15  # how long a scrape waits for the other workers' flushes, at most

FLUSHER_SETTING = "metrics_flusher"  # the worker's Flusher in Application.settings, for /metrics
RequestKey = tuple[str, str, int]  # (method label, handler, status code)


class RequestTotals:
    """A worker's HTTP requests since its last flush, in plain Python: per (method, handler, code),
    the latency histogram's bucket counts and sum (the request count is the buckets' total).

    Writing prometheus-client's values per request cost three mmap writes (the counter, one
    bucket, the sum), each behind a lock and a getpid() check for a fork; here a request is a
    dict lookup and two list additions, and `flush` makes the writes, a few per key seen, for
    all the requests since the last one. Only the worker's event loop touches it.
    """

    def __init__(self) -> None:
        self.rows: dict[RequestKey, list[float]] = {}  # [bucket 0, ..., bucket +Inf, sum]
        self._children: dict[RequestKey, tuple[Counter, Histogram]] = {}

    def add(self, method: str, handler: str, code: int, seconds: float) -> None:
        """One finished request (the access observer does the same inline, see service.http.access)."""
        row = self.rows.get((method, handler, code))
        if row is None:
            row = self.rows[(method, handler, code)] = self.new_row()
        row[bisect_left(LATENCY_BOUNDS, seconds)] += 1
        row[-1] += seconds

    @staticmethod
    def new_row() -> list[float]:
        return [0] * len(LATENCY_BOUNDS) + [0.0]

    def flush(self) -> None:
        """Add every total into the multiprocess values, and start again from zero."""
        for key, row in self.rows.items():
            count = sum(row[:-1])
            if not count:
                continue
            # Zeroed before the writes: were one to fail (a full disk), its counts would be lost
            # rather than added twice by the next flush.
            taken, row[:] = row[:], self.new_row()
            children = self._children.get(key)
            if children is None:  # labels() takes a lock and builds tuples: once per key
                method, handler, code = key
                children = self._children[key] = (
                    REQUESTS.labels(method, handler, str(code)), DURATION.labels(method, handler)
                )
            counter, histogram = children
            # prometheus-client has no public way to add n observations to a bucket at once:
            # its Histogram keeps one value per bucket in `_buckets` and the sum in `_sum`, the
            # values `observe` increments (pinned by tests/test_contracts.py; constraints.txt pins
            # the version). The buckets are stored per bucket, not cumulatively, as here.
            buckets = histogram._buckets
            for index, observed in enumerate(taken[:-1]):
                if observed:
                    buckets[index].inc(observed)
            histogram._sum.inc(taken[-1])
            counter.inc(count)

    def forget(self) -> None:
        """After a fork: nothing the parent counted is the child's (a worker starts from zero)."""
        self.rows.clear()  # in place: the access observer holds on to this dict
        self._children.clear()


HTTP_TOTALS = RequestTotals()  # this process's; every worker has its own after the fork
os.register_at_fork(after_in_child=HTTP_TOTALS.forget)


class FlushBoard:
    """The page through which a scrape asks every worker to flush: shared memory made before the fork.

    An anonymous MAP_SHARED mapping that the supervisor makes before it forks, so every worker,
    and every worker restarted later, shares the same memory (nothing on disk, nothing to clean
    up). 64-bit words: word 0 is the generation, bumped by a worker answering a scrape; then per
    worker id, the generation that worker flushed last and its pid while it serves (0 when it is
    not), so a scrape waits only for workers that are there. Aligned 64-bit words are written
    whole; two scrapes bumping at once may both write the same generation, which asks the same
    thing twice, no harm done.
    """

    def __init__(self, workers: int) -> None:
        size = 8 * (1 + 2 * workers)
        self._map = mmap.mmap(-1, max(size, mmap.PAGESIZE))  # -1: anonymous; shared across fork
        self._words = memoryview(self._map).cast("q")
        self.workers = workers

    def generation(self) -> int:
        return int(self._words[0])

    def ask(self) -> int:
        """Ask every worker to flush; the generation to wait for."""
        wanted = self._words[0] + 1
        self._words[0] = wanted
        return int(wanted)

    def join(self, worker_id: int, pid: int) -> None:
        if 0 <= worker_id < self.workers:
            self._words[1 + 2 * worker_id] = self._words[0]
            self._words[2 + 2 * worker_id] = pid

    def leave(self, worker_id: int) -> None:
        if 0 <= worker_id < self.workers:
            self._words[2 + 2 * worker_id] = 0

    def flushed(self, worker_id: int, generation: int) -> None:
        if 0 <= worker_id < self.workers and self._words[1 + 2 * worker_id] < generation:
            self._words[1 + 2 * worker_id] = generation

    def all_flushed(self, generation: int) -> bool:
        """Every serving worker has flushed since `generation` was asked for."""
        words = self._words
        return all(
            not words[2 + 2 * worker_id] or words[1 + 2 * worker_id] >= generation
            for worker_id in range(self.workers)
        )


class Flusher:
    """In a worker: adds its `RequestTotals` into the multiprocess values, on four occasions.

    1. every FLUSH_SECONDS (100 ms): a SIGKILL loses at most that much of this worker's counts;
    2. when another worker's scrape asks (looked for every ASK_CHECK_SECONDS, 50 ms);
    3. before this worker answers a scrape (`flush_everywhere`, which also asks the others and
       waits up to SCRAPE_WAIT_SECONDS for them: a worker stuck in CPU-bound work cannot answer,
       and its latest counts appear in a later scrape);
    4. when the worker drains and when it exits (`stop`).
    Without a board (one process, a test) it flushes only its own totals.
    """

    def __init__(self, totals: RequestTotals, worker_id: int, board: FlushBoard | None = None) -> None:
        self.totals = totals
        self.worker_id = worker_id
        self.board = board
        self._seen = board.generation() if board is not None else 0
        self._timer: asyncio.TimerHandle | None = None
        self._checks = 0

    def start(self) -> None:
        if self.board is not None:
            self.board.join(self.worker_id, os.getpid())
        self._timer = asyncio.get_running_loop().call_later(ASK_CHECK_SECONDS, self._check)

    def stop(self) -> None:
        """The last flush, as the worker leaves: afterwards no scrape waits for it."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()
        if self.board is not None:
            self.board.leave(self.worker_id)

    def flush(self) -> None:
        board = self.board
        asked = board.generation() if board is not None else 0  # read before: a later ask flushes again
        self.totals.flush()
        if board is not None:
            board.flushed(self.worker_id, asked)
        self._seen = asked

    def _check(self) -> None:
        self._checks += 1
        board = self.board
        try:
            if self._checks % round(FLUSH_SECONDS / ASK_CHECK_SECONDS) == 0 or (
                board is not None and board.generation() != self._seen
            ):
                self.flush()
        finally:
            self._timer = asyncio.get_running_loop().call_later(ASK_CHECK_SECONDS, self._check)

    async def flush_everywhere(self, timeout: float = SCRAPE_WAIT_SECONDS) -> bool:
        """Before a scrape: flush here, ask every worker to, and wait for them (bounded).

        True when every serving worker flushed in time.
        """
        self.flush()
        board = self.board
        if board is None:
            return True
        wanted = board.ask()
        board.flushed(self.worker_id, wanted)  # this worker has nothing newer than the flush above
        self._seen = wanted
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not board.all_flushed(wanted):
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.005)
        return True


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
