"""The supervisor: the parent process's whole life, read top to bottom in `Supervisor.run`.

1. **size** the worker pool (WEB_CONCURRENCY, else the CPUs this process may use) and raise the
   open-files limit to fit the connection cap, make the embedded backplane's directory, and only
   then log the settings, as the workers will run with them;
2. **bind** the listening socket(s) in the parent, so every worker shares the port (with
   REUSE_PORT, one SO_REUSEPORT socket per worker slot, balanced by the kernel);
3. **fork** the workers with Tornado's own `fork_processes`, and **watch** them from inside it:
   it restarts a worker that dies (crash, SIGKILL, non-zero exit) under the same worker id,
   leaves one that exits 0 alone, and gives up after MAX_RESTARTS restarts (we then stop the
   others and exit 1);
4. on SIGTERM or SIGINT, leave `fork_processes` (the signal handler raises `StopRequested`, the
   only thing it does) and **stop**: close the parent's copy of the listener, send each worker one
   SIGTERM, reap them until SHUTDOWN_GRACE runs out, SIGKILL what is left. A second SIGINT during
   the stop (Ctrl-C pressed again) kills the workers at once; a repeated SIGTERM does not.

Whichever way a worker's death is learned (Tornado's report from inside `fork_processes`, or our
own reaping during the stop), `worker_died` is the one place that acts on it: the log line,
marking its metric files dead, and counting a restart.

`fork_processes` knows nothing of shutting down: left running, it would restart a worker that
was killed while draining. Leaving it is what makes the stop final; no worker is forked after
the parent stops. The price of leaving by exception: a worker that fork_processes reaps at the
very instant the signal lands (it exited on its own, say from a process-group signal) is not
reported by it; the stop reaps and reports every other one.
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
from types import FrameType
from typing import cast

import psutil
from tornado.netutil import bind_sockets
from tornado.process import fork_processes

from service import __version__
from service.config import Settings, describe
from service.process import worker
from service.process.cpus import cpu_budget
from service.rooms import embedded
from service.telemetry import logs, metrics
from service.telemetry.metrics_dir import MetricsDirectory

_log = logs.get_logger("service.supervisor")
FD_RESERVE = 256  # descriptors a worker needs besides its connections (logs, metrics files, DNS...)


class Supervisor:
    def __init__(self, settings: Settings, metrics_dir: MetricsDirectory) -> None:
        self.settings = settings
        self.metrics_dir = metrics_dir
        self.pid = os.getpid()
        self.workers = 0
        self.slots: list[list[socket.socket]] = []
        self.signals: StopSignals | None = None  # installed just before the fork

    def run(self) -> int:
        """The parent's life; returns its exit code (workers leave through `worker.become`)."""
        logs.bind_process(role="supervisor", pid=self.pid)
        self.size()
        try:  # the embedded backplane's directory, made before the fork (service/rooms/embedded.py)
            self.settings, bus_dir = embedded.prepare(self.settings, self.workers)
        except OSError as exc:
            _log.error("cannot make the embedded backplane's directory: check BROADCAST_DIR",
                       directory=self.settings.broadcast_dir, error=str(exc))
            return 1
        # Only now: sizing may lower MAX_CONNECTIONS, and prepare fills in the pool size and the
        # backplane's directory, so this line shows the settings the workers will run with.
        _log.info("starting", **version_info(), settings=describe(self.settings),
                  metrics_dir=str(self.metrics_dir.path))
        try:
            try:
                self.bind()
            except OSError as exc:  # in use, or not an address of this host: say which setting to change
                _log.error("cannot listen: check PORT and ADDRESS", port=self.settings.port,
                           address=self.settings.address or "*", error=str(exc))
                return 1
            return self.fork_and_watch()
        finally:  # the parent only: a worker leaves through os._exit
            bus_dir.remove()

    # -- 1. size -----------------------------------------------------------------------------
    def size(self) -> None:
        settings = self.settings
        if settings.workers is not None:
            self.workers = settings.workers
            _log.info("worker count", workers=self.workers, reason="WEB_CONCURRENCY/--workers")
        else:
            budget = cpu_budget()
            self.workers = budget.workers
            _log.info("worker count", workers=budget.workers, reason=budget.reason, cores=budget.cores,
                      affinity=budget.affinity, cgroup_quota=budget.quota)
        self.settings = fit_open_files(settings)

    # -- 2. bind -----------------------------------------------------------------------------
    def bind(self) -> None:
        """Listening sockets for each worker slot: one shared set, or one SO_REUSEPORT set per slot."""
        settings = self.settings
        address = settings.address or None
        first = bind_sockets(settings.port, address, backlog=settings.backlog, reuse_port=settings.reuse_port)
        if not settings.reuse_port:
            self.slots = [first] * self.workers
        else:
            port = first[0].getsockname()[1]  # with PORT=0 every slot must share the port picked first
            self.slots = [first] + [
                bind_sockets(port, address, backlog=settings.backlog, reuse_port=True)
                for _ in range(self.workers - 1)
            ]
        _log.info("listening", addresses=[_address(s) for s in first], port=first[0].getsockname()[1],
                  reuse_port=settings.reuse_port, backlog=settings.backlog)

    # -- 3. fork and watch -------------------------------------------------------------------
    def fork_and_watch(self) -> int:
        metrics.BUILD_INFO.labels(**version_info(), workers=str(self.workers)).set(1)
        metrics.declare_workers(self.workers)  # restarts and liveness at 0 per worker id, before any fork
        flush_board = metrics.FlushBoard(self.workers)  # shared memory: made here, so every worker has it
        self.signals = StopSignals(self.pid)
        reports = TornadoChildReports(self)
        logging.getLogger("tornado.general").addFilter(reports)
        try:
            worker_id = fork_processes(self.workers, max_restarts=self.settings.max_restarts)
        except StopRequested as stop:
            return self.stop(str(stop))
        except RuntimeError as exc:  # "Too many child restarts, giving up"
            self.signals.stopping = True  # a signal from now on is a second one
            _log.error("crash loop: giving up", error=str(exc), max_restarts=self.settings.max_restarts)
            self.stop("crash loop")
            return 1
        except SystemExit:  # fork_processes exits 0 once every worker has exited 0
            _log.info("every worker exited cleanly")
            return 0
        logging.getLogger("tornado.general").removeFilter(reports)
        worker.become(worker_id, self.slots, self.settings, self.pid, self.metrics_dir.path, flush_board)

    def worker_died(self, worker_id: int | None, pid: int, *, restarting: bool, exit_code: int | None = None,
                    signal_name: str | None = None) -> None:
        """The one place a worker's death is acted on, however it was learned."""
        self.metrics_dir.mark_dead(pid)  # its live gauges stop counting; counters keep their history
        cause: dict[str, object] = {"signal": signal_name} if signal_name else {"exit_code": exit_code}
        if restarting:
            metrics.WORKER_RESTARTS.labels(str(worker_id)).inc()
            _log.warning("worker died, restarting", worker=worker_id, worker_pid=pid, **cause)
        else:
            log = _log.warning if signal_name or exit_code else _log.info
            log("worker exited", worker=worker_id, worker_pid=pid, restart=False, **cause)

    # -- 4. stop -----------------------------------------------------------------------------
    def stop(self, reason: str) -> int:
        """Drain the workers: the runbook an operator would follow by hand, in code."""
        grace = self.settings.shutdown_grace
        deadline = time.monotonic() + grace
        _log.info("shutting down", reason=reason, grace_seconds=grace)
        for slot in self.slots:
            for sock in slot:
                sock.close()  # the port refuses new connections once the workers close theirs too
        children = _children()
        _signal(list(children), signal.SIGTERM)
        self._reap_until(deadline, children)
        if self.signals is not None and self.signals.extra_sigterms:
            _log.info("SIGTERM repeated during the drain: drained all the same",
                      repeats=self.signals.extra_sigterms)
        if self._second_signal():
            _log.warning("second signal: stopping workers at once")
            return self._kill_remaining(children)
        if _children():
            _log.warning("shutdown grace ran out: killing workers", grace_seconds=grace)
            return self._kill_remaining(children)
        _log.info("shutdown complete", workers=len(children))
        return 0

    def _second_signal(self) -> bool:
        return self.signals is not None and self.signals.repeated

    def _kill_remaining(self, children: dict[int, int | None]) -> int:
        _signal(list(_children()), signal.SIGKILL)
        self._reap_until(time.monotonic() + 5.0, children, interruptible=False)
        return 1

    def _reap_until(
        self, deadline: float, workers: dict[int, int | None], interruptible: bool = True
    ) -> None:
        """Collect exited workers until none is left, the deadline passes, or a second signal comes."""
        while time.monotonic() < deadline and not (interruptible and self._second_signal()):
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                time.sleep(0.02)
                continue
            code = os.waitstatus_to_exitcode(status)
            self.worker_died(workers.get(pid), pid, restarting=False,
                             exit_code=code if code >= 0 else None,
                             signal_name=signal.Signals(-code).name if code < 0 else None)


class StopRequested(BaseException):
    """Raised by the signal handler to take the parent out of fork_processes' wait loop."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)


class StopSignals:
    """SIGTERM and SIGINT in the parent: the first one leaves fork_processes, later ones are counted.

    Raising from a handler is how the parent gets out of `os.wait()` inside fork_processes;
    raising only once is what keeps the stop itself from being interrupted by a second signal,
    which `Supervisor.stop` reads from `repeated` instead.

    Only a repeated SIGINT means "stop at once": that is a person pressing Ctrl-C again. SIGTERM
    is what process managers send, and one stop of theirs may deliver it more than once: after a
    SIGTERM to the process group of `make run`, make forwards its own SIGTERM to its child; a
    systemd stop signals every process of the unit; a script may signal the group and the PID.
    Taking those as "at once" would cut the very requests the drain exists for. A repeated
    SIGTERM is counted (`extra_sigterms`) and the drain goes on; a manager's forced stop is
    SIGKILL, after its own timeout.
    """

    def __init__(self, supervisor_pid: int) -> None:
        self.supervisor_pid = supervisor_pid
        self.stopping = False
        self.repeated = False
        self.extra_sigterms = 0
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if os.getpid() != self.supervisor_pid:
            # A worker forked a moment ago, before it set its own handlers: act as the default would.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.stopping:
            if signum == signal.SIGINT:
                self.repeated = True
            else:
                self.extra_sigterms += 1
            return
        self.stopping = True
        raise StopRequested(signum)


class TornadoChildReports(logging.Filter):
    """How the supervisor learns, from inside fork_processes, that a worker died.

    fork_processes reaps its children itself and tells only its logger. Each of its records
    carries the facts as arguments, (task id, pid) and then the signal or the exit status; the
    format string (`record.msg`, never the formatted text) says which of the three reports it
    is. `REPORTS` lists them as the installed Tornado writes them, and a test reads Tornado's own
    source to fail loudly if an upgrade changes one. A matched record is replaced by the
    supervisor's structured event.
    """

    STARTING = "Starting %d processes"
    REPORTS = {
        "child %d (pid %d) killed by signal %d, restarting": "signal",
        "child %d (pid %d) exited with status %d, restarting": "status",
        "child %d (pid %d) exited normally": "clean",
    }

    def __init__(self, supervisor: Supervisor) -> None:
        super().__init__()
        self.supervisor = supervisor

    def filter(self, record: logging.LogRecord) -> bool:
        """False when the record was replaced by a structured event; True lets it through as is."""
        if os.getpid() != self.supervisor.pid or record.funcName != "fork_processes":
            return True
        try:
            args = [int(cast(int, arg)) for arg in cast(tuple[object, ...], record.args)]
            if record.msg == self.STARTING:
                _log.info("forking workers", workers=args[0])
                return False
            kind = self.REPORTS[cast(str, record.msg)]
        except (KeyError, TypeError, ValueError):  # not a report we know: keep Tornado's own line
            return True
        worker_id, pid = args[0], args[1]
        if kind == "clean":
            self.supervisor.worker_died(worker_id, pid, restarting=False, exit_code=0)
        elif kind == "signal":
            signal_name = signal.Signals(args[2]).name
            self.supervisor.worker_died(worker_id, pid, restarting=True, signal_name=signal_name)
        else:
            self.supervisor.worker_died(worker_id, pid, restarting=True, exit_code=args[2])
        return False


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
