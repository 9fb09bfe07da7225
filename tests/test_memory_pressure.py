"""Memory pressure, for real: the service in a memory cgroup with a small limit, under WebSocket load.

Each test makes a cgroup v1 memory child of this process's own memory cgroup, starts the service
inside it (a tiny Python prefix joins the cgroup, then execs the service, so the supervisor and
every worker it forks are charged there), measures its idle working set and tightens the limit
to a little above it. Then WebSockets are opened in small batches until something gives:

- with memory shedding on (the default MEMORY_SHED_AT), with one worker and with two, new
  connections get the clean 503 of service/http/server.py, no worker is OOM-killed, the sockets held
  still echo, and once most are closed new connections are accepted again, in the room the closed
  ones left (the cgroup's usage hardly falls: CPython keeps freed memory for reuse);
- with shedding off, the kernel's OOM killer SIGKILLs the worker: the supervisor restarts it and
  the restart is counted (log and metric), the service answers again.

The cgroup is removed at the end (after the service and every process in it are gone). Loopback
only, bounded: a test gives up after a fixed number of sockets or seconds, and no duration is
asserted. Needs root and the cgroup v1 memory controller; a machine without them skips the
tests, and CI (CI=true) fails them instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import wsclient
from conftest import ServiceProcess, wait_until
from metrics_client import eventually
from tornado.httpclient import HTTPClientError
from tornado.websocket import WebSocketClientConnection

from loadtests.harness import wire

Start = Callable[..., ServiceProcess]
MiB = 1 << 20
V1_MEMORY = Path("/sys/fs/cgroup/memory")
BATCH = 25  # WebSockets opened at once; the guard looks once a second
PAUSE = 0.05  # seconds between batches: a steady ramp of some hundreds of sockets a second
MAX_SOCKETS = 12_000  # a bound, far above what the limits below hold
FILL_SECONDS = 60.0
KEEP = 10  # sockets kept open through the recovery
SHED_BODY = b'{"error":"server low on memory","status":503}'
STARTED = "memory shedding started: refusing new connections"
# Joins the cgroup whose cgroup.procs is argv[1], then becomes the command that follows.
JOIN = (
    "import os, sys\n"
    "with open(sys.argv[1], 'w') as procs:\n"
    "    procs.write(str(os.getpid()))\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


@dataclass
class MemoryCgroup:
    """A cgroup v1 memory child made for one test, and what the kernel says of it."""

    path: Path

    def write(self, name: str, value: str) -> None:
        (self.path / name).write_text(value)

    def read(self, name: str) -> str:
        return (self.path / name).read_text()

    def prefix(self) -> list[str]:
        return [sys.executable, "-c", JOIN, str(self.path / "cgroup.procs")]

    def set_limit(self, limit: int) -> None:
        self.write("memory.limit_in_bytes", str(limit))

    def working_set(self) -> int:
        """Usage less the inactive file cache: what service.process.memguard reads, as the kernel sees it."""
        stat = dict(line.split() for line in self.read("memory.stat").splitlines())
        return max(0, int(self.read("memory.usage_in_bytes")) - int(stat["total_inactive_file"]))

    def oom_kills(self) -> int:
        fields = dict(line.split() for line in self.read("memory.oom_control").splitlines())
        return int(fields["oom_kill"])

    def procs(self) -> list[int]:
        return [int(pid) for pid in self.read("cgroup.procs").split()]

    def remove(self) -> None:
        """Kill what is still in it (only processes this test put there), wait, and remove it."""
        for pid in self.procs():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not self.procs(), 10)
        for _ in range(50):  # rmdir can fail with EBUSY while the last exit is being accounted
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)
        self.path.rmdir()


def _own_memory_cgroup() -> Path | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(","):
                return V1_MEMORY / path.lstrip("/")
    return None


def _unavailable(message: str) -> None:
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def memory_cgroup() -> Iterator[MemoryCgroup]:
    """A fresh memory cgroup under this process's own; removed after the test (and its service)."""
    parent = _own_memory_cgroup()
    if parent is None or not (parent / "memory.limit_in_bytes").is_file():
        _unavailable("no cgroup v1 memory controller for this process (these tests make a v1 memory cgroup)")
    assert parent is not None
    path = parent / f"tornado-mem-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir()
    except OSError as exc:
        _unavailable(f"cannot make a memory cgroup under {parent} (root is needed): {exc}")
    cgroup = MemoryCgroup(path)
    try:
        cgroup.set_limit(1 << 30)  # roomy while the service starts; each test tightens it
        with contextlib.suppress(OSError):
            cgroup.write("memory.swappiness", "0")  # reach the limit, not the swap (if any)
        yield cgroup
    finally:
        cgroup.remove()


@pytest.fixture
def raised_fd_limit() -> Iterator[None]:
    """This process holds thousands of client sockets: the soft open-files limit up to the hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _start_in(
    start_service: Start, cgroup: MemoryCgroup, headroom: int, *args: str, workers: int = 1
) -> tuple[ServiceProcess, int]:
    """The service in `cgroup`; then the limit is set to its idle working set plus `headroom`."""
    svc = start_service(*args, workers=workers, prefix=cgroup.prefix())
    assert set(cgroup.procs()) == {svc.pid, *svc.tree()}, "the service runs in the test's cgroup"
    time.sleep(1.0)  # let start-up's allocations settle before measuring
    idle = cgroup.working_set()
    limit = idle + headroom
    cgroup.set_limit(limit)
    return svc, limit


@dataclass
class Fill:
    """What the client saw while opening WebSockets batch after batch."""

    held: list[WebSocketClientConnection] = field(default_factory=list)
    refused: int = 0  # upgrades answered 503
    failed: list[BaseException] = field(default_factory=list)  # anything else (a reset, a timeout)


async def _fill(url: str, until: Callable[[Fill], bool]) -> Fill:
    """Open WebSockets in batches until `until` holds, or the bounds are reached."""
    fill = Fill()
    deadline = time.monotonic() + FILL_SECONDS
    while not until(fill) and len(fill.held) < MAX_SOCKETS and time.monotonic() < deadline:
        results = await asyncio.gather(*(wsclient.connect(url) for _ in range(BATCH)), return_exceptions=True)
        for result in results:
            if isinstance(result, WebSocketClientConnection):
                fill.held.append(result)
            elif isinstance(result, HTTPClientError) and result.code == 503:
                fill.refused += 1
            elif isinstance(result, BaseException):
                fill.failed.append(result)
        await asyncio.sleep(PAUSE)
    return fill


async def _echo_all(conns: list[WebSocketClientConnection]) -> list[Any]:
    async def one(index: int, conn: WebSocketClientConnection) -> Any:
        await conn.write_message(f"still here {index}")
        return await asyncio.wait_for(conn.read_message(), 20)

    return await asyncio.gather(*(one(i, c) for i, c in enumerate(conns)), return_exceptions=True)


def _refused_for_memory(port: int, workers: int) -> None:
    """A plain request and a WebSocket upgrade on new connections: each the clean 503, then closed."""
    upgrade = (
        b"GET /ws/echo HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    for request in (b"GET /api/hello HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", upgrade):
        reply = wire.exchange(port, request, timeout=10)
        assert reply.closed and not reply.reset, reply
        [response] = reply.responses
        assert response.status == 503 and response.body == SHED_BODY
        assert response.headers["connection"] == "close" and int(response.headers["x-worker-id"]) < workers


@pytest.mark.parametrize("workers", [1, 2])
def test_memory_pressure_sheds_new_connections_instead_of_an_oom_kill(
    memory_cgroup: MemoryCgroup, raised_fd_limit: None, start_service: Start, workers: int
) -> None:
    svc, limit = _start_in(start_service, memory_cgroup, 48 * MiB, workers=workers)
    guarded = svc.named("memory shedding on")
    assert len(guarded) == workers and all(memory_cgroup.path.name in e["cgroup"] for e in guarded)
    pids = svc.live_workers()
    labels = [str(worker) for worker in range(workers)]
    url = svc.url("/ws/echo", "ws")
    figures: dict[str, Any] = {"workers": workers, "limit": limit}

    def refused_or_failed(fill: Fill) -> bool:
        return fill.refused > 0 or bool(fill.failed)

    async def scenario() -> None:
        fill = await _fill(url, refused_or_failed)
        try:
            assert not fill.failed, f"connections failed instead of a clean 503: {fill.failed[:3]}"
            assert fill.refused, f"no refusal after {len(fill.held)} WebSockets (limit {limit} bytes)"
            started = [  # every worker reads the same cgroup: each caps itself, within a second
                svc.wait_for(lambda e, w=worker: e.get("event") == STARTED and e["worker"] == w)
                for worker in range(workers)
            ]
            assert all(e["fraction"] >= 0.9 for e in started)
            assert sum(e["connections_cap"] for e in started) == len(fill.held)  # held: what was let in
            figures.update(
                held=len(fill.held), fraction=[e["fraction"] for e in started], refused=fill.refused
            )
            _refused_for_memory(svc.port, workers)
            assert memory_cgroup.oom_kills() == 0
            assert svc.live_workers() == pids and not svc.named("worker died, restarting")
            echoes = await _echo_all(fill.held)  # the sockets it holds are served as before
            assert echoes == [f"still here {i}" for i in range(len(fill.held))]
            figures["working_set_while_shedding"] = memory_cgroup.working_set()
        finally:
            for conn in fill.held[KEEP:]:
                conn.close()
        # The memory of the closed sockets stays with the worker, for reuse: the cgroup's usage
        # hardly falls, but the worker takes new connections in their place.
        await asyncio.sleep(0.5)
        figures["working_set_after_closing"] = memory_cgroup.working_set()
        again = await _fill(url, refused_or_failed)
        try:
            assert not again.failed, f"connections failed instead of a clean 503: {again.failed[:3]}"
            # How many depends on how much the sockets still open grew meanwhile (their echoes
            # above took some of the room): some, not a figure, is what is asserted.
            assert again.held, "no new connection accepted once most had closed"
            figures.update(reopened=len(again.held), refused_again=again.refused)
            figures["working_set_reopened"] = memory_cgroup.working_set()
            assert memory_cgroup.oom_kills() == 0
            everyone = fill.held[:KEEP] + again.held
            assert await _echo_all(everyone) == [f"still here {i}" for i in range(len(everyone))]
        finally:
            for conn in fill.held[:KEEP] + again.held:
                conn.close()

    try:
        wsclient.run(scenario())
    finally:
        print(f"memory pressure figures: {figures}")  # docs/operations.md's figures (pytest -s)
    assert memory_cgroup.oom_kills() == 0
    assert svc.live_workers() == pids and not svc.named("worker died, restarting")
    assert wait_until(lambda: svc.request("/api/hello")[0] == 200, 10)  # once the closes are seen
    result = eventually(
        svc, lambda s: all(s.total("tornado_memory_limit_bytes", worker=w) == limit for w in labels)
    )
    assert all(0 < result.total("tornado_memory_working_set_bytes", worker=w) < limit for w in labels)
    # every refusal the clients saw, and the two of _refused_for_memory; none at MAX_CONNECTIONS
    seen = figures["refused"] + 2 + figures["refused_again"]
    assert result.total("tornado_connections_refused_memory_total") == seen
    assert result.total("tornado_connections_refused_total") == 0
    assert result.total("tornado_worker_restarts_total") == 0
    for event in svc.events:
        if str(event.get("event", "")).startswith("memory shedding"):
            print(
                {k: event.get(k) for k in ("event", "fraction", "connections_cap", "used_bytes", "refused")}
            )


def test_an_oom_killed_worker_is_restarted_and_counted(
    memory_cgroup: MemoryCgroup, raised_fd_limit: None, start_service: Start
) -> None:
    """With shedding off, the same load ends in the kernel's OOM kill of the worker (a SIGKILL)."""
    svc, limit = _start_in(start_service, memory_cgroup, 32 * MiB, "--memory-shed-at", "0")
    svc.wait_for(lambda e: e.get("event") == "memory shedding off")
    worker_pid = svc.live_workers()[0]
    url = svc.url("/ws/echo", "ws")
    mark = len(svc.events)

    def killed(_: Fill) -> bool:
        return any(e.get("event") == "worker died, restarting" for e in svc.events[mark:])

    async def scenario() -> int:
        fill = await _fill(url, killed)
        for conn in fill.held:
            conn.close()
        return len(fill.held)

    held = wsclient.run(scenario())
    died = svc.wait_for(lambda e: e.get("event") == "worker died, restarting", 30, after=mark)
    assert (died["worker"], died["worker_pid"], died["signal"]) == (0, worker_pid, "SIGKILL")
    assert memory_cgroup.oom_kills() >= 1, "the kernel's OOM killer, not something else, killed it"
    restarted = svc.wait_for(
        lambda e: e.get("event") == "worker started" and e["pid"] != worker_pid, 30, after=mark
    )
    assert svc.proc is not None and svc.proc.poll() is None, "the supervisor survived"
    assert svc.request("/api/hello")[0] == 200
    result = eventually(svc, lambda s: s.total("tornado_worker_restarts_total", worker="0") == 1)
    assert result.total("tornado_workers_alive", worker="0") == 1
    print(f"oom figures: limit={limit} sockets_before_kill~{held} restarted_pid={restarted['pid']}")
