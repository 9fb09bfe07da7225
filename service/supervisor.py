"""The supervisor: bind, fork, restart, and on SIGTERM drain every worker and exit.

Read top to bottom, `run` is the whole life of the parent process:

1. size the worker pool (WEB_CONCURRENCY, else the CPUs this process may use) and raise the
   open-files limit to fit the connection cap;
2. bind the listening socket(s), in the parent, so every worker shares the port (with
   REUSE_PORT, one SO_REUSEPORT socket per worker slot, balanced by the kernel);
3. fork the workers with Tornado's own `fork_processes`, which also restarts a worker that dies
   (crash, SIGKILL, non-zero exit) under the same worker id, leaves one that exits 0 alone, and
   gives up after MAX_RESTARTS restarts (we then stop the others and exit 1);
4. on SIGTERM or SIGINT, leave `fork_processes` (the signal handler raises `StopRequested`,
   the only thing it does) and `shutdown`: close the parent's copy of the listener, send each
   worker one SIGTERM, reap them until SHUTDOWN_GRACE runs out, SIGKILL what is left.
   A second signal during the shutdown kills the workers at once.

`fork_processes` knows nothing of shutting down: left running, it would restart a worker that
was killed while draining. Leaving it is what makes the shutdown final; no worker is forked
after the parent stops. The price of leaving by exception: a worker that fork_processes reaps
at the very instant the signal lands (it exited on its own, say from a process-group signal)
is not logged by it; the shutdown reaps and logs every other one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import ClassVar, NoReturn, cast

import psutil
from tornado.netutil import bind_sockets
from tornado.process import fork_processes

from service import __version__, logs, metrics, worker
from service.config import Settings, describe
from service.cpus import cpu_budget

_log = logs.get_logger("service.supervisor")
FD_RESERVE = 256  # descriptors a worker needs besides its connections (logs, metrics files, DNS...)


class StopRequested(BaseException):
    """Raised by the signal handler to take the parent out of fork_processes' wait loop."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)


def run(settings: Settings) -> int:
    logs.bind_process(role="supervisor", pid=os.getpid())
    _log.info("starting", **version_info(), settings=describe(settings),
              metrics_dir=os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
    workers = worker_count(settings)
    settings = fit_open_files(settings)
    try:
        slots = bind(settings, workers)
    except OSError as exc:  # in use, or not an address of this host: say which setting to change
        _log.error("cannot listen: check PORT and ADDRESS", port=settings.port,
                   address=settings.address or "*", error=str(exc))
        return 1
    _log.info("listening", addresses=[_address(s) for s in slots[0]], port=slots[0][0].getsockname()[1],
              reuse_port=settings.reuse_port, backlog=settings.backlog)

    metrics.BUILD_INFO.labels(**version_info(), workers=str(workers)).set(1)
    metrics.declare_workers(workers)  # restarts and liveness at 0 per worker id, before any fork
    signals = StopSignals(os.getpid())
    logging.getLogger("tornado.general").addFilter(ForkEvents(signals.supervisor_pid))
    try:
        worker_id = fork_processes(workers, max_restarts=settings.max_restarts)
    except StopRequested as stop:
        return shutdown(slots, settings, str(stop), signals)
    except RuntimeError as exc:  # "Too many child restarts, giving up"
        signals.stopping = True
        _log.error("crash loop: giving up", error=str(exc), max_restarts=settings.max_restarts)
        shutdown(slots, settings, "crash loop", signals)
        return 1
    except SystemExit:  # fork_processes exits 0 once every worker has exited 0
        _log.info("every worker exited cleanly")
        return 0

    become_worker(worker_id, slots, settings, signals.supervisor_pid)


def become_worker(
    worker_id: int, slots: list[list[socket.socket]], settings: Settings, parent: int
) -> NoReturn:
    """In a forked child: serve on this slot's sockets, then leave without the parent's exit path."""
    mine = slots[worker_id]
    for slot in slots:
        if slot is not mine:
            for sock in slot:
                sock.close()
    try:
        code = worker.run(worker_id, mine, settings, parent)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:  # a bug in a worker: one JSON line with the traceback, then a restart
        _log.exception("worker crashed", worker=worker_id)
        code = 1
    logs.flush()
    os._exit(code)  # no atexit hooks, no removal of the metrics directory: those are the parent's


class StopSignals:
    """SIGTERM and SIGINT in the parent: the first one leaves fork_processes, later ones are counted.

    Raising from a handler is how the parent gets out of `os.wait()` inside fork_processes;
    raising only once is what keeps the shutdown code itself from being interrupted by a second
    signal, which `shutdown` reads from `repeated` instead.
    """

    def __init__(self, supervisor_pid: int) -> None:
        self.supervisor_pid = supervisor_pid
        self.stopping = False
        self.repeated = False
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if os.getpid() != self.supervisor_pid:
            # A worker forked a moment ago, before it set its own handlers: act as the default would.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.stopping:
            self.repeated = True
            return
        self.stopping = True
        raise StopRequested(signum)


class ForkEvents(logging.Filter):
    """fork_processes reports its children's deaths as text; turn those into structured events.

    Each record's arguments are (worker id, pid, signal or status), so nothing is parsed: the
    filter matches Tornado's format strings, does the bookkeeping a death implies (the worker's
    live gauges stop counting, a restart is counted) and logs a JSON event in place of the line.
    """

    KILLED = "child %d (pid %d) killed by signal %d, restarting"
    FAILED = "child %d (pid %d) exited with status %d, restarting"
    CLEAN = "child %d (pid %d) exited normally"
    STARTING = "Starting %d processes"

    def __init__(self, supervisor_pid: int) -> None:
        super().__init__()
        self.supervisor_pid = supervisor_pid

    def filter(self, record: logging.LogRecord) -> bool:
        """False when the record was replaced by a structured event; True lets it through as is."""
        if os.getpid() != self.supervisor_pid or record.msg not in self._HANDLED:
            return True
        try:
            args = [int(cast(int, arg)) for arg in cast(tuple[object, ...], record.args)]
            self._HANDLED[record.msg](self, *args)
        except Exception:  # never let bookkeeping break fork_processes' loop: keep Tornado's line
            return True
        return False

    def _starting(self, workers: int) -> None:
        _log.info("forking workers", workers=workers)

    def _clean_exit(self, worker_id: int, pid: int) -> None:
        metrics.mark_dead(pid)
        _log.info("worker exited", worker=worker_id, worker_pid=pid, exit_code=0, restart=False)

    def _killed(self, worker_id: int, pid: int, signum: int) -> None:
        self._restarting(worker_id, pid, signal=signal.Signals(signum).name)

    def _failed(self, worker_id: int, pid: int, status: int) -> None:
        self._restarting(worker_id, pid, exit_code=status)

    def _restarting(self, worker_id: int, pid: int, **cause: object) -> None:
        metrics.mark_dead(pid)
        metrics.WORKER_RESTARTS.labels(str(worker_id)).inc()
        _log.warning("worker died, restarting", worker=worker_id, worker_pid=pid, **cause)

    _HANDLED: ClassVar[dict[str, Callable[..., None]]] = {
        STARTING: _starting, CLEAN: _clean_exit, KILLED: _killed, FAILED: _failed,
    }


def worker_count(settings: Settings) -> int:
    if settings.workers is not None:
        _log.info("worker count", workers=settings.workers, reason="WEB_CONCURRENCY/--workers")
        return settings.workers
    budget = cpu_budget()
    _log.info("worker count", workers=budget.workers, reason=budget.reason, cores=budget.cores,
              affinity=budget.affinity, cgroup_quota=budget.quota)
    return budget.workers


def fit_open_files(settings: Settings) -> Settings:
    """Raise RLIMIT_NOFILE to its hard limit, and lower MAX_CONNECTIONS if it still cannot fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    room = soft - FD_RESERVE
    if settings.max_connections > room:
        _log.warning("MAX_CONNECTIONS lowered to fit the open-files limit",
                     requested=settings.max_connections, allowed=max(1, room), nofile=soft)
        settings = dataclasses.replace(settings, max_connections=max(1, room))
    return settings


def bind(settings: Settings, workers: int) -> list[list[socket.socket]]:
    """Listening sockets for each worker slot: one shared set, or one SO_REUSEPORT set per slot."""
    address = settings.address or None
    first = bind_sockets(settings.port, address, backlog=settings.backlog, reuse_port=settings.reuse_port)
    if not settings.reuse_port:
        return [first] * workers
    port = first[0].getsockname()[1]  # with PORT=0 every slot must share the port picked first
    return [first] + [
        bind_sockets(port, address, backlog=settings.backlog, reuse_port=True) for _ in range(workers - 1)
    ]


def shutdown(slots: list[list[socket.socket]], settings: Settings, reason: str, signals: StopSignals) -> int:
    """Drain the workers: the runbook an operator would follow by hand, in code."""
    deadline = time.monotonic() + settings.shutdown_grace
    _log.info("shutting down", reason=reason, grace_seconds=settings.shutdown_grace)
    for slot in slots:
        for sock in slot:
            sock.close()  # the port refuses new connections once the workers close theirs too
    children = _children()
    _signal(list(children), signal.SIGTERM)
    _reap_until(deadline, children, lambda: signals.repeated)
    if signals.repeated:
        _log.warning("second signal: stopping workers at once")
        return _kill_remaining(children)
    if _children():
        _log.warning("shutdown grace ran out: killing workers", grace_seconds=settings.shutdown_grace)
        return _kill_remaining(children)
    _log.info("shutdown complete", workers=len(children))
    return 0


def _kill_remaining(children: dict[int, int | None]) -> int:
    _signal(list(_children()), signal.SIGKILL)
    _reap_until(time.monotonic() + 5.0, children)
    return 1


def _reap_until(
    deadline: float, workers: dict[int, int | None], interrupted: Callable[[], bool] = lambda: False
) -> None:
    """Collect exited workers, logging how each ended, until none is left or the deadline passes."""
    while time.monotonic() < deadline and not interrupted():
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.02)
            continue
        metrics.mark_dead(pid)
        code = os.waitstatus_to_exitcode(status)
        worker_id = workers.get(pid)
        if code < 0:
            _log.warning("worker exited", worker=worker_id, worker_pid=pid, signal=signal.Signals(-code).name)
        else:
            _log.info("worker exited", worker=worker_id, worker_pid=pid, exit_code=code)


def _children() -> dict[int, int | None]:
    """The workers still running, pid -> worker id (read from the process name each one sets)."""
    found: dict[int, int | None] = {}
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process().children():
            try:
                found[child.pid] = worker.worker_id_of(child.name())
            except psutil.Error:
                continue
    return found


def _signal(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"


def version_info() -> dict[str, str]:
    import tornado

    return {"version": __version__, "tornado": tornado.version, "python": sys.version.split()[0]}

