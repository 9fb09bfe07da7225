"""One worker's life, after the fork: start serving, wait for SIGTERM, drain, exit 0.

Everything that holds an event loop is created here, in the child: uvloop's loop, Tornado's
IOLoop wrapper, the HTTP server on the inherited listening sockets, the tick bus. The drain, in
order (each step is what an operator expects from a rolling update):

1. /readyz turns 503 and keep-alive is switched off, so each later response carries
   `Connection: close` and clients reconnect (to another pod, once the balancer has noticed);
   the request counts so far are flushed to the metric files (service.telemetry.metrics);
2. after DRAIN_DELAY, this worker closes its listening sockets: once every holder has, new
   connections are refused;
3. long polls get their answer now (204) and WebSockets get a close frame with 1001;
4. in-flight requests finish, until the worker's share of SHUTDOWN_GRACE runs out;
5. what is left is closed, the last request counts are flushed, and the worker exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from pathlib import Path
from typing import NoReturn

import psutil
import uvloop
from tornado.ioloop import PeriodicCallback

from service.app import ServiceApp, count_chat_sent, count_ticks_sent
from service.config import Settings
from service.http.context import WorkerContext
from service.http.forwarded import TrustedProxies
from service.http.server import LimitedHTTPServer
from service.http.state import WorkerState
from service.process import gcpolicy, memguard
from service.process.looplag import LoopLagMonitor
from service.rooms.hub import Hub, build_hub
from service.telemetry import logs, metrics
from service.ws.ticker import Ticker

GOING_AWAY = 1001
NAME_PREFIX = "tornado-w"  # worker N is named tornado-wN (comm): for ps, top, and the supervisor
_log = logs.get_logger("service.worker")


def worker_id_of(process_name: str) -> int | None:
    """The worker id in a process name set by `run`, or None for any other process."""
    suffix = process_name.removeprefix(NAME_PREFIX)
    return int(suffix) if suffix != process_name and suffix.isdigit() else None


def drain_budget(grace: float) -> float:
    """The worker's share of SHUTDOWN_GRACE: the supervisor keeps a margin to reap and exit."""
    return grace - min(1.0, grace * 0.2)


def become(
    worker_id: int, slots: list[list[socket.socket]], settings: Settings, supervisor_pid: int,
    metrics_path: Path, flush_board: metrics.FlushBoard | None = None,
) -> NoReturn:
    """In a just-forked child: serve on this slot's sockets, then leave without the parent's exit path."""
    mine = slots[worker_id]
    for slot in slots:
        if slot is not mine:
            for sock in slot:
                sock.close()
    try:
        code = run(worker_id, mine, settings, supervisor_pid, metrics_path, flush_board)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:  # a bug in a worker: one JSON line with the traceback, then a restart
        _log.exception("worker crashed", worker=worker_id)
        code = 1
    with contextlib.suppress(Exception):  # what a crash left unflushed (after a clean exit: nothing)
        metrics.HTTP_TOTALS.flush()
    logs.flush()
    os._exit(code)  # no atexit hooks, no removal of the metrics directory: those are the parent's


def run(
    worker_id: int, sockets: list[socket.socket], settings: Settings, supervisor_pid: int,
    metrics_path: Path | None = None, flush_board: metrics.FlushBoard | None = None,
) -> int:
    """Serve on `sockets` until told to stop; returns the exit code (0 after a clean drain)."""
    # Ctrl-C in a terminal reaches the whole process group: let the supervisor alone turn it
    # into one orderly SIGTERM per worker. SIGTERM itself is handled once the loop runs.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    logs.bind_process(worker=worker_id, pid=os.getpid())
    gcpolicy.tune_for_many_connections()  # full collections stalled the loop for seconds at 10,000 sockets
    with contextlib.suppress(OSError):  # Linux only; a name is a convenience, not a requirement
        Path("/proc/self/comm").write_text(f"{NAME_PREFIX}{worker_id}")
    return uvloop.run(_serve(worker_id, sockets, settings, supervisor_pid, metrics_path, flush_board))


async def _serve(
    worker_id: int, sockets: list[socket.socket], settings: Settings, supervisor_pid: int,
    metrics_path: Path | None, flush_board: metrics.FlushBoard | None,
) -> int:
    loop = asyncio.get_running_loop()
    state = WorkerState(worker_id)
    label = state.worker_id_header  # the `worker` label of every per-worker metric
    ticker = Ticker(settings.tick_interval, worker_id, on_fanout=count_ticks_sent)
    hub = build_hub(settings, worker_id, on_sent=count_chat_sent)  # rooms and their backplane
    context = WorkerContext(state, ticker, metrics.renderer(metrics_path), hub)
    # Request counts are kept in plain Python and flushed into the metric files (service.telemetry.metrics)
    flusher = metrics.Flusher(metrics.HTTP_TOTALS, worker_id, flush_board)
    guard = memguard.MemoryGuard(settings.memory_shed_at, label)  # the cgroup's memory limit, if any
    server = LimitedHTTPServer(
        ServiceApp(settings, context, **{metrics.FLUSHER_SETTING: flusher}),
        trust_forwarded=TrustedProxies(settings.forwarded_allow_ips),
        max_body_size=settings.max_body_size,
        max_header_size=settings.max_header_size,
        idle_connection_timeout=settings.idle_timeout,
        body_timeout=settings.body_timeout,
        max_connections=settings.max_connections,
        max_write_buffer=settings.max_write_buffer,
        on_refuse=metrics.CONNECTIONS_REFUSED.labels(label).inc,
        on_shed=guard.count_refusal,
        on_accept=guard.count_accept if guard.enabled else None,
        identity={"X-Worker-Id": state.worker_id_header, "X-Worker-PID": state.pid_header},
    )
    server.add_sockets(sockets)

    stop = asyncio.Event()
    reason: list[str] = []

    def request_stop(why: str) -> None:
        if not stop.is_set():
            reason.append(why)
            stop.set()

    loop.add_signal_handler(signal.SIGTERM, request_stop, "SIGTERM")

    process = psutil.Process()

    def housekeeping() -> None:
        """Once a second: refresh the sampled gauges, and notice if this worker was orphaned."""
        metrics.CONNECTIONS.labels(label).set(server.open_connections())
        metrics.IN_PROGRESS.labels(label).set(state.in_flight)
        metrics.sample_process(label, process)
        if os.getppid() != supervisor_pid:  # the supervisor was SIGKILLed: drain, don't serve forever
            request_stop("supervisor gone")

    housekeeper = PeriodicCallback(housekeeping, 1000.0)
    housekeeper.start()
    lag = LoopLagMonitor(metrics.LOOP_LAG.labels(label))
    lag.start()
    flusher.start()
    ticker.start()
    hub.start()  # never waits for Redis: publishes get 503 until it is there
    guard.start(server)  # once a second: over MEMORY_SHED_AT, no more connections than open then
    metrics.WORKERS_ALIVE.labels(label).set(1)
    metrics.MAX_CONNECTIONS.labels(label).set(settings.max_connections)  # as fitted to the fd limit
    housekeeping()
    state.ready = True
    _log.info("worker started", connections_cap=settings.max_connections)

    await stop.wait()
    await drain(server, state, ticker, settings, reason[0], flusher, hub)
    await hub.stop()
    housekeeper.stop()
    guard.stop()
    lag.stop()
    flusher.stop()  # the last counts, before the exit; no scrape waits for this worker after it
    # Drained: a late SIGTERM (say, the whole process group signalled as well as the supervisor's
    # forward) must not turn this clean exit into a death by signal once the loop closes.
    loop.remove_signal_handler(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return 0


async def drain(
    server: LimitedHTTPServer, state: WorkerState, ticker: Ticker, settings: Settings, reason: str,
    flusher: metrics.Flusher | None = None, hub: Hub | None = None,
) -> None:
    started = time.monotonic()
    deadline = started + drain_budget(settings.shutdown_grace)
    state.draining = True
    server.stop_keep_alive()
    if flusher is not None:  # what was served so far counts at once (the timer goes on through the drain)
        flusher.flush()
    _log.info("draining", reason=reason, in_flight=state.in_flight, websockets=len(state.websockets))
    if settings.drain_delay:
        await asyncio.sleep(settings.drain_delay)
    server.stop()
    ticker.stop()
    polls = ticker.release_waiters() + (hub.release_waiters() if hub is not None else 0)
    sockets = state.close_websockets(GOING_AWAY, "server shutting down")
    while state.busy and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    cut = state.in_flight
    if state.busy:
        _log.warning("drain deadline reached, closing what is left",
                     in_flight=state.in_flight, websockets=len(state.websockets))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(server.close_all_connections(), max(0.1, deadline - time.monotonic()))
    _log.info(
        "worker drained",
        released_polls=polls,
        closed_websockets=sockets,
        requests_cut=cut,
        drain_seconds=round(time.monotonic() - started, 3),
    )
