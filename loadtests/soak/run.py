"""The run: start the service (and Nginx), warm every worker up, take an idle baseline, churn
with samples and worker kills, wind down, take the final figures, and judge them (judging.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

import psutil

from loadtests.soak import judging
from loadtests.soak.clients import MIX, Clients
from loadtests.soak.common import LIVE_GAUGE_PREFIX, MIB, say
from loadtests.soak.processes import Nginx, Service
from loadtests.soak.sampling import Kill, file_pid, metrics_files, process_figures, scrape, tcp_connections
from loadtests.soak.wire import TEXT, HttpConnection, ProtocolError, Refused, WebSocket


class Soak:
    """One run: its processes, its figures as they are collected, and the rules applied to them."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir = Path(tempfile.mkdtemp(prefix="soak-"))
        self.metrics_dir = self.workdir / "metrics"
        self.metrics_dir.mkdir()
        self.service = Service(args.workers, self.metrics_dir, args.tick_interval)
        self.nginx: Nginx | None = None
        self.samples: list[dict[str, Any]] = []
        self.kills: list[Kill] = []
        self.baseline: dict[str, Any] = {}
        self.final: dict[str, Any] = {}
        self.clients: Clients | None = None
        self.started = 0.0  # loop time of the churn's start
        self.churn_seconds = 0.0
        self.interrupted = False
        self.notes: list[str] = []
        self.final_metrics: dict[str, Any] | None = None
        self.nginx_errors: list[str] = []

    @property
    def client_port(self) -> int:
        return self.nginx.port if self.nginx is not None else self.service.port

    # -- set-up and tear-down (synchronous) ------------------------------------------------------
    def start(self) -> None:
        say(f"starting the service ({self.args.workers} workers, metrics directory {self.metrics_dir})")
        self.service.start()
        if not self.args.direct:
            self.nginx = Nginx(self.workdir / "nginx", self.service.port)
            self.nginx.start()
        target = f"Nginx on 127.0.0.1:{self.nginx.port} in front of" if self.nginx else "directly"
        say(f"clients go {target} the service on 127.0.0.1:{self.service.port}")

    def cleanup(self) -> None:
        """Every process this run started, by process group; then its working directory."""
        if self.nginx is not None and self.nginx.exit_code is None:
            self.nginx.stop()
        if self.service.exit_code is None:
            self.service.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def leftovers(self) -> list[int]:
        seen = self.service.pids_seen | (self.nginx.pids_seen if self.nginx else set())
        left = []
        for pid in seen:
            with contextlib.suppress(psutil.Error):
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    left.append(pid)
        return sorted(left)

    # -- the asynchronous part: warm-up, churn with samples and kills, wind-down ------------------
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._interrupt)
        await self.warm_up()
        self.baseline = await self.idle_figures("baseline")
        say(f"baseline: {self.describe(self.baseline)}")
        self.started = loop.time()
        self.clients = Clients(self.client_port, self.args, self.started)
        tasks = self.clients.tasks()
        say(
            f"churn for {self.args.duration:g} s: {len(tasks)} clients, "
            f"a sample every {self.args.interval:g} s, "
            f"{self.args.kills} kill(s) of worker {self.args.workers - 1}"
        )
        sampler = asyncio.ensure_future(self.sample_loop())
        killer = asyncio.ensure_future(self.kill_loop())
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.clients.stopping.wait(), self.args.duration)
        finally:
            self.churn_seconds = loop.time() - self.started
            self.clients.stopping.set()
            killer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await killer
            await self.wind_down(tasks)
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)

    def _interrupt(self) -> None:
        if not self.interrupted:
            say("interrupted: stopping the clients, then everything")
            self.interrupted = True
        if self.clients is not None:
            self.clients.stopping.set()

    async def warm_up(self) -> None:
        """Every request kind and both WebSocket kinds, straight to the service, until every worker
        has answered: each worker's lazily made state (metric files, label values, bus sockets) exists
        before the baseline is read, so what the baseline is compared with is the clients' doing."""
        port = self.service.port
        workers = set(self.service.live_workers().values())
        answered: set[int] = set()
        published: set[int] = set()  # a publish opens the worker's sockets to its peers (the embedded bus)
        rng = random.Random(0)
        for rounds in range(1, 41):
            for _weight, method, target, _expected in MIX:
                conn = HttpConnection(port)
                with contextlib.suppress(OSError, asyncio.IncompleteReadError, ProtocolError, TimeoutError):
                    response = await asyncio.wait_for(conn.request(method, target(rng), close=True), 10)
                    answered |= {response.pid} if response.pid else set()
                conn.abort()
            publish = HttpConnection(port)
            with contextlib.suppress(OSError, asyncio.IncompleteReadError, ProtocolError, TimeoutError):
                response = await asyncio.wait_for(
                    publish.request("POST", "/api/publish?room=soak-0", b'{"data": "warm-up"}', close=True),
                    10,
                )
                published |= {response.pid} if response.pid else set()
            publish.abort()
            for path in ("/ws/ticker", "/ws/chat?room=soak-0", "/ws/echo"):
                with contextlib.suppress(
                    OSError, asyncio.IncompleteReadError, ProtocolError, TimeoutError, Refused
                ):
                    ws = await asyncio.wait_for(WebSocket.connect(port, path), 10)
                    ws.send(TEXT, b"warm-up")
                    pump = asyncio.ensure_future(ws.pump())
                    await asyncio.sleep(self.args.tick_interval + 0.1)
                    ws.start_close()
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(pump, 5)
                    await ws.finish()
            if rounds >= 3 and workers <= answered and workers <= published:
                break
        if not (workers <= answered and workers <= published):
            self.notes.append(
                f"warm-up reached workers {sorted(answered)} (published on {sorted(published)}) "
                f"of {sorted(workers)}"
            )
        await scrape(port)

    async def idle_figures(self, label: str, settle: float = 20.0) -> dict[str, Any]:
        """Each worker's and the supervisor's figures once no client connection is left open (waiting
        up to `settle` s for that), and the metrics directory's."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settle
        while True:
            workers = self.service.live_workers()
            connections = {slot: tcp_connections(pid) for slot, pid in workers.items()}
            if all(n == 0 for n in connections.values()) or loop.time() > deadline:
                break
            await asyncio.sleep(0.25)
        await asyncio.sleep(0.5)  # a closed connection's descriptor goes with the loop's next turn
        figures: dict[str, Any] = {"label": label, "workers": {}, "connections": connections}
        for slot, pid in sorted(workers.items()):
            figures["workers"][str(slot)] = {
                "pid": pid,
                **(process_figures(pid) or {}),
                "tcp_connections": tcp_connections(pid),
            }
        figures["supervisor"] = {"pid": self.service.pid, **(process_figures(self.service.pid) or {})}
        files = metrics_files(self.metrics_dir)
        figures["metrics_dir"] = {
            "files": len(files),
            "bytes": sum(s for s, _ in files.values()),
            "allocated": sum(a for _, a in files.values()),
            "names": sorted(files),
        }
        return figures

    @staticmethod
    def describe(figures: dict[str, Any]) -> str:
        workers = ", ".join(
            f"w{slot} pid {w.get('pid')} rss {w.get('rss', 0) / MIB:.1f} MiB fds {w.get('fds')}"
            for slot, w in figures["workers"].items()
        )
        d = figures["metrics_dir"]
        return f"{workers}; metrics directory {d['files']} files, {d['bytes'] / 1024:.0f} KiB"

    async def sample_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            await self.sample()
            next_at += self.args.interval
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    async def sample(self) -> None:
        assert self.clients is not None
        t = round(self.clients.now(), 2)
        workers: dict[str, Any] = {}
        for slot, pid in sorted(self.service.live_workers().items()):
            figures = process_figures(pid)
            if figures is not None:
                workers[str(slot)] = {"pid": pid, **figures}
        files = metrics_files(self.metrics_dir)
        row: dict[str, Any] = {
            "t": t,
            "workers": workers,
            "supervisor": process_figures(self.service.pid),
            "metrics_dir": {
                "files": len(files),
                "bytes": sum(s for s, _ in files.values()),
                "allocated": sum(a for _, a in files.values()),
            },
            "metrics": await scrape(self.service.port),
        }
        self.samples.append(row)
        c = self.clients
        done = sum(n for kind in c.counts.values() for key, n in kind.items() if key in ("ok", "aborted"))
        served = row["metrics"] or {}
        say(
            f"[{t:6.0f} s] "
            + ", ".join(f"w{s} {w['rss'] / MIB:.1f} MiB {w['fds']} fds" for s, w in workers.items())
            + f"; dir {len(files)} files; clients {done:,} done, {len(c.failures)} failed; "
            f"server {served.get('requests', 0):,.0f} requests, {served.get('websockets', 0):.0f} websockets"
        )

    def kill_times(self) -> list[float]:
        kills, duration = self.args.kills, self.args.duration
        if kills <= 0:
            return []
        if kills == 1:
            return [0.35 * duration]
        return [duration * (0.2 + 0.3 * i / (kills - 1)) for i in range(kills)]

    async def kill_loop(self) -> None:
        assert self.clients is not None
        slot = self.args.workers - 1
        for at in self.kill_times():
            await asyncio.sleep(max(0.0, at - self.clients.now()))
            pid = self.service.live_workers().get(slot)
            if pid is None:
                self.notes.append(f"no worker {slot} to kill at {at:.0f} s")
                continue
            files = metrics_files(self.metrics_dir)
            mine = sorted(n for n in files if file_pid(n) == pid)
            kept = [n for n in mine if not n.startswith(LIVE_GAUGE_PREFIX)]
            kill = Kill(
                slot,
                pid,
                round(self.clients.now(), 2),
                files=mine,
                kept=kept,
                kept_bytes=sum(files[n][0] for n in kept),
            )
            self.kills.append(kill)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            say(f"[{kill.t:6.0f} s] SIGKILL worker {slot} (pid {pid})")
            killed_at = asyncio.get_running_loop().time()
            while kill.new_pid is None and asyncio.get_running_loop().time() - killed_at < 30:
                await asyncio.sleep(0.05)
                new = self.service.live_workers().get(slot)
                if new is not None and new != pid:
                    kill.new_pid = new
                    kill.back_after = round(asyncio.get_running_loop().time() - killed_at, 2)
            await asyncio.sleep(1.0)  # the supervisor marks the dead pid before it forks again
            kill.live_left = sorted(
                n
                for n in metrics_files(self.metrics_dir)
                if file_pid(n) == pid and n.startswith(LIVE_GAUGE_PREFIX)
            )
            say(
                f"[{self.clients.now():6.0f} s] worker {slot} back as pid {kill.new_pid} "
                f"after {kill.back_after} s"
            )

    async def wind_down(self, tasks: list[asyncio.Task[None]]) -> None:
        """The clients finish what they are doing and close; then Nginx stops; then the idle figures."""
        assert self.clients is not None
        done, pending = await asyncio.wait(tasks, timeout=30)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=10)
            self.notes.append(f"{len(pending)} client(s) still busy 30 s after the churn: cancelled")
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                error = task.exception()
                self.clients.fail("client", "client task", f"crashed: {error!r}", None)
        await self.sample()
        self.final_metrics = await scrape(self.service.port)
        if self.nginx is not None:
            await asyncio.to_thread(self.nginx.stop)
            self.nginx_errors = self.nginx.errors()
        self.final = await self.idle_figures("final")
        say(f"after the churn: {self.describe(self.final)}")

    def verdict(self, cleanup: dict[str, Any]) -> dict[str, Any]:
        assert self.clients is not None
        a = self.args
        judging.attribute_failures(self.clients.failures, self.kills)
        checks = {
            "memory": judging.judge_memory(
                self.samples, self.final, self.churn_seconds, a.interval, a.workers,
                a.rss_growth_mib, a.rss_growth_pct,
            ),
            "fds": judging.judge_fds(self.samples, self.baseline, self.final, a.fd_margin),
            "metrics_dir": judging.judge_metrics_dir(self.samples, self.baseline, self.final, self.kills),
            "errors": judging.judge_errors(
                self.clients.failures, self.clients.service_5xx, self.clients.proxy_5xx, self.final_metrics
            ),
            "restarts": judging.judge_restarts(
                self.kills, a.kills, self.final_metrics, len(self.service.named("worker died, restarting"))
            ),
            "cleanup": cleanup,
        }  # fmt: skip
        if self.interrupted:
            checks["completed"] = {"passed": False, "why": "interrupted"}
        return checks
