"""Memory shedding: while the cgroup's memory is nearly full, refuse new connections instead of dying.

A container's memory limit is its cgroup's: past it the kernel's OOM killer SIGKILLs a process
of the cgroup, which for this service means a worker and every connection it held (or the
supervisor, and then the whole service). Each WebSocket a worker accepts costs memory for as
long as it stays open (about 16 KiB here), so a worker that keeps accepting them under a small
limit ends killed. So, in each worker, once a second (a PeriodicCallback on the worker's own
loop: a few small file reads, some 0.3 ms) and after every CHECK_EVERY connections it accepts (a
burst of thousands a second would otherwise overshoot by a second's worth), `MemoryGuard` reads
how full the memory limits binding this process are, and when the fullest reaches MEMORY_SHED_AT
of its limit, the worker holds no more connections than it has open then: every new one gets
the same 503 as at MAX_CONNECTIONS (service/http/server.py; a WebSocket upgrade is a new connection
too), and those open are served as before.

That second cap, not "refuse everything until memory falls", because memory does not fall: the
memory of closed connections goes back to CPython's allocator, which keeps it for reuse and
hardly ever returns it to the kernel (closing 1,990 of 2,000 WebSockets gave back 3 of their 32
MiB). So a connection that closes makes room for a new one in the memory it leaves behind, and
the worker admits one for each that closes. Should memory reach halfway from the mark to the
limit anyway (0.95 of it for a mark of 0.9), the cap comes down to what is open then: no more
replacements. Below RESUME_FRACTION of the mark (0.882 of the limit) the cap is lifted.

What is measured is the working set, as the kernel's OOM decision and the kubelet see it: usage
less the inactive file cache, which the kernel reclaims before it kills anything (v1
`memory.usage_in_bytes` less `total_inactive_file` of `memory.stat`; v2 `memory.current` less
`inactive_file`). Every directory on the process's cgroup path that has a limit is read (a
container's own cgroup, its pod's, as `service.process.cgroup` walks them for the CPU quota), and the
fullest decides. Both hierarchies are read: v2 at the mount root or, on a hybrid host, under
`unified`, and v1's `memory` controller.

A worker that finds no limit at start (no cgroup, or `max`/unlimited everywhere), or runs with
MEMORY_SHED_AT=0, says so once and never looks again. Every worker reads the same cgroup, so
they start shedding together, each capped at its own count.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from prometheus_client import Counter, Gauge
from tornado.ioloop import PeriodicCallback

from service.process.cgroup import CGROUP_ROOT, SELF_CGROUP, controller_paths, read, up_from
from service.telemetry import logs, metrics

UNLIMITED = 1 << 62  # v1 writes "no limit" as the largest page count in bytes (9223372036854771712)
RESUME_FRACTION = 0.98  # shedding stops below 98% of the mark (0.882 of the limit for a mark of 0.9)
CHECK_SECONDS = 1.0
CHECK_EVERY = 100  # accepted connections after which the guard looks at once (a burst's overshoot)
_log = logs.get_logger("service.memguard")


@dataclass(frozen=True)
class _Files:
    """One cgroup directory's memory files, by hierarchy."""

    directory: Path
    version: int  # 1 or 2
    limit: str
    usage: str
    inactive_file: str  # the memory.stat key of the reclaimable inactive file cache

    @property
    def name(self) -> str:
        return f"cgroup v{self.version} {self.directory}"


@dataclass(frozen=True)
class MemoryReading:
    """How full one cgroup's memory limit is: working set (usage less inactive file cache), limit."""

    used: int
    limit: int
    cgroup: str

    @property
    def fraction(self) -> float:
        return self.used / self.limit


def _number(text: str | None) -> int | None:
    try:
        return int(text or "")
    except ValueError:  # "max" (v2's unlimited), empty, or garbage
        return None


def _stat(text: str | None, key: str) -> int:
    for line in (text or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return _number(value) or 0
    return 0


class CgroupMemory:
    """The memory limits on this process's cgroup path, read again on each `read`."""

    def __init__(self, files: list[_Files]) -> None:
        self.files = files

    @classmethod
    def of_this_process(cls, root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> CgroupMemory:
        """Every cgroup directory on this process's path that has a memory limit file, v2 and v1."""
        paths = controller_paths(self_cgroup)
        files: list[_Files] = []
        if "" in paths:  # v2: the whole mount (unified) or, on a hybrid host, its `unified` part
            for mount in (root, root / "unified"):
                for directory in up_from(mount, paths[""]):
                    if (directory / "memory.max").is_file():
                        files.append(_Files(directory, 2, "memory.max", "memory.current", "inactive_file"))
        if "memory" in paths:  # v1: the memory controller's own mount
            for directory in up_from(root / "memory", paths["memory"]):
                if (directory / "memory.limit_in_bytes").is_file():
                    files.append(
                        _Files(
                            directory,
                            1,
                            "memory.limit_in_bytes",
                            "memory.usage_in_bytes",
                            "total_inactive_file",
                        )
                    )
        return cls(files)

    def limits(self) -> list[tuple[int, str]]:
        """(limit in bytes, where) for each directory that is limited now."""
        found = []
        for files in self.files:
            limit = _number(read(files.directory / files.limit))
            if limit is not None and 0 < limit < UNLIMITED:
                found.append((limit, files.name))
        return found

    def read(self) -> MemoryReading | None:
        """The fullest limited cgroup on the path now, or None when none is limited (or readable)."""
        fullest: MemoryReading | None = None
        for files in self.files:
            limit = _number(read(files.directory / files.limit))
            if limit is None or not 0 < limit < UNLIMITED:
                continue
            usage = _number(read(files.directory / files.usage))
            if usage is None:
                continue
            inactive = _stat(read(files.directory / "memory.stat"), files.inactive_file)
            reading = MemoryReading(max(0, usage - inactive), limit, files.name)
            if fullest is None or reading.fraction > fullest.fraction:
                fullest = reading
        return fullest


class Shedder(Protocol):
    """The server, as the guard sees it (service.http.server.LimitedHTTPServer)."""

    def shed(self, cap: int | None) -> None: ...

    def open_connections(self) -> int: ...


class MemoryGuard:
    """In a worker: caps its connections while memory is over the mark, from `start` to `stop`."""

    def __init__(
        self,
        shed_at: float,
        worker: str,
        memory: CgroupMemory | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.shed_at = shed_at
        self.worker = worker
        if memory is None:
            memory = CgroupMemory.of_this_process() if shed_at > 0 else CgroupMemory([])
        self.memory = memory
        self.clock = clock
        self.cap: int | None = None  # connections this worker may hold while memory is short
        self.refused = 0  # since shedding last started
        self._since = 0.0
        self.enabled = self.shed_at > 0 and bool(self.memory.limits())  # a limit to guard, at start
        self._accepted = 0
        self._server: Shedder | None = None
        self._timer: PeriodicCallback | None = None
        # Made in `start`, and only when memory is guarded: a metric child writes its 0 into the
        # metric files as it is made, and a worker with no limit has no limit of 0 to show.
        self._gauges: tuple[Gauge, Gauge, Gauge] | None = None
        self._refused: Counter | None = None

    @property
    def shedding(self) -> bool:
        return self.cap is not None

    def count_refusal(self) -> None:
        """The server refused a connection for memory (its `on_shed`)."""
        self.refused += 1
        if self._refused is not None:
            self._refused.inc()

    def count_accept(self) -> None:
        """The server accepted a connection (its `on_accept`): look every CHECK_EVERY of them, as a
        burst of some thousands a second would overshoot the mark by a second's worth."""
        self._accepted += 1
        if self._accepted >= CHECK_EVERY and self._timer is not None:
            self._accepted = 0
            self.check()

    def start(self, server: Shedder, interval: float = CHECK_SECONDS) -> bool:
        """Say once whether memory is guarded, and if it is check now and every `interval` seconds."""
        self._server = server
        if self.shed_at <= 0:
            _log.info("memory shedding off", reason="MEMORY_SHED_AT is 0")
            return False
        limits = self.memory.limits()
        if not limits:
            self.enabled = False
            _log.info(
                "memory shedding off",
                reason="no cgroup memory limit found",
                looked_in=[files.name for files in self.memory.files],
            )
            return False
        limit, where = min(limits)
        _log.info(
            "memory shedding on",
            shed_at=self.shed_at,
            limit_bytes=limit,
            shed_at_bytes=int(limit * self.shed_at),
            cgroup=where,
        )
        self._gauges = (
            metrics.MEMORY_USED.labels(self.worker),
            metrics.MEMORY_LIMIT.labels(self.worker),
            metrics.MEMORY_SHEDDING.labels(self.worker),
        )
        self._refused = metrics.CONNECTIONS_REFUSED_MEMORY.labels(self.worker)  # at 0 from the start,
        # so that increase() sees the first refusal
        self._timer = PeriodicCallback(self.check, interval * 1000.0)
        self._timer.start()
        self.check()
        return True

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer = None

    def check(self) -> None:
        """One look at the memory: the gauges, and the cap set, lowered or lifted."""
        reading = self.memory.read()
        if reading is None:  # the limit was lifted (or the files went away): nothing to guard
            if self.cap is not None:
                self._lift(None)
            return
        if self._gauges is not None:
            self._gauges[0].set(reading.used)
            self._gauges[1].set(reading.limit)
        if self.cap is None:
            if reading.fraction >= self.shed_at:
                self._set_cap(reading, "memory shedding started: refusing new connections")
        elif reading.fraction < self.shed_at * RESUME_FRACTION:
            self._lift(reading)
        elif reading.fraction >= (1 + self.shed_at) / 2 and self._open() < self.cap:
            # Halfway from the mark to the limit: the room of closed connections was not enough
            # for their replacements. No replacements any more: hold to what is open now.
            self._set_cap(reading, "memory shedding: connection cap lowered")

    def _open(self) -> int:
        return self._server.open_connections() if self._server is not None else 0

    def _set_cap(self, reading: MemoryReading, event: str) -> None:
        first = self.cap is None
        self.cap = self._open()
        if self._server is not None:
            self._server.shed(self.cap)
        if first:
            self.refused = 0
            self._since = self.clock()
            if self._gauges is not None:
                self._gauges[2].set(1)
        log = _log.warning if first else _log.info
        log(event, shed_at=self.shed_at, connections_cap=self.cap, **_figures(reading))

    def _lift(self, reading: MemoryReading | None) -> None:
        self.cap = None
        if self._server is not None:
            self._server.shed(None)
        if self._gauges is not None:
            self._gauges[2].set(0)
        _log.info(
            "memory shedding stopped: accepting connections again",
            shed_at=self.shed_at,
            open_connections=self._open(),
            refused=self.refused,
            shed_seconds=round(self.clock() - self._since, 3),
            **(_figures(reading) if reading is not None else {}),
        )


def _figures(reading: MemoryReading) -> dict[str, object]:
    return {
        "used_bytes": reading.used,
        "limit_bytes": reading.limit,
        "fraction": round(reading.fraction, 4),
        "cgroup": reading.cgroup,
    }
