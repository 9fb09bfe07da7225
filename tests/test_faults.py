"""Faults under load, through a real Nginx: workers SIGKILLed again and again while k6 sends
requests, and a rolling restart of two service instances behind one Nginx upstream with HTTP
clients and WebSockets connected. The goal in each: no failed request, and every WebSocket
closed with 1001 (going away) and reconnected by its client.

What makes it hold (docs/reliability.md): Nginx retries an idempotent request that failed
before an answer (a reset, a refused connect, a 503) on the next listed server, and the service
is listed more than once per instance (nginx/render.py `upstream_servers`); a draining instance
answers what it has in flight, closes WebSockets with 1001, refuses new upgrades with 503, and
then refuses connections.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import wsclient
from conftest import ROOT, ServiceProcess, gone, require_tool, wait_until
from httpload import HttpLoad
from proxy import Nginx

from loadtests.harness import processes
from loadtests.harness.ports import free_port

pytestmark = pytest.mark.timeout(300)

KILLS = 4


@pytest.fixture
def cleanup() -> Iterator[list[ServiceProcess | Nginx]]:
    started: list[ServiceProcess | Nginx] = []
    yield started
    for process in reversed(started):
        process.stop()


def _restarts(svc: ServiceProcess) -> float:
    """tornado_worker_restarts_total over every worker, from the service's /metrics."""
    _, _, body = svc.request("/metrics")
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in body.decode().splitlines()
        if line.startswith("tornado_worker_restarts_total{")
    )


def test_killing_workers_again_and_again_under_k6_load_through_nginx(
    tmp_path: Path, cleanup: list[ServiceProcess | Nginx]
) -> None:
    k6 = require_tool("k6")
    svc = ServiceProcess("--shutdown-grace", "5")
    cleanup.append(svc)
    svc.start()
    nginx = Nginx(tmp_path / "nginx", svc.port)
    cleanup.append(nginx)
    nginx.start()
    summary = tmp_path / "k6-summary.json"
    env = {
        **os.environ, "BASE_URL": f"http://127.0.0.1:{nginx.http_port}", "RATE": "150", "DURATION": "20",
        "SLEEP_MS": "100", "SLEEP_SHARE": "0.3", "MAX_ERROR_RATE": "0", "P95_MS": "5000",
    }
    load = processes.spawn(
        [k6, "run", "--quiet", "--no-color", "--address", "", "--summary-export", str(summary),
         str(ROOT / "loadtests/k6/http.js")],
        output=subprocess.PIPE, env=env, stdin=None,
    )
    try:
        time.sleep(5)  # past k6's ramp-up: requests in flight on every worker
        for kill in range(KILLS):
            victim_id, victim_pid = sorted(svc.live_workers().items())[kill % 2]
            mark = len(svc.events)
            os.kill(victim_pid, signal.SIGKILL)
            svc.wait_for(lambda e, w=victim_id: e.get("event") == "worker started" and e["worker"] == w,
                         timeout=10, after=mark)  # back within seconds
            time.sleep(2)
        output, _ = load.communicate(timeout=120)
    finally:
        if load.poll() is None:
            processes.stop(load, signal.SIGKILL, whole_group=True)
    metrics = json.loads(summary.read_text())["metrics"]
    failed, total = metrics["http_req_failed"]["passes"], metrics["http_reqs"]["count"]
    bad = [line for line in nginx.access_lines() if line["status"] != 200]
    errors = nginx.error_log.read_text()[-2000:]
    assert failed == 0, f"{failed} of {total} requests failed: {bad[:5]}\n{errors}"
    assert load.returncode == 0, output.decode(errors="replace")[-3000:]
    assert total > 1000
    died = svc.named("worker died, restarting")
    assert len(died) == KILLS and {e["signal"] for e in died} == {"SIGKILL"}
    assert wait_until(lambda: _restarts(svc) == KILLS, 5), _restarts(svc)
    tries = [line["upstream_addr"].count(",") + 1 for line in nginx.access_lines()]
    print(f"{total} requests through Nginx, {KILLS} workers SIGKILLed, 0 failed, "
          f"{sum(t > 1 for t in tries)} retried by Nginx, at most {max(tries)} tries for one")


class Member:
    """A WebSocket client that reconnects when the server closes it, as a browser's code would."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.close_codes: list[int | None] = []
        self.connect_errors: list[str] = []
        self.conn = None
        self.opened = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                self.conn = await wsclient.connect(self.url)
            except Exception as exc:
                self.connect_errors.append(repr(exc))
                await asyncio.sleep(0.2)
                continue
            self.opened += 1
            reading = asyncio.ensure_future(self._read_until_closed())
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait([reading, stopping], return_when=asyncio.FIRST_COMPLETED)
            if reading.done():
                self.close_codes.append(self.conn.close_code)
                stopping.cancel()
                continue
            reading.cancel()
            self.conn.close()

    async def _read_until_closed(self) -> None:
        assert self.conn is not None
        while await self.conn.read_message() is not None:
            pass


def test_rolling_restart_of_two_instances_behind_one_nginx(
    tmp_path: Path, cleanup: list[ServiceProcess | Nginx]
) -> None:
    ports = [free_port(), free_port()]
    args = ("--shutdown-grace", "8", "--tick-interval", "0.5")

    def start(port: int) -> ServiceProcess:
        svc = ServiceProcess(*args, "--port", str(port))
        cleanup.append(svc)
        return svc.start()

    instances = [start(port) for port in ports]
    nginx = Nginx(tmp_path / "nginx", ports[0], UPSTREAM=",".join(f"127.0.0.1:{p}" for p in ports))
    cleanup.append(nginx)
    nginx.start()
    load = HttpLoad(nginx.http_port, ["/api/sleep?ms=50", "/api/hello", "/api/hello"])
    members = [Member(f"ws://127.0.0.1:{nginx.http_port}/ws/ticker") for _ in range(12)]
    restarted: list[int] = []

    def roll() -> None:
        """One instance after the other: SIGTERM, wait for its clean exit, start it again."""
        for index, port in enumerate(ports):
            old = instances[index]
            old.signal(signal.SIGTERM)
            assert old.wait(20) == 0
            restarted.append(len(old.named("worker drained")))
            instances[index] = start(port)
            time.sleep(1.5)  # the new instance takes its share before the next one goes

    async def scenario() -> None:
        stop = asyncio.Event()
        tasks = [asyncio.ensure_future(m.run(stop)) for m in members]
        assert await asyncio.to_thread(wait_until, lambda: all(m.opened for m in members), 15)
        await asyncio.sleep(1)
        await asyncio.to_thread(roll)
        # Every member is open again (on one of the new instances) before the end.
        assert await asyncio.to_thread(
            wait_until, lambda: all(len(m.close_codes) < m.opened for m in members), 15
        )
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 15)

    try:
        wsclient.run(scenario())
    finally:
        load.stop()
    assert restarted == [2, 2]
    assert load.failures == [], (
        f"{len(load.failures)} of {load.done} requests failed: {load.failures[:5]}\n"
        f"{[line for line in nginx.access_lines() if line['status'] != 200][:3]}\n"
        f"{nginx.error_log.read_text()[-1500:]}"
    )
    assert load.done > 200
    codes = [code for m in members for code in m.close_codes]
    assert all(m.close_codes for m in members), "every member was on an instance that restarted"
    assert set(codes) == {1001}, codes
    assert [e for m in members for e in m.connect_errors] == []
    print(f"{load.done} requests, 0 failed; {len(members)} WebSockets, {len(codes)} closes (all 1001), "
          f"{sum(m.opened for m in members) - len(members)} reconnects")


def test_supervisor_sigkill_leaves_no_worker_and_frees_the_port(
    cleanup: list[ServiceProcess | Nginx],
) -> None:
    svc = ServiceProcess("--shutdown-grace", "5", "--port", str(free_port()))
    cleanup.append(svc)
    svc.start()
    port = svc.port
    workers = svc.tree()
    svc.signal(signal.SIGKILL)
    assert gone(workers, 10), "orphaned workers linger"
    assert len(svc.named("worker drained")) == 2
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))  # the next instance can listen on it at once

