"""What a broadcast and an idle WebSocket cost: the service before and after, against bare Tornado.

For each variant, one worker on 127.0.0.1 (its own process group), then, in order:

1. warm-up: 200 ticker sockets opened and closed (first-use allocations are not per socket);
2. the worker's CPU rate with no socket (housekeeping timers), over 2 s;
3. N ticker sockets opened by bench/ws_clients.py (a separate process, raw asyncio sockets
   that only read); after 2 s of settling, the worker's resident memory less what it was before
   the sockets opened, divided by N: **memory per idle socket**;
4. over `--seconds`, the worker's CPU time (user + system, /proc via psutil) less the idle rate,
   divided by the ticks that reached every socket (counted by the clients): **CPU per tick per
   1,000 sockets**. Also the clients' fan-out latency (receive time - tick `ts`, p50/p95).

Variants run in interleaved rounds (A B C, A B C) so that this shared machine's noise falls on
each alike; the median round is reported. Results: bench/results/broadcast.json and .md.

- `bare tornado`: bench/bare_app.py, Tornado's quick-start broadcast (`write_message` per socket);
- `service`: `python -m service`, as it is;
- `service, before`: the service with every saving below undone, which is what it was before
  the prepared tick frame and the per-socket memory work (`--serve` below).

`--explain` adds one variant per saving, the service with only that saving undone, to say what
each costs (bench/README.md has the table). Those undo the savings by patching the service's
own hooks in-process (`--serve UNDO,...`: see UNDO), so they follow the code they measure.

The service runs with WS_PING_INTERVAL=3600: pings exist (their memory counts) but none falls in
a measuring window. Every process started here is ended here (process groups, SIGTERM then SIGKILL).

    make bench      # or: .venv/bin/python bench/broadcast.py [--sockets 5000] [--explain]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PING = "3600"
SERVICE = [sys.executable, "-m", "service", "--address", "127.0.0.1", "--ws-ping-interval", PING]


def serve_with(undo: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--serve", undo, "--",
            "--address", "127.0.0.1", "--ws-ping-interval", PING]


# What each undo puts back (applied in the worker by `serve`, below).
UNDO = {
    "write_message": "tick fan-out through Tornado's write_message, per socket (encode, frame, task)",
    "stream_write": "prepared frame, but always through IOStream.write (a future per write)",
    "tornado_ping": "Tornado's ping task per socket (websocket_ping_interval) instead of one pinger",
    "keep_connection": "the handshake's HTTP/1.1 connection objects kept (request.connection ...)",
    "keep_ui": "the handler's template namespace (ui) kept",
    "keep_headers": "the 101 response's headers kept",
    "no_priming": "no attribute priming: handler attributes spill into a dict",
}
BEFORE = ",".join(UNDO.keys() - {"stream_write"})

VARIANTS: dict[str, list[str]] = {
    "bare tornado": [sys.executable, str(ROOT / "bench" / "bare_app.py")],
    "service": SERVICE,
    "service, before": serve_with(BEFORE),
}
EXPLAIN: dict[str, list[str]] = {f"service, undo {name}": serve_with(name) for name in UNDO}


# -- the service with savings undone (runs as the server process) -------------------------------
def serve(undo: set[str], argv: list[str]) -> int:
    """`python -m service argv`, with the savings named in `undo` put back (see UNDO)."""
    from service import config
    from service.telemetry import logs, metrics_dir

    unknown = undo - UNDO.keys()
    if unknown:
        raise SystemExit(f"unknown --serve names: {sorted(unknown)}")
    settings = config.load(argv)
    logs.configure(settings.log_level, settings.log_format)
    directory = metrics_dir.prepare()  # before anything imports prometheus-client
    from tornado.httputil import HTTPHeaders
    from tornado.iostream import StreamBufferFullError, StreamClosedError

    from service import app
    from service.handlers import sockets
    from service.process.supervisor import Supervisor
    from service.ws import pinger
    from service.ws.ticker import Tick

    if "write_message" in undo:
        sockets.TickerSocket.push_frame = sockets.TickerSocket.push_text  # type: ignore[method-assign]
    elif "stream_write" in undo:
        def push_frame(self: sockets.TickerSocket, tick: Tick) -> None:
            connection = self.ws_connection
            if connection is None or connection.stream is None or connection.is_closing():
                return
            try:
                connection.stream.write(tick.frame)
            except StreamClosedError:
                return
            except StreamBufferFullError:
                self._drop_slow_consumer()

        sockets.TickerSocket.push_frame = push_frame  # type: ignore[method-assign]
    if "tornado_ping" in undo:
        built = app.ServiceApp.__init__

        def init(self: app.ServiceApp, settings: Any, context: Any, **extra: Any) -> None:
            built(self, settings, context, **extra)
            if self.pinger is not None:
                self.pinger.stop()
            self.settings[pinger.SETTING] = None
            self.settings["websocket_ping_interval"] = settings.ws_ping_interval or None

        app.ServiceApp.__init__ = init  # type: ignore[method-assign]
    if undo & {"keep_connection", "keep_ui", "keep_headers"}:
        def release(self: sockets.TrackedSocket) -> None:
            if "keep_connection" not in undo:
                self.request.connection = None
                self.request.server_connection = None
            if "keep_ui" not in undo:
                self.ui = None  # type: ignore[assignment]
            if "keep_headers" not in undo:
                self._headers = HTTPHeaders()

        sockets.TrackedSocket._release_handshake = release  # type: ignore[method-assign]
    if "no_priming" in undo:
        sockets.LATE_ATTRIBUTES = ()  # type: ignore[assignment]
    try:
        return Supervisor(settings, directory).run()
    finally:
        directory.remove()


# -- the driver -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def end_group(proc: subprocess.Popen[Any], grace: float = 15.0) -> None:
    """SIGTERM to the process group `proc` leads, SIGKILL if it lingers; reaps `proc`."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # anything of the group still there (workers)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


@contextlib.contextmanager
def server(command: list[str], tick: float, log: Path, extra: tuple[str, ...] = ()
           ) -> Iterator[tuple[int, psutil.Process]]:
    """The variant on a free port with one worker; yields (port, the worker process)."""
    port = free_port()
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [*command, "--port", str(port), "--workers", "1", "--tick-interval", str(tick), *extra],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).read()
                children = psutil.Process(proc.pid).children()
                if len(children) == 1:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{command} did not start; see {log}")
            time.sleep(0.1)
        yield port, children[0]
    finally:
        end_group(proc)


class Clients:
    """bench/ws_clients.py holding `count` ticker sockets to `port`."""

    def __init__(self, port: int, count: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "ws_clients.py"), "--port", str(port),
             "--count", str(count)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True,
        )
        try:
            self.opened: dict[str, Any] = self._read(timeout=120)
        except BaseException:
            self.close()
            raise

    def _read(self, timeout: float) -> dict[str, Any]:
        """The clients' next line (one per request: nothing is ever left buffered), or an error."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"the WebSocket clients did not answer within {timeout} s")
        return dict(json.loads(line))

    def stats(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return self._read(timeout=30)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()  # the clients' cue to exit
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        end_group(self.proc, grace=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@contextlib.contextmanager
def clients(port: int, count: int) -> Iterator[Clients]:
    held = Clients(port, count)
    try:
        yield held
    finally:
        held.close()


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def measure(command: list[str], args: argparse.Namespace, log: Path) -> dict[str, Any]:
    service = PING in command  # the service caps connections per worker (MAX_CONNECTIONS): lift it
    cap = ("--max-connections", str(args.sockets + 1000)) if service else ()
    with server(command, args.tick, log, cap) as (port, worker):
        with clients(port, 200):  # warm-up
            time.sleep(0.5)
        time.sleep(1.0)
        started = cpu_seconds(worker)
        time.sleep(2.0)
        idle_rate = (cpu_seconds(worker) - started) / 2.0
        rss_before = worker.memory_info().rss
        with clients(port, args.sockets) as held:
            opened = int(held.opened["opened"])
            time.sleep(2.0)
            rss_after = worker.memory_info().rss
            first = held.stats()
            cpu_start, t_start = cpu_seconds(worker), time.monotonic()
            time.sleep(args.seconds)
            cpu_end, t_end = cpu_seconds(worker), time.monotonic()
            last = held.stats()
    ticks = (last["frames"] - first["frames"]) / max(1, opened)
    busy = (cpu_end - cpu_start) - idle_rate * (t_end - t_start)
    per_tick = busy / ticks if ticks else float("nan")
    return {
        "sockets": opened,
        "failed": int(held.opened["failed"]),
        "open_seconds": held.opened["seconds"],
        "memory_per_socket_kib": (rss_after - rss_before) / max(1, opened) / 1024,
        "rss_before_mib": rss_before / 2**20,
        "rss_after_mib": rss_after / 2**20,
        "idle_cpu_ms_per_s": idle_rate * 1000,
        "ticks": ticks,
        "cpu_ms_per_tick": per_tick * 1000,
        "cpu_ms_per_tick_per_1000_sockets": per_tick * 1000 / max(1, opened) * 1000,
        "latency_ms": last.get("latency_ms", {}),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sockets", type=int, default=5000)
    parser.add_argument("--tick", type=float, default=0.5, help="TICK_INTERVAL of every variant")
    parser.add_argument("--seconds", type=float, default=6.0, help="the CPU window")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--explain", action="store_true", help="also one variant per saving (one round)")
    parser.add_argument("--serve", metavar="UNDO", help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
        return serve(set(filter(None, args.serve.split(","))), rest)

    runs: dict[str, list[dict[str, Any]]] = {}
    plan: list[tuple[str, list[str]]] = [item for _ in range(args.rounds) for item in VARIANTS.items()]
    if args.explain:
        plan += list(EXPLAIN.items())
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-broadcast-") as tmp:
        for name, command in plan:
            log = Path(tmp) / (name.replace(" ", "-").replace(",", "") + ".log")
            result = measure(command, args, log)
            runs.setdefault(name, []).append(result)
            print(f"{name:34s} {result['memory_per_socket_kib']:6.1f} KiB/socket  "
                  f"{result['cpu_ms_per_tick_per_1000_sockets']:6.1f} ms CPU/tick/1000 sockets  "
                  f"({result['ticks']:.0f} ticks, {result['sockets']} sockets, {result['failed']} failed)",
                  flush=True)

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    keys = ("memory_per_socket_kib", "cpu_ms_per_tick_per_1000_sockets", "cpu_ms_per_tick", "ticks")
    summary = {name: {key: median(name, key) for key in keys} for name in runs}
    for name in runs:
        summary[name]["latency_p95_ms"] = statistics.median(
            r["latency_ms"].get("p95", float("nan")) for r in runs[name])
        summary[name]["failed"] = sum(r["failed"] for r in runs[name])
    service, before, bare = summary["service"], summary["service, before"], summary["bare tornado"]
    ratios = {
        "cpu_per_tick_service_vs_before": service["cpu_ms_per_tick_per_1000_sockets"]
        / before["cpu_ms_per_tick_per_1000_sockets"],
        "cpu_per_tick_service_vs_bare": service["cpu_ms_per_tick_per_1000_sockets"]
        / bare["cpu_ms_per_tick_per_1000_sockets"],
        "memory_service_vs_bare": service["memory_per_socket_kib"] / bare["memory_per_socket_kib"],
    }
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    settings = {k: v for k, v in vars(args).items() if k not in ("serve", "rest")}
    record = {"when": stamp, "settings": settings, "cpus": os.cpu_count(), "ws_ping_interval": PING,
              "seconds_taken": round(time.monotonic() - started, 1), "undo": UNDO, "before": BEFORE,
              "runs": runs, "summary": summary, "ratios": ratios}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "broadcast.json").write_text(json.dumps(record, indent=2) + "\n")

    def row(name: str) -> str:
        s = summary[name]
        cpu, memory = s["cpu_ms_per_tick_per_1000_sockets"], s["memory_per_socket_kib"]
        return f"| {name} | {cpu:.1f} | {memory:.1f} | {s['latency_p95_ms']:.0f} | {s['ticks']:.0f} |"

    lines = [
        f"# Broadcast and socket cost, {stamp}",
        "",
        f"`bench/broadcast.py`: one worker, {args.sockets} ticker sockets from one client process "
        f"(bench/ws_clients.py), TICK_INTERVAL {args.tick} s, CPU over {args.seconds} s, "
        f"{args.rounds} interleaved rounds (median shown); {os.cpu_count()} CPUs shared by server and "
        f"clients, loopback. CPU: the worker's user + system time, less its idle rate, per tick that "
        f"reached every socket. Memory: the worker's RSS with the sockets open less before, per socket.",
        "",
        "| variant | CPU ms per tick per 1,000 sockets | KiB per idle socket | fan-out p95 ms (clients) "
        "| ticks measured |",
        "| --- | ---: | ---: | ---: | ---: |",
        *(row(name) for name in VARIANTS),
        "",
        f"Service vs before: CPU per tick {ratios['cpu_per_tick_service_vs_before']:.2f}x. "
        f"Service vs bare Tornado: CPU per tick {ratios['cpu_per_tick_service_vs_bare']:.2f}x, "
        f"memory per socket {ratios['memory_service_vs_bare']:.2f}x.",
        "",
    ]
    if args.explain:
        lines += [
            "What each saving is worth: the service with that one saving undone (one run each), "
            "less the service.",
            "",
            "| undone | what | CPU ms per tick per 1,000 sockets (delta) | KiB per socket (delta) |",
            "| --- | --- | ---: | ---: |",
        ]
        for undo, what in UNDO.items():
            s = summary[f"service, undo {undo}"]
            cpu, memory = s["cpu_ms_per_tick_per_1000_sockets"], s["memory_per_socket_kib"]
            lines.append(
                f"| {undo} | {what} | {cpu:.1f} ({cpu - service['cpu_ms_per_tick_per_1000_sockets']:+.1f})"
                f" | {memory:.1f} ({memory - service['memory_per_socket_kib']:+.2f}) |"
            )
        lines.append("")
    (RESULTS / "broadcast.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
