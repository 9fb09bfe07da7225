"""File-descriptor pressure: more connections than a process may hold, for the service and for Nginx.

- The service under a low open-files limit (`prlimit --nofile=N:N`, as a container's ulimit):
  the supervisor lowers MAX_CONNECTIONS to fit (N less 256 of headroom), so a connection past it
  gets the cap's 503 and is closed; the worker neither dies nor spins, and serves again once the
  held connections close.
- A worker whose descriptors run out before its cap (its own limit lowered while it runs, as if
  something else had used the headroom): accept() fails with EMFILE. Tornado's accept loop would
  let that error reach the event loop, which calls it again at once, forever: a spin at full CPU
  with a traceback logged per turn. The service pauses the listener instead (service/http/server.py,
  PausingAcceptor); the waiting connections are accepted once descriptors are free again.
- Nginx with a small worker_connections: a connection past it is accepted and closed at once
  ("worker_connections are not enough" in the error log), or, when some of the connections it
  holds are idle, Nginx closes the oldest idle ones to make room ("reusing connections").
  Either way it stays up, its worker is the same process, and it serves again once they close.

The CPU figure is a sanity bound on a spin (a spinning worker uses a whole core), not a timing
target.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import http.client
import selectors
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import ServiceProcess, http_request, require_tool, wait_until
from metrics_client import scrape
from proxy import Nginx

from loadtests.harness.wire import Reply, read_until_closed
from service.http.server import PausingAcceptor

Start = Callable[..., ServiceProcess]

NOFILE = 400  # the service's whole open-files limit in the first test
FD_RESERVE = 256  # service/process/supervisor.py: descriptors kept for everything but connections
SPIN = 0.3  # CPU seconds per second of wall time above which a worker is taken to be spinning
WINDOW = 2.0  # seconds over which a worker's CPU time is measured


@contextlib.contextmanager
def connections(port: int, count: int, first: bytes = b"") -> Iterator[list[socket.socket]]:
    """`count` connections to 127.0.0.1:port (each sends `first`, if any), closed on the way out."""
    opened: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            if first:
                with contextlib.suppress(OSError):
                    sock.sendall(first)
            opened.append(sock)
        yield opened
    finally:
        for sock in opened:
            sock.close()


def ended(socks: list[socket.socket], expected: int, timeout: float = 10.0) -> dict[socket.socket, Reply]:
    """The connections the server ended (with what it sent), once `expected` of them have or
    `timeout` has passed; the others are still held by the server."""
    replies: dict[socket.socket, Reply] = {}
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while len(replies) < expected and (remaining := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(remaining):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                selector.unregister(sock)
                replies[sock] = read_until_closed(sock, 5.0)
    return replies


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def busy(pid: int, window: float = WINDOW) -> float:
    """CPU seconds the process used per second of wall time over `window`."""
    before, began = cpu_seconds(pid), time.monotonic()
    time.sleep(window)
    return (cpu_seconds(pid) - before) / (time.monotonic() - began)


def test_service_under_a_low_open_files_limit(start_service: Start) -> None:
    """The cap fitted to the limit, then a flood past it larger than the 256 descriptors of
    headroom: a refused connection keeps its descriptor while the 503 lingers (until the client
    closes, at most REFUSAL_LINGER_SECONDS), so the flood can run the worker out of descriptors;
    the listener then rests, and every connection of the flood still gets its 503."""
    prlimit = require_tool("prlimit")
    svc = start_service(workers=1, prefix=[prlimit, f"--nofile={NOFILE}:{NOFILE}"])
    lowered = svc.wait_for(lambda e: e.get("event") == "MAX_CONNECTIONS lowered to fit the open-files limit")
    cap = NOFILE - FD_RESERVE
    assert (lowered["allowed"], lowered["nofile"]) == (cap, NOFILE)
    assert svc.named("worker started")[0]["connections_cap"] == cap
    [(worker_id, pid)] = svc.live_workers().items()
    flood = 2 * FD_RESERVE
    mark = len(svc.events)

    with connections(svc.port, cap) as held:
        began, cpu_before, peak = time.monotonic(), cpu_seconds(pid), 0
        with connections(svc.port, flood) as socks:
            replies = ended(socks, flood, timeout=30)
            peak = psutil.Process(pid).num_fds()
            cpu = (cpu_seconds(pid) - cpu_before) / (time.monotonic() - began)
            took = time.monotonic() - began
        status, _, body = svc.request("/api/hello")  # one more, the cap still full: refused the same way
        still_held = len(held) - len(ended(held, 1, timeout=0.5))
    refused = list(replies.values())
    pauses = [e for e in svc.events[mark:] if str(e.get("event", "")).startswith("cannot accept")]
    print(
        f"\n[service, RLIMIT_NOFILE {NOFILE}] MAX_CONNECTIONS {cap}; {cap} held, then a flood of {flood}: "
        f"{len(refused)} refused ({sorted({tuple(r.statuses) for r in refused})}) in {took:.1f} s; "
        f"worker fds at the end {peak}/{NOFILE}; listener pauses (EMFILE) {[e['pauses'] for e in pauses]}; "
        f"worker CPU {cpu:.3f} s/s meanwhile; a request then: {status}"
    )
    assert len(refused) == flood
    assert all(r.statuses == [503] and r.closed for r in refused)
    assert refused[0].responses[0].body == b'{"error":"too many open connections","status":503}'
    assert status == 503 and body == b'{"error":"too many open connections","status":503}'
    assert still_held == cap
    assert cpu < SPIN
    assert wait_until(lambda: svc.request("/api/hello")[0] == 200, 10)  # the closed ones no longer count
    assert svc.live_workers() == {worker_id: pid}
    assert not svc.named("worker died, restarting")
    assert scrape(svc).total("tornado_connections_refused_total") >= flood + 1


def test_a_worker_out_of_descriptors_pauses_instead_of_spinning(start_service: Start) -> None:
    svc = start_service(workers=1)
    [(worker_id, pid)] = svc.live_workers().items()
    worker = psutil.Process(pid)
    limit = worker.rlimit(psutil.RLIMIT_NOFILE)
    spare = 10
    mark = len(svc.events)
    try:
        # Far below MAX_CONNECTIONS (10,000): accept() runs out of descriptors first.
        worker.rlimit(psutil.RLIMIT_NOFILE, (worker.num_fds() + spare, limit[1]))
        with connections(svc.port, 5 * spare) as socks:
            assert not ended(socks, 1, timeout=1.0)  # none refused, none ended: held, or in the backlog
            cpu = busy(pid)
            lines = svc.events[mark:]
            pauses = [e for e in lines if str(e.get("event", "")).startswith("cannot accept")]
            print(
                f"\n[worker out of descriptors] limit {worker.rlimit(psutil.RLIMIT_NOFILE)[0]}, "
                f"{len(socks)} connections: worker CPU {cpu:.3f} s/s, {len(lines)} log lines, "
                f"pause warnings {[(e['error'], e['pauses']) for e in pauses]}"
            )
            assert cpu < SPIN
            assert pauses and pauses[0]["error"] == "EMFILE"
            assert len(lines) < 50  # no line per turn of a loop
        # The held ones are closed: the ones waiting in the backlog are accepted (and end), and
        # new ones are served, with the same low limit.
        assert wait_until(lambda: svc.request("/api/hello")[0] == 200, 10)
        assert svc.live_workers() == {worker_id: pid}
    finally:
        with contextlib.suppress(psutil.Error):
            worker.rlimit(psutil.RLIMIT_NOFILE, limit)
    assert not svc.named("worker died, restarting")


def test_the_acceptor_rests_instead_of_spinning_and_stops_for_good() -> None:
    """PausingAcceptor itself, with accept() made to fail with EMFILE: a few tries, one per pause,
    then the connection is accepted; and a stop during a pause leaves nothing behind."""

    class Exhausted(socket.socket):
        failures = 0
        calls = 0

        def accept(self) -> tuple[socket.socket, Any]:
            self.calls += 1
            if self.failures:
                self.failures -= 1
                raise OSError(errno.EMFILE, "Too many open files")
            return super().accept()

    async def scenario() -> tuple[int, int, bool, list[dict[str, Any]]]:
        errors: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: errors.append(context))
        listener = Exhausted(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        accepted: list[socket.socket] = []
        acceptor = PausingAcceptor(listener, lambda conn, _address: accepted.append(conn))
        listener.failures = 3
        clients = [socket.create_connection(listener.getsockname())]
        deadline = time.monotonic() + 10
        while not accepted and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        calls = listener.calls
        listener.failures = 1  # the next one finds the process out of descriptors: a pause...
        clients.append(socket.create_connection(listener.getsockname()))
        deadline = time.monotonic() + 10
        while not acceptor.paused and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        paused = acceptor.paused
        acceptor.remove()  # ... and the server stops meanwhile (TCPServer.stop: remove, then close)
        listener.close()
        await asyncio.sleep(PausingAcceptor.PAUSE + 0.2)  # the pause ends: nothing may be re-added
        for sock in accepted + clients:
            sock.close()
        return calls, len(accepted), paused, errors

    calls, accepted, paused, errors = asyncio.run(scenario())
    assert accepted == 1 and calls <= 5  # 3 EMFILEs (one per pause), the accept, the empty backlog
    assert paused and errors == []


# -- Nginx --------------------------------------------------------------------------------------

WORKER_CONNECTIONS = 64


@pytest.fixture
def small_nginx(start_service: Start, tmp_path: Path) -> Iterator[Nginx]:
    """One Nginx worker with 64 connections (three of them its listeners), before the service."""
    svc = start_service(workers=1)
    proxy = Nginx(
        tmp_path,
        svc.port,
        WORKER_PROCESSES="1",
        WORKER_CONNECTIONS=str(WORKER_CONNECTIONS),
        WORKER_RLIMIT_NOFILE=str(2 * WORKER_CONNECTIONS),
        CLIENT_HEADER_TIMEOUT="60s",
    )
    try:
        yield proxy.start()
    finally:
        proxy.stop()


def nginx_workers(proxy: Nginx) -> list[int]:
    assert proxy.proc is not None and proxy.proc.poll() is None, "Nginx exited"
    return [child.pid for child in psutil.Process(proxy.proc.pid).children()]


def normal(port: int) -> str:
    """What a normal client gets: a status, or how the connection ended without one."""
    try:
        return str(http_request(port, "/api/hello", timeout=5)[0])
    except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
        return type(exc).__name__
    except TimeoutError:
        return "no answer in 5 s"


def test_nginx_beyond_worker_connections_refuses_and_recovers(small_nginx: Nginx) -> None:
    """Connections that have sent part of a head are in use: Nginx cannot take them back, and a
    connection past worker_connections is accepted and closed at once. (A connection Nginx has
    accepted but not yet read from counts as idle, and Nginx closes idle ones ahead of need while
    fewer than 1/16 of its connections are free: so a few slots may be free at any moment, and
    a normal request may then be served.)"""
    workers = nginx_workers(small_nginx)
    count = 2 * WORKER_CONNECTIONS
    with connections(small_nginx.http_port, count, first=b"GET /api/hello HTTP/1.1\r\n") as socks:
        replies = ended(socks, count - WORKER_CONNECTIONS + 3, timeout=5.0)
        extra = [normal(small_nginx.http_port) for _ in range(5)]
        log = small_nginx.error_log.read_text()
        print(
            f"\n[Nginx, worker_connections {WORKER_CONNECTIONS}] {count} partial heads: "
            f"{count - len(replies)} held, {len(replies)} ended at once "
            f"({sorted({('reset' if r.reset else 'closed', r.data[:12]) for r in replies.values()})}); "
            f"normal requests then: {extra}; error log: {log.count('worker_connections are not enough')} "
            f"'worker_connections are not enough' lines, e.g. {first_line(log, 'not enough')!r}"
        )
        assert count - len(replies) <= WORKER_CONNECTIONS
        assert replies and all(r.closed and not r.data for r in replies.values())  # closed, no answer
        # Refused at once, or served when Nginx had freed a slot (see the docstring): never left hanging.
        assert "no answer in 5 s" not in extra
        assert "worker_connections are not enough" in log
        assert nginx_workers(small_nginx) == workers
    assert wait_until(lambda: normal(small_nginx.http_port) == "200", 10)
    assert nginx_workers(small_nginx) == workers


def test_nginx_takes_back_idle_connections_when_short(small_nginx: Nginx) -> None:
    """Connections that have sent nothing yet are idle: Nginx closes the oldest to make room."""
    workers = nginx_workers(small_nginx)
    count = 2 * WORKER_CONNECTIONS
    with connections(small_nginx.http_port, count) as socks:
        time.sleep(0.5)
        served = [normal(small_nginx.http_port) for _ in range(10)]
        replies = ended(socks, count, timeout=1.0)
        log = small_nginx.error_log.read_text()
        print(
            f"\n[Nginx, worker_connections {WORKER_CONNECTIONS}] {count} idle connections: normal requests "
            f"then {served}; {len(replies)} idle ones ended by Nginx; error log: "
            f"{log.count('reusing connections')} 'reusing connections' lines, "
            f"{log.count('are not enough') - log.count('reusing connections')} other 'not enough' lines"
        )
        assert served.count("200") >= 1
        assert all(r.closed and not r.data for r in replies.values())
        assert nginx_workers(small_nginx) == workers
    assert wait_until(lambda: normal(small_nginx.http_port) == "200", 10)


def first_line(text: str, needle: str) -> str:
    return next((line for line in text.splitlines() if needle in line), "")
