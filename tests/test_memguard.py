"""Memory shedding read from fake cgroup trees (v2, v1, hybrid, containers), and the guard's switch.

Each test builds a fake /sys/fs/cgroup (`root`) and a fake /proc/self/cgroup under tmp_path, as
tests/test_cpus.py does, so nothing depends on the machine running the tests. The guard is driven
by calling `check` after changing the fake files; the server it switches is a stand-in, except in
the last tests, which refuse real connections through service.http.server.LimitedHTTPServer.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog
from cgroupfake import CgroupHost, write
from structlog.testing import capture_logs
from tornado.testing import bind_unused_port
from tornado.web import Application, RequestHandler

from service.http.server import LimitedHTTPServer
from service.process import memguard
from service.process.memguard import CHECK_EVERY, RESUME_FRACTION, CgroupMemory, MemoryGuard
from service.telemetry import metrics

APP = "/kubepods/pod1/app"  # the process's own cgroup in most tests
MiB = 1 << 20
V1_UNLIMITED = 9223372036854771712  # what cgroup v1 shows for "no limit" (4 KiB pages)


class FakeHost(CgroupHost):
    """The fake cgroup tree, with this module's files."""

    def v2(
        self, cgroup: str, limit: int | str, current: int, inactive_file: int = 0, mount: str = ""
    ) -> None:
        """memory.max, memory.current and memory.stat of a v2 cgroup (`mount` "unified": hybrid)."""
        directory = self.root / mount / cgroup.lstrip("/")
        write(directory / "memory.max", str(limit))
        write(directory / "memory.current", str(current))
        write(
            directory / "memory.stat", f"anon {current}\nfile 0\ninactive_file {inactive_file}\nactive_file 0"
        )

    def v1(self, cgroup: str, limit: int, usage: int, inactive_file: int = 0) -> None:
        """memory.limit_in_bytes, memory.usage_in_bytes and memory.stat of a v1 memory cgroup."""
        directory = self.root / "memory" / cgroup.lstrip("/")
        write(directory / "memory.limit_in_bytes", str(limit))
        write(directory / "memory.usage_in_bytes", str(usage))
        write(
            directory / "memory.stat",
            f"cache 0\nrss {usage}\ninactive_file 1\ntotal_rss {usage}\ntotal_inactive_file {inactive_file}",
        )

    def memory(self) -> CgroupMemory:
        return CgroupMemory.of_this_process(self.root, self.self_cgroup)


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return FakeHost.under(tmp_path)


# -- reading the limits ----------------------------------------------------------------------------


def test_v2_working_set_is_current_less_inactive_file(host: FakeHost) -> None:
    host.member_of(f"0::{APP}")
    host.v2(APP, limit=200 * MiB, current=150 * MiB, inactive_file=30 * MiB)

    reading = host.memory().read()

    assert reading is not None
    assert (reading.used, reading.limit) == (120 * MiB, 200 * MiB)
    assert reading.fraction == 0.6
    assert reading.cgroup == f"cgroup v2 {host.root / APP.lstrip('/')}"


def test_v2_max_is_no_limit(host: FakeHost) -> None:
    host.member_of(f"0::{APP}")
    host.v2(APP, limit="max", current=150 * MiB)

    memory = host.memory()

    assert memory.limits() == []
    assert memory.read() is None


def test_v2_on_a_hybrid_host_is_read_under_unified(host: FakeHost) -> None:
    host.member_of(f"0::{APP}", "4:cpu:/")
    host.v2(APP, limit=100 * MiB, current=50 * MiB, mount="unified")

    reading = host.memory().read()

    assert reading is not None and reading.fraction == 0.5
    assert "/unified/" in reading.cgroup


def test_v1_working_set_is_usage_less_total_inactive_file(host: FakeHost) -> None:
    host.member_of("9:name=systemd:/", f"4:memory:{APP}", "1:cpu:/")
    host.v1(APP, limit=256 * MiB, usage=200 * MiB, inactive_file=72 * MiB)

    reading = host.memory().read()

    assert reading is not None
    assert (reading.used, reading.limit) == (128 * MiB, 256 * MiB)
    assert reading.cgroup.startswith("cgroup v1 ") and "/memory/" in reading.cgroup


def test_v1_unlimited_is_no_limit(host: FakeHost) -> None:
    host.member_of(f"4:memory:{APP}")
    host.v1(APP, limit=V1_UNLIMITED, usage=200 * MiB)

    assert host.memory().limits() == []
    assert host.memory().read() is None


def test_page_cache_larger_than_usage_is_no_negative_use(host: FakeHost) -> None:
    host.member_of(f"4:memory:{APP}")
    host.v1(APP, limit=256 * MiB, usage=10 * MiB, inactive_file=20 * MiB)

    reading = host.memory().read()

    assert reading is not None and reading.used == 0


@pytest.mark.parametrize(
    ("pod_usage", "app_usage", "fullest"),
    [
        (300 * MiB, 100 * MiB, "pod1"),  # the pod is nearly full (its other containers use memory)
        (300 * MiB, 250 * MiB, "app"),  # the container is fuller than its pod
    ],
)
def test_the_fullest_limit_on_the_path_decides(
    host: FakeHost, pod_usage: int, app_usage: int, fullest: str
) -> None:
    host.member_of(f"4:memory:{APP}")
    host.v1("/kubepods", limit=V1_UNLIMITED, usage=900 * MiB)
    host.v1("/kubepods/pod1", limit=320 * MiB, usage=pod_usage)
    host.v1(APP, limit=256 * MiB, usage=app_usage)

    memory = host.memory()
    reading = memory.read()

    assert sorted(limit for limit, _ in memory.limits()) == [256 * MiB, 320 * MiB]
    assert reading is not None and reading.cgroup.endswith(fullest)


def test_hybrid_reads_v2_and_v1_and_the_fullest_wins(host: FakeHost) -> None:
    host.member_of(f"0::{APP}", f"4:memory:{APP}")
    host.v2(APP, limit=100 * MiB, current=50 * MiB, mount="unified")
    host.v1(APP, limit=100 * MiB, usage=80 * MiB)

    reading = host.memory().read()

    assert reading is not None and reading.cgroup.startswith("cgroup v1") and reading.fraction == 0.8


@pytest.mark.parametrize("membership", ["0::/", "0::/system.slice/docker-abc.scope"])
def test_v2_container_reads_the_limit_at_the_mount_root(host: FakeHost, membership: str) -> None:
    host.member_of(membership)
    host.v2("/", limit=64 * MiB, current=32 * MiB)

    reading = host.memory().read()

    assert reading is not None and reading.limit == 64 * MiB


def test_v1_container_host_path_missing_under_the_mount(host: FakeHost) -> None:
    host.member_of("4:memory:/machine.slice/libpod-abc.scope")
    host.v1("/", limit=64 * MiB, usage=16 * MiB)

    reading = host.memory().read()

    assert reading is not None and reading.limit == 64 * MiB
    assert reading.cgroup == f"cgroup v1 {host.root / 'memory'}"


def test_no_cgroup_files_at_all_is_no_limit(host: FakeHost) -> None:
    memory = host.memory()  # neither /proc/self/cgroup nor anything under the mount exists

    assert memory.files == [] and memory.read() is None


@pytest.mark.parametrize("usage", ["", "garbage"])
def test_unreadable_usage_is_skipped(host: FakeHost, usage: str) -> None:
    host.member_of(f"4:memory:{APP}")
    host.v1(APP, limit=64 * MiB, usage=0)
    write(host.root / "memory" / APP.lstrip("/") / "memory.usage_in_bytes", usage)

    assert host.memory().read() is None


# -- the guard -------------------------------------------------------------------------------------


@dataclass
class FakeServer:
    switched: list[int | None] = field(default_factory=list)  # the caps it was given, in order
    connections: int = 7

    def shed(self, cap: int | None) -> None:
        self.switched.append(cap)

    def open_connections(self) -> int:
        return self.connections


@pytest.fixture
def logged(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """The guard's log events. A fresh logger: one bound before (cache_logger_on_first_use) would
    keep writing where it was bound."""
    with capture_logs() as events:
        monkeypatch.setattr(memguard, "_log", structlog.get_logger("service.memguard"))
        yield events


def _started(guard: MemoryGuard, server: Any) -> bool:
    """`start` on a running loop (its PeriodicCallback needs one), stopped again at once: the tests
    call `check` themselves."""

    async def go() -> bool:
        enabled = guard.start(server, interval=3600)
        guard.stop()
        return enabled

    return asyncio.run(go())


def _value(metric: Any, worker: str) -> float:
    return float(metric.labels(worker)._value.get())


def test_shedding_starts_at_the_mark_and_stops_below_the_resume_mark(
    host: FakeHost, logged: list[dict[str, Any]]
) -> None:
    host.member_of(f"4:memory:{APP}")
    host.v1(APP, limit=100 * MiB, usage=50 * MiB)
    server = FakeServer()
    guard = MemoryGuard(0.9, "g1", host.memory())
    resume = 0.9 * RESUME_FRACTION

    assert _started(guard, server)
    host.v1(APP, limit=100 * MiB, usage=int(89.9 * MiB))
    guard.check()
    assert server.switched == [] and not guard.shedding
    host.v1(APP, limit=100 * MiB, usage=90 * MiB)
    guard.check()
    assert server.switched == [7] and guard.shedding  # no more connections than open now
    assert _value(metrics.MEMORY_SHEDDING, "g1") == 1
    guard.count_refusal()
    guard.count_refusal()
    host.v1(APP, limit=100 * MiB, usage=int((resume + 0.001) * 100 * MiB))  # under the mark, not under resume
    guard.check()
    assert server.switched == [7]
    host.v1(APP, limit=100 * MiB, usage=int((resume - 0.001) * 100 * MiB))
    guard.check()

    assert server.switched == [7, None] and not guard.shedding
    assert _value(metrics.MEMORY_SHEDDING, "g1") == 0
    assert _value(metrics.MEMORY_LIMIT, "g1") == 100 * MiB
    assert _value(metrics.MEMORY_USED, "g1") == int((resume - 0.001) * 100 * MiB)
    assert _value(metrics.CONNECTIONS_REFUSED_MEMORY, "g1") == 2
    events = {e["event"].split(":")[0]: e for e in logged}
    assert events["memory shedding on"]["limit_bytes"] == 100 * MiB
    assert events["memory shedding on"]["shed_at_bytes"] == 90 * MiB
    started = events["memory shedding started"]
    assert started["log_level"] == "warning"
    assert (started["used_bytes"], started["limit_bytes"], started["connections_cap"]) == (
        90 * MiB,
        100 * MiB,
        7,
    )
    assert APP.lstrip("/") in started["cgroup"]
    assert events["memory shedding stopped"]["refused"] == 2


def test_working_set_not_usage_decides(host: FakeHost) -> None:
    """Page cache the kernel would drop before any OOM kill is no reason to refuse anyone."""
    host.member_of(f"0::{APP}")
    host.v2(APP, limit=100 * MiB, current=99 * MiB, inactive_file=40 * MiB)
    server = FakeServer()
    guard = MemoryGuard(0.9, "g2", host.memory())

    assert _started(guard, server)
    assert server.switched == [] and _value(metrics.MEMORY_USED, "g2") == 59 * MiB


def test_over_the_mark_at_start_sheds_at_once(host: FakeHost) -> None:
    host.member_of(f"0::{APP}")
    host.v2(APP, limit=100 * MiB, current=95 * MiB)
    server = FakeServer()

    assert _started(MemoryGuard(0.9, "g3", host.memory()), server)
    assert server.switched == [7]


def test_a_lifted_limit_ends_shedding(host: FakeHost) -> None:
    host.member_of(f"0::{APP}")
    host.v2(APP, limit=100 * MiB, current=95 * MiB)
    server = FakeServer()
    guard = MemoryGuard(0.9, "g4", host.memory())
    assert _started(guard, server)

    host.v2(APP, limit="max", current=95 * MiB)
    guard.check()

    assert server.switched == [7, None]


def test_the_cap_comes_down_to_the_open_connections_halfway_to_the_limit(host: FakeHost) -> None:
    """Connections that close make room for new ones (their memory stays with the process for
    reuse); only halfway from the mark to the limit are they no longer replaced."""
    host.member_of(f"0::{APP}")
    host.v2(APP, limit=100 * MiB, current=91 * MiB)
    server = FakeServer(connections=100)
    guard = MemoryGuard(0.9, "g6", host.memory())
    assert _started(guard, server)
    assert server.switched == [100]

    server.connections = 60  # 40 closed; memory as it was: their room is kept for new ones
    guard.check()
    host.v2(APP, limit=100 * MiB, current=int(94.9 * MiB))
    guard.check()
    assert server.switched == [100]

    host.v2(APP, limit=100 * MiB, current=95 * MiB)  # (1 + 0.9) / 2 of the limit, with 60 open
    guard.check()
    assert server.switched == [100, 60] and guard.cap == 60

    host.v2(APP, limit=100 * MiB, current=97 * MiB)  # at the cap: nothing lower to hold to
    guard.check()
    assert server.switched == [100, 60]


def test_a_burst_of_accepts_is_looked_at_every_check_every_connections(host: FakeHost) -> None:
    host.member_of(f"0::{APP}")
    host.v2(APP, limit=100 * MiB, current=50 * MiB)
    server = FakeServer()
    guard = MemoryGuard(0.9, "g7", host.memory())
    assert guard.enabled

    async def burst() -> list[list[int | None]]:
        assert guard.start(server, interval=3600)  # the timer will not fire: accepts alone look
        try:
            host.v2(APP, limit=100 * MiB, current=95 * MiB)
            for _ in range(CHECK_EVERY - 1):
                guard.count_accept()
            seen = [list(server.switched)]
            guard.count_accept()
            return [*seen, list(server.switched)]
        finally:
            guard.stop()

    assert asyncio.run(burst()) == [[], [7]]


@pytest.mark.parametrize(
    ("shed_at", "limit", "reason"),
    [
        (0.0, 100 * MiB, "MEMORY_SHED_AT is 0"),
        (0.9, "max", "no cgroup memory limit found"),
    ],
)
def test_off_is_said_once_and_nothing_is_watched(
    host: FakeHost, logged: list[dict[str, Any]], shed_at: float, limit: int | str, reason: str
) -> None:
    host.member_of(f"0::{APP}")
    host.v2(APP, limit=limit, current=99 * MiB)
    server = FakeServer()
    guard = MemoryGuard(shed_at, "g5", host.memory())

    assert not _started(guard, server)

    assert [(e["event"], e["reason"]) for e in logged] == [("memory shedding off", reason)]
    assert server.switched == [] and guard._timer is None and not guard.enabled


# -- the refusal, through the real server ----------------------------------------------------------


class Hello(RequestHandler):
    def get(self) -> None:
        self.write("hello")


def _exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data


def test_the_server_refuses_past_the_memory_cap_as_at_max_connections() -> None:
    refused: list[str] = []

    async def scenario() -> list[bytes]:
        server = LimitedHTTPServer(
            Application([("/", Hello)]),
            max_connections=3,
            on_refuse=lambda: refused.append("max_connections"),
            on_shed=lambda: refused.append("memory"),
            identity={"X-Worker-Id": "0"},
        )
        sock, port = bind_unused_port()
        server.add_sockets([sock])
        loop = asyncio.get_running_loop()
        plain = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        upgrade = (
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )

        def exchange(request: bytes) -> Awaitable[bytes]:
            return loop.run_in_executor(None, _exchange, port, request)

        try:
            replies = [await exchange(plain)]
            server.shed(0)  # memory over the mark with nothing open: every new connection is refused
            replies += [await exchange(plain), await exchange(upgrade)]
            server.shed(5)  # a memory cap above MAX_CONNECTIONS: the connection cap is what refuses
            held = [
                await loop.run_in_executor(None, socket.create_connection, ("127.0.0.1", port))
                for _ in range(3)
            ]
            replies.append(await exchange(plain))
            for conn in held:
                conn.close()
            server.shed(None)
            replies.append(await exchange(plain))
            return replies
        finally:
            server.stop()

    before, shed, shed_upgrade, at_max, after = asyncio.run(scenario())

    assert before.startswith(b"HTTP/1.1 200") and after.startswith(b"HTTP/1.1 200")
    for reply in (shed, shed_upgrade):
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        assert b"\r\nConnection: close\r\n" in head and b"\r\nX-Worker-Id: 0\r\n" in head
        assert body == b'{"error":"server low on memory","status":503}'
    assert at_max.endswith(b'{"error":"too many open connections","status":503}')
    assert refused == ["memory", "memory", "max_connections"]
