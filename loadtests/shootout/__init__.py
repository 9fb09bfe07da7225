"""The shootouts of issue 10: this service against its peers, side by side, in one run, on this machine.

Broadcast: every contestant fans a tick out to every connected `/ws/ticker` client each
TICK_INTERVAL. For each step of the client count (1000, 2000, 4000, ...) every contestant still in
the race is started fresh on a free loopback port, `loadtests/k6/websockets.js` opens the clients
at RATE per second and holds them D seconds, and the step passes when the p95 of the tick's
delivery latency (receive time - the tick's server timestamp; by default `tick_latency_held`, the
ticks received once every client is open, not those of the connect ramp) stays under 500 ms with no failed
connection, no unexpected close and every client opened. A contestant's score is its largest
passing client count; after its first failing step it is out (`--keep-going` runs every step).
Steps are interleaved (step 1 for everyone, then step 2, ...) so that the machine's noise falls on
every contestant alike. More than `--sockets-per-k6` clients are spread over several k6
processes, each from its own loopback source address (`--local-ips`), to stay under the
20,000-open-files and ~28,000-ephemeral-ports limits of one process and one address pair.

HTTP: the same worker count for every contestant, wrk on `/api/hello` in interleaved rounds
(requests/s as a ratio to this service, and p99), then C concurrent `/api/sleep?ms=S` (where
sync workers collapse: each serves one request at a time).

Everything listens on 127.0.0.1 and the load generators run on the same machine (2 shared
cores): figures are for comparing contestants within one run, not absolute capacities.
Output: loadtests/reports/shootout-<UTC timestamp>/ with results.json, results.md, PNG charts
and every k6/wrk/server log. Bounded: per-step timeouts and an overall `--budget`.

    python -m loadtests.shootout                                 # both shootouts, default settings
    python -m loadtests.shootout --no-http --steps 1000,2000,4000
    python -m loadtests.shootout --no-broadcast --http-workers 2
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent.parent
PEERS = ROOT / "loadtests" / "peers"
REPORTS = ROOT / "loadtests" / "reports"
K6_SCRIPT = ROOT / "loadtests" / "k6" / "websockets.js"
HOST = "127.0.0.1"
SERVICE = "service"


# -- contestants ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Peer:
    """One server: how to start it, what it is, what it can be measured on."""

    name: str
    label: str
    command: Callable[[int, int, float], list[str]]  # (port, workers, tick interval) -> argv
    version: Callable[[], str]
    broadcast: bool = True
    http: bool = True
    prefork: bool = True  # honours a worker count (else one process, whatever is asked)
    needs: tuple[str, ...] = ()  # files that must exist (Node packages), relative to ROOT


def _pkg(*names: str) -> Callable[[], str]:
    def version() -> str:
        parts = []
        for name in names:
            try:
                parts.append(f"{name} {importlib.metadata.version(name)}")
            except importlib.metadata.PackageNotFoundError:
                parts.append(f"{name} (not installed)")
        return ", ".join(parts)

    return version


def _npm(package: str) -> Callable[[], str]:
    def version() -> str:
        try:
            meta = json.loads((PEERS / "node_modules" / package / "package.json").read_text())
            found = f"{package} {meta['version']}"
        except OSError:
            found = f"{package} (not installed)"
        node = shutil.which("node")
        if node is None:
            return f"{found}, node (not installed)"
        out = subprocess.run([node, "--version"], capture_output=True, text=True, check=False).stdout
        return f"{found}, node {out.strip()}"

    return version


def _service_version() -> str:
    from service import __version__

    return f"tornado-prefork-service {__version__}, {_pkg('tornado', 'uvloop')()}"


def _gunicorn(worker_class: str | None, module: str) -> Callable[[int, int, float], list[str]]:
    def command(port: int, workers: int, _tick: float) -> list[str]:
        return [
            sys.executable,
            "-m",
            "gunicorn",
            "--chdir",
            str(PEERS),
            "--bind",
            f"{HOST}:{port}",
            "--workers",
            str(workers),
            *(["--worker-class", worker_class] if worker_class else []),
            "--backlog",
            "2048",
            "--no-control-socket",
            "--log-level",
            "warning",
            module,
        ]

    return command


PEER_LIST = [
    Peer(
        SERVICE,
        "this service",
        lambda port, workers, tick: [
            sys.executable,
            "-m",
            "service",
            "--address",
            HOST,
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--tick-interval",
            str(tick),
            "--no-access-log",
            "--log-level",
            "warning",
            "--max-connections",
            "19000",  # the 20,000 open files of a process, less headroom
        ],
        _service_version,
    ),
    Peer(
        "tornado",
        "bare Tornado",
        lambda port, workers, tick: [
            sys.executable,
            str(ROOT / "bench" / "bare_app.py"),
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--tick-interval",
            str(tick),
        ],
        _pkg("tornado", "uvloop"),
    ),
    Peer(
        "aiohttp",
        "aiohttp (gunicorn, uvloop worker)",
        _gunicorn("aiohttp.GunicornUVLoopWebWorker", "aiohttp_app:app"),
        _pkg("aiohttp", "gunicorn", "uvloop"),
    ),
    Peer(
        "websockets",
        "Python websockets",
        lambda port, workers, tick: [sys.executable, str(PEERS / "websockets_app.py")],
        _pkg("websockets", "uvloop"),
        http=False,
        prefork=False,
    ),
    Peer(
        "node-ws",
        "Node ws",
        lambda port, workers, tick: ["node", str(PEERS / "ws_app.js")],
        _npm("ws"),
        http=False,
        prefork=False,
        needs=("loadtests/peers/node_modules/ws",),
    ),
    Peer(
        "uws",
        "uWebSockets.js",
        lambda port, workers, tick: ["node", str(PEERS / "uws_app.js")],
        _npm("@trufflesuite/uws-js-unofficial"),
        http=False,
        prefork=False,
        needs=("loadtests/peers/node_modules/@trufflesuite/uws-js-unofficial",),
    ),
    Peer(
        "fastapi",
        "FastAPI (gunicorn, uvicorn workers)",
        _gunicorn("uvicorn_worker.UvicornWorker", "fastapi_app:app"),
        _pkg("fastapi", "uvicorn", "uvicorn-worker", "gunicorn", "uvloop", "httptools"),
        broadcast=False,
    ),
    Peer(
        "flask",
        "Flask (gunicorn, sync workers)",
        _gunicorn(None, "flask_app:app"),
        _pkg("flask", "gunicorn"),
        broadcast=False,
    ),
]
PEERS_BY_NAME = {peer.name: peer for peer in PEER_LIST}
DEFAULT_BROADCAST = "service:1,service:2,tornado,aiohttp,websockets,node-ws,uws"
DEFAULT_HTTP = "service,tornado,aiohttp,fastapi,flask"


@dataclass(frozen=True)
class Contestant:
    peer: Peer
    workers: int

    @property
    def key(self) -> str:
        return f"{self.peer.name}:{self.workers}" if self.peer.prefork else self.peer.name

    @property
    def label(self) -> str:
        if not self.peer.prefork:
            return self.peer.label
        return f"{self.peer.label}, {self.workers} worker{'s' if self.workers > 1 else ''}"


def parse_contestants(spec: str, kind: str, default_workers: int) -> list[Contestant]:
    """`service:1,service:2,aiohttp` -> contestants; `:N` is the worker count."""
    found = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, workers = item.partition(":")
        peer = PEERS_BY_NAME.get(name)
        if peer is None or not getattr(peer, kind):
            choices = ", ".join(p.name for p in PEER_LIST if getattr(p, kind))
            raise argparse.ArgumentTypeError(f"unknown {kind} contestant {name!r} (choose from {choices})")
        found.append(Contestant(peer, int(workers) if workers else default_workers))
    keys = [c.key for c in found]
    if len(set(keys)) != len(keys):
        raise argparse.ArgumentTypeError(f"a {kind} contestant is named twice: {spec}")
    return found


# -- processes -----------------------------------------------------------------------------------
LIVE: set[subprocess.Popen[bytes]] = set()  # every process group started and not yet reaped


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    LIVE.add(proc)
    return proc


def stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM to the whole process group, SIGKILL after the grace; always reaped."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace)
    # Forked workers can outlive their parent (Tornado's do): the group goes, whatever is left.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 5  # and wait until they are reaped: the next step starts clean
    with contextlib.suppress(ProcessLookupError):
        while time.monotonic() < deadline:
            os.killpg(proc.pid, 0)
            time.sleep(0.05)
    LIVE.discard(proc)


def stop_all() -> None:
    for proc in list(LIVE):
        stop(proc, grace=3.0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class NotReady(RuntimeError):
    pass


def tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


@contextlib.contextmanager
def serving(contestant: Contestant, tick: float, log: Path, timeout: float = 30.0) -> Iterator[Server]:
    missing = [need for need in contestant.peer.needs if not (ROOT / need).exists()]
    if missing:
        raise NotReady(
            f"not installed: {', '.join(missing)} (make shootout installs loadtests/peers/node_modules)"
        )
    port = free_port()
    env = {
        "HOST": HOST,
        "PORT": str(port),
        "WORKERS": str(contestant.workers),
        "TICK_INTERVAL": str(tick),
        "PYTHONUNBUFFERED": "1",
    }
    proc = spawn(contestant.peer.command(port, contestant.workers, tick), log, env)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://{HOST}:{port}/api/hello", timeout=2) as answer:
                    answer.read()
                break
            except OSError:
                if proc.poll() is not None:
                    raise NotReady(f"exited with {proc.returncode}: {tail(log)}") from None
                if time.monotonic() > deadline:
                    raise NotReady(f"not answering /api/hello after {timeout:.0f} s: {tail(log)}") from None
                time.sleep(0.1)
        yield Server(proc, port)
    finally:
        stop(proc)


@dataclass
class Server:
    """A started contestant, and its processes' memory and CPU as sampled during a step."""

    proc: subprocess.Popen[bytes]
    port: int
    cpu_seen: dict[int, float] = field(default_factory=dict)
    rss_peak: int = 0
    rss_idle: int = 0
    cpu_idle: float = 0.0

    def _tree(self) -> list[Any]:
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def sample(self) -> tuple[int, float]:
        """(RSS of every process of the contestant, CPU seconds they have used so far)."""
        rss = 0
        for process in self._tree():
            with contextlib.suppress(psutil.Error), process.oneshot():
                rss += process.memory_info().rss
                times = process.cpu_times()
                self.cpu_seen[process.pid] = max(
                    self.cpu_seen.get(process.pid, 0.0), times.user + times.system
                )
        self.rss_peak = max(self.rss_peak, rss)
        return rss, sum(self.cpu_seen.values())

    def baseline(self) -> None:
        self.rss_idle, self.cpu_idle = self.sample()
        self.rss_peak = self.rss_idle


# -- broadcast -----------------------------------------------------------------------------------
def k6_binary() -> str | None:
    return shutil.which("k6") or shutil.which("k6", path=str(Path(sys.executable).parent))


def split_clients(total: int, per_process: int) -> list[int]:
    processes = max(1, math.ceil(total / per_process))
    return [total // processes + (1 if i < total % processes else 0) for i in range(processes)]


def _metric(summary: dict[str, Any], name: str, key: str = "count") -> float:
    value = summary.get("metrics", {}).get(name, {}).get(key)
    return float(value) if isinstance(value, int | float) else 0.0


def merge_k6(
    clients: int, summaries: list[dict[str, Any]], limit_ms: float, latency: str = "tick_latency"
) -> dict[str, Any]:
    """One step's figures from every k6 process's summary export. The p95 of the step is the
    highest p95 of its k6 processes (their clients are alike, so they differ little)."""
    trends = [s.get("metrics", {}).get(latency, {}) for s in summaries]
    p95s = [float(t["p(95)"]) for t in trends if isinstance(t.get("p(95)"), int | float)]
    meds = [float(t["med"]) for t in trends if isinstance(t.get("med"), int | float)]
    maxes = [float(t["max"]) for t in trends if isinstance(t.get("max"), int | float)]
    opened = int(sum(_metric(s, "ws_sockets_opened") for s in summaries))
    connect_failures = int(sum(_metric(s, "ws_connect_failures") for s in summaries))
    unexpected = int(sum(_metric(s, "ws_unexpected_closes") for s in summaries))
    ticks = int(sum(_metric(s, "ticks_received") for s in summaries))
    codes: dict[str, int] = {}
    for summary in summaries:
        for name, values in summary.get("metrics", {}).items():
            match = re.fullmatch(r"ws_unexpected_closes\{code:(\w+)\}", name)
            if match and values.get("count"):
                codes[match.group(1)] = codes.get(match.group(1), 0) + int(values["count"])
    failures = connect_failures + unexpected + max(0, clients - opened)
    p95 = max(p95s) if p95s else None
    return {
        "clients": clients,
        "opened": opened,
        "connect_failures": connect_failures,
        "unexpected_closes": unexpected,
        "unexpected_close_codes": codes,
        "failures": failures,
        "ticks_received": ticks,
        "ticks_missed": int(sum(_metric(s, "ticks_missed") for s in summaries)),
        "p50_ms": max(meds) if meds else None,
        "p95_ms": p95,
        "max_ms": max(maxes) if maxes else None,
        "p95_ms_per_k6": p95s,
        "passed": failures == 0 and ticks > 0 and p95 is not None and p95 < limit_ms,
    }


def run_step(
    contestant: Contestant, clients: int, args: argparse.Namespace, out: Path, k6: str
) -> dict[str, Any]:
    slug = re.sub(r"\W+", "-", contestant.key)
    logs = out / "logs"
    result: dict[str, Any] = {"clients": clients, "passed": False}
    try:
        with serving(contestant, args.tick_interval, logs / f"{slug}-{clients}-server.log") as server:
            time.sleep(args.tick_interval)  # one tick with nobody listening: the loop is up
            server.baseline()
            shares = split_clients(clients, args.sockets_per_k6)
            procs, exports = [], []
            for index, share in enumerate(shares):
                export = out / "raw" / f"{slug}-{clients}-k6-{index}.json"
                export.parent.mkdir(parents=True, exist_ok=True)
                export.unlink(missing_ok=True)
                argv = [
                    k6,
                    "run",
                    "--quiet",
                    "--no-color",
                    "--address",
                    "",
                    "--no-usage-report",
                    "--summary-export",
                    str(export),
                    str(args.k6_script),
                ]
                if args.local_ips:
                    argv[2:2] = ["--local-ips", f"127.0.0.{index + 1}"]
                env = {
                    "BASE_URL": f"http://{HOST}:{server.port}",
                    "WS_PATH": "/ws/ticker",
                    "N": str(share),
                    "D": str(args.hold),
                    "RATE": f"{args.rate * share / clients:.3f}",
                    "VUS": str(max(1, math.ceil(share / args.sockets_per_vu))),
                    "K6_NO_USAGE_REPORT": "true",
                }
                procs.append(spawn(argv, logs / f"{slug}-{clients}-k6-{index}.log", env))
                exports.append(export)
            started = time.monotonic()
            deadline = started + clients / args.rate + args.hold + 90
            k6_cpu: dict[int, float] = {}
            while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                server.sample()
                for proc in procs:  # the load generator's own CPU: is it the bottleneck?
                    with contextlib.suppress(psutil.Error):
                        times = psutil.Process(proc.pid).cpu_times()
                        k6_cpu[proc.pid] = times.user + times.system
                time.sleep(1.0)
            elapsed = time.monotonic() - started
            timed_out = any(p.poll() is None for p in procs)
            for proc in procs:
                stop(proc, grace=5.0)
            _, cpu = server.sample()
            summaries = []
            for export in exports:
                with contextlib.suppress(OSError, ValueError):
                    summaries.append(json.loads(export.read_text()))
            result = merge_k6(clients, summaries, args.p95_limit_ms, args.latency_metric)
            result.update(
                {
                    "k6_processes": len(shares),
                    "seconds": round(elapsed, 1),
                    "rss_mb_idle": round(server.rss_idle / 2**20, 1),
                    "rss_mb_peak": round(server.rss_peak / 2**20, 1),
                    "rss_kib_per_client": round((server.rss_peak - server.rss_idle) / 1024 / clients, 1),
                    "cpu_percent": round(100 * (cpu - server.cpu_idle) / elapsed, 1) if elapsed else None,
                    "k6_cpu_percent": round(100 * sum(k6_cpu.values()) / elapsed, 1) if elapsed else None,
                }
            )
            errors = []
            if timed_out:
                errors.append("k6 did not finish in time")
            # 99: a threshold of the script failed (counted here from the figures); else k6 itself failed
            errors += [
                f"k6 exited {p.returncode}" for p in procs if p.returncode not in (0, 99, -signal.SIGTERM)
            ]
            if len(summaries) < len(exports):
                errors.append("k6 wrote no summary")
            if server.proc.poll() is not None:
                errors.append(f"server exited with {server.proc.returncode}")
            if errors:
                result["error"] = "; ".join(errors)
                result["passed"] = False
    except NotReady as exc:
        result["error"] = str(exc)
    return result


def why_failed(step: dict[str, Any], limit_ms: float) -> str:
    if step.get("error"):
        return str(step["error"])
    reasons = []
    if step.get("p95_ms") is None:
        reasons.append("no tick received")
    elif step["p95_ms"] >= limit_ms:
        reasons.append(f"p95 {step['p95_ms']:.0f} ms")
    if step.get("connect_failures"):
        reasons.append(f"{step['connect_failures']} failed connections")
    if step.get("unexpected_closes"):
        reasons.append(f"{step['unexpected_closes']} unexpected closes")
    missing = step["clients"] - step.get("opened", 0) - step.get("connect_failures", 0)
    if missing > 0:
        reasons.append(f"{missing} never opened")
    return ", ".join(reasons) or "failed"


def broadcast_shootout(
    contestants: list[Contestant], args: argparse.Namespace, out: Path, deadline: float
) -> dict[str, Any]:
    k6 = k6_binary()
    if k6 is None:
        raise SystemExit("k6 is not installed (make shootout installs it)")
    if not Path(args.k6_script).exists():
        raise SystemExit(f"{args.k6_script} is missing")
    results: dict[str, dict[str, Any]] = {
        c.key: {
            "label": c.label,
            "peer": c.peer.name,
            "workers": c.workers if c.peer.prefork else 1,
            "version": c.peer.version(),
            "steps": [],
            "score": 0,
            "stopped_by": None,
        }
        for c in contestants
    }
    racing = list(contestants)
    for clients in args.steps:
        for contestant in list(racing):
            record = results[contestant.key]
            expected = clients / args.rate + args.hold + 15
            if time.monotonic() + expected > deadline:
                record["stopped_by"] = record["stopped_by"] or f"time budget, before {clients} clients"
                racing.remove(contestant)
                continue
            print(f"broadcast  {contestant.label:40s} {clients:6d} clients ...", end=" ", flush=True)
            step = run_step(contestant, clients, args, out, k6)
            record["steps"].append(step)
            p95 = step.get("p95_ms")
            print(
                f"p95 {'-' if p95 is None else f'{p95:.0f} ms'}, failures {step.get('failures', '-')}"
                f"{'' if step['passed'] else ' -> ' + why_failed(step, args.p95_limit_ms)}",
                flush=True,
            )
            if step["passed"]:
                if not record["stopped_by"]:
                    record["score"] = clients
            else:
                record["stopped_by"] = (
                    record["stopped_by"] or f"{clients} clients: {why_failed(step, args.p95_limit_ms)}"
                )
                if not args.keep_going:
                    racing.remove(contestant)
            time.sleep(args.settle)
    for record in results.values():
        if record["stopped_by"] is None:
            record["stopped_by"] = "passed every step (the run's largest step)"
            record["capped"] = True
    return results


# -- HTTP ----------------------------------------------------------------------------------------
def _seconds(value: str, unit: str) -> float:
    return float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[unit]


def parse_wrk(text: str) -> dict[str, float]:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    p99 = re.search(r"^\s*99%\s+([\d.]+)(us|ms|s|m)\b", text, re.MULTILINE)
    requests = re.search(r"(\d+) requests in", text)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    connect, read, write, timeouts = (int(n) for n in sockets.groups()) if sockets else (0, 0, 0, 0)
    return {
        "rps": float(rps.group(1)) if rps else 0.0,
        "p99_ms": _seconds(*p99.groups()) * 1000 if p99 else float("nan"),
        "requests": float(requests.group(1)) if requests else 0.0,
        "non_2xx": float(non_2xx.group(1)) if non_2xx else 0.0,
        "socket_errors": float(connect + read + write),
        "timeouts": float(timeouts),
    }


def wrk(url: str, seconds: float, connections: int, args: argparse.Namespace, log: Path) -> dict[str, float]:
    argv = [
        "wrk",
        f"-t{args.wrk_threads}",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        f"{args.wrk_timeout}s",
        "--latency",
        url,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=seconds + 60)
    with log.open("a") as out:
        out.write(f"$ {' '.join(argv)}\n{done.stdout}{done.stderr}\n")
    if done.returncode != 0:
        raise RuntimeError(f"wrk exited {done.returncode}: {done.stderr.strip()}")
    return parse_wrk(done.stdout)


def http_shootout(
    contestants: list[Contestant], args: argparse.Namespace, out: Path, deadline: float
) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (make shootout installs it)")
    tests = {
        "hello": ("/api/hello", args.http_connections),
        "sleep": (f"/api/sleep?ms={args.sleep_ms}", args.sleep_concurrency),
    }
    results: dict[str, dict[str, Any]] = {
        c.key: {
            "label": c.label,
            "peer": c.peer.name,
            "workers": c.workers,
            "version": c.peer.version(),
            "rounds": {name: [] for name in tests},
            "errors": [],
        }
        for c in contestants
    }
    logs = out / "logs"
    for round_no in range(1, args.http_rounds + 1):
        per_round = len(tests) * args.http_seconds + 2 + 10
        if time.monotonic() + per_round * len(contestants) > deadline:
            print(f"http       time budget reached before round {round_no}", flush=True)
            break
        for contestant in contestants:
            record = results[contestant.key]
            slug = re.sub(r"\W+", "-", contestant.key)
            log = logs / f"http-{slug}-wrk.log"
            try:
                with serving(contestant, args.tick_interval, logs / f"http-{slug}-server.log") as server:
                    base = f"http://{HOST}:{server.port}"
                    wrk(base + tests["hello"][0], 2, args.http_connections, args, log)  # warm-up
                    for name, (path, connections) in tests.items():
                        figures = wrk(base + path, args.http_seconds, connections, args, log)
                        record["rounds"][name].append(figures)
                        print(
                            f"http round {round_no} {contestant.label:40s} {name:5s} "
                            f"{figures['rps']:9.0f} req/s  p99 {figures['p99_ms']:8.1f} ms  "
                            f"timeouts {figures['timeouts']:.0f}"
                            f"  errors {figures['socket_errors'] + figures['non_2xx']:.0f}",
                            flush=True,
                        )
            except (NotReady, RuntimeError, subprocess.TimeoutExpired) as exc:
                record["errors"].append(f"round {round_no}: {exc}")
                print(f"http round {round_no} {contestant.label:40s} failed: {exc}", flush=True)
            time.sleep(args.settle)
    for record in results.values():
        for name in tests:
            rounds = record["rounds"][name]
            record[name] = {
                "rps": statistics.median(r["rps"] for r in rounds) if rounds else None,
                "p99_ms": statistics.median(r["p99_ms"] for r in rounds) if rounds else None,
                "errors": sum(r["socket_errors"] + r["non_2xx"] for r in rounds),
                "timeouts": sum(r["timeouts"] for r in rounds),
            }
    reference = results.get(next((c.key for c in contestants if c.peer.name == SERVICE), contestants[0].key))
    for record in results.values():
        for name in tests:
            base = (reference or {}).get(name, {}).get("rps")
            mine = record[name]["rps"]
            record[name]["ratio"] = mine / base if base and mine is not None else None
    return results


# -- report --------------------------------------------------------------------------------------
def _fmt(value: float | None, digits: int = 0) -> str:
    return (
        "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:,.{digits}f}"
    )


def write_markdown(record: dict[str, Any], out: Path) -> None:
    s = record["settings"]
    lines = [
        f"# Shootout, {record['when']}",
        "",
        f"`{record['command']}`",
        "",
        f"One machine: {record['machine']['cpus']} CPUs ({record['machine']['cpu_model']}), "
        f"{record['machine']['kernel']}, shared by the contestant and the load generator (k6, wrk): "
        "everything on 127.0.0.1. Figures compare contestants within this run; they are not the "
        "capacity of a dedicated server.",
        "",
    ]
    broadcast = record.get("broadcast")
    if broadcast:
        steps = s["steps"]
        lines += [
            f"## Broadcast: most clients with tick p95 under {s['p95_limit_ms']:.0f} ms",
            "",
            f"Each step: the contestant started fresh, `loadtests/k6/websockets.js` opening the clients at "
            f"{s['rate']:.0f}/s and holding them {s['hold']} s after the last opened ("
            + (
                "latency counted over the hold only: `tick_latency_held`, ticks received from 2 s after "
                "the last client was due to open"
                if s.get("latency_metric", "tick_latency_held") == "tick_latency_held"
                else f"latency: `{s.get('latency_metric')}`"
                + (
                    ", counted over the whole run, connect ramp included"
                    if s.get("latency_metric") == "tick_latency"
                    else ""
                )
            )
            + f"), one tick every {s['tick_interval']} s; a step passes with p95 < "
            f"{s['p95_limit_ms']:.0f} ms, every client opened, no failed connection and no unexpected close. "
            f"Up to {s['sockets_per_k6']} clients per k6 process (one loopback source address each). "
            "Steps interleaved across contestants; "
            + (
                "every contestant ran every step."
                if s["keep_going"]
                else "a contestant stops at its first failing step."
            ),
            "",
            "| contestant | score (clients) | stopped by | "
            + " | ".join(f"p95 ms @ {n}" for n in steps)
            + " |",
            "| --- | ---: | --- | " + " | ".join("---:" for _ in steps) + " |",
        ]
        for result in broadcast.values():
            by_clients = {step["clients"]: step for step in result["steps"]}
            cells = []
            for n in steps:
                step = by_clients.get(n)
                if step is None:
                    cells.append("")
                elif step.get("p95_ms") is None:
                    cells.append("failed")
                else:
                    cells.append(_fmt(step["p95_ms"]) + ("" if step["passed"] else " ✗"))
            score = f"{result['score']:,}" + (" (≥, cap)" if result.get("capped") else "")
            lines.append(
                f"| {result['label']} | {score} | {result['stopped_by']} | " + " | ".join(cells) + " |"
            )
        lines += [
            "",
            "| contestant | clients | opened | failed conn. | unexpected closes | p50 ms | p95 ms | max ms "
            "| RSS MB peak | KiB / client | CPU % | k6 CPU % | k6 procs |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for result in broadcast.values():
            for step in result["steps"]:
                lines.append(
                    f"| {result['label']} | {step['clients']:,} | {_fmt(step.get('opened'))} "
                    f"| {_fmt(step.get('connect_failures'))} | {_fmt(step.get('unexpected_closes'))} "
                    f"| {_fmt(step.get('p50_ms'))} | {_fmt(step.get('p95_ms'))} | {_fmt(step.get('max_ms'))} "
                    f"| {_fmt(step.get('rss_mb_peak'), 1)} | {_fmt(step.get('rss_kib_per_client'), 1)} "
                    f"| {_fmt(step.get('cpu_percent'))} | {_fmt(step.get('k6_cpu_percent'))} "
                    f"| {_fmt(step.get('k6_processes'))} |"
                )
        lines += [
            "",
            "Versions: " + "; ".join(f"{r['label']}: {r['version']}" for r in broadcast.values()),
            "",
        ]
        lines += ["![p95 tick latency vs clients](broadcast-latency.png)", ""]
    http = record.get("http")
    if http:
        lines += [
            f"## HTTP, {s['http_workers']} worker(s) each",
            "",
            f"wrk -t{s['wrk_threads']}, {s['http_rounds']} interleaved rounds of {s['http_seconds']} s, "
            f"median round. `GET /api/hello` with {s['http_connections']} connections; "
            f"`GET /api/sleep?ms={s['sleep_ms']}` with {s['sleep_concurrency']} concurrent connections "
            f"(non-blocking: about {s['sleep_concurrency'] * 1000 / s['sleep_ms']:.0f} req/s is the ceiling; "
            f"a sync worker serves 1000 / {s['sleep_ms']} req/s), wrk timeout {s['wrk_timeout']} s.",
            "",
            "| contestant | hello req/s | vs this service | hello p99 ms | sleep req/s | vs this service "
            "| sleep p99 ms | sleep timeouts | errors |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for result in http.values():
            hello, sleep = result["hello"], result["sleep"]
            errors = _fmt(hello["errors"] + sleep["errors"])
            if result["errors"]:
                errors += " (" + "; ".join(result["errors"]) + ")"
            lines.append(
                f"| {result['label']} | {_fmt(hello['rps'])} | {_fmt(hello['ratio'], 2)} "
                f"| {_fmt(hello['p99_ms'], 1)} | {_fmt(sleep['rps'])} | {_fmt(sleep['ratio'], 2)} "
                f"| {_fmt(sleep['p99_ms'], 1)} | {_fmt(sleep['timeouts'])} | {errors} |"
            )
        lines += ["", "Versions: " + "; ".join(f"{r['label']}: {r['version']}" for r in http.values()), ""]
        lines += ["![requests/s](http.png)", ""]
    (out / "results.md").write_text("\n".join(lines))


def write_charts(record: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    written = []
    s = record["settings"]
    broadcast = record.get("broadcast")
    if broadcast:
        fig, (ax, mem) = plt.subplots(1, 2, figsize=(13, 5))
        for result in broadcast.values():
            steps = [st for st in result["steps"] if st.get("p95_ms") is not None]
            if not steps:
                continue
            xs = [st["clients"] for st in steps]
            (line,) = ax.plot(xs, [st["p95_ms"] for st in steps], marker="o", label=result["label"])
            bad = [st for st in steps if not st["passed"]]
            ax.scatter(
                [st["clients"] for st in bad],
                [st["p95_ms"] for st in bad],
                marker="x",
                s=90,
                color=line.get_color(),
                zorder=3,
            )
            mem_steps = [st for st in steps if st.get("rss_kib_per_client") is not None]
            mem.plot(
                [st["clients"] for st in mem_steps],
                [st["rss_mb_peak"] for st in mem_steps],
                marker="o",
                label=result["label"],
            )
        ax.axhline(
            s["p95_limit_ms"], color="red", linestyle="--", linewidth=1, label=f"{s['p95_limit_ms']:.0f} ms"
        )
        for axis in (ax, mem):
            axis.set_xscale("log", base=2)
            axis.set_xticks(s["steps"], [f"{n:,}" for n in s["steps"]], fontsize=8)
            axis.xaxis.set_minor_locator(NullLocator())
        ax.set_yscale("log")
        ax.set_xlabel("connected clients")
        ax.set_ylabel("tick delivery latency p95 (ms)")
        ax.set_title("Broadcast: p95 latency vs clients (x: step failed)")
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        mem.set_xlabel("connected clients")
        mem.set_ylabel("contestant RSS, all processes (MB)")
        mem.set_title("Broadcast: memory")
        mem.legend(fontsize=8)
        mem.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "broadcast-latency.png", dpi=100)
        plt.close(fig)
        written.append("broadcast-latency.png")
    http = record.get("http")
    if http:
        fig, axes = plt.subplots(1, 2, figsize=(13, 5))
        labels = [r["label"] for r in http.values()]
        for ax, name, title in (
            (axes[0], "hello", "GET /api/hello"),
            (axes[1], "sleep", f"GET /api/sleep?ms={s['sleep_ms']} x {s['sleep_concurrency']}"),
        ):
            values = [r[name]["rps"] or 0.0 for r in http.values()]
            bars = ax.bar(range(len(values)), values, color="tab:blue")
            for bar, result in zip(bars, http.values(), strict=True):
                p99 = result[name]["p99_ms"]
                ax.annotate(
                    f"{_fmt(result[name]['rps'])}/s\np99 {_fmt(p99, 1)} ms",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
            ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
            ax.set_ylim(0, max([*values, 1.0]) * 1.18)  # room for the labels
            ax.set_ylabel("requests/s (median round)")
            ax.set_title(f"{title}, {s['http_workers']} worker(s) each")
            ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "http.png", dpi=100)
        plt.close(fig)
        written.append("http.png")
    return written


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "load_generator": "same machine (k6, wrk)",
    }


# -- command line --------------------------------------------------------------------------------
def _ints(text: str) -> list[int]:
    values = sorted({int(part) for part in text.split(",") if part.strip()})
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.shootout",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, help="report folder [loadtests/reports/shootout-<timestamp>]")
    parser.add_argument("--budget", type=float, default=90, help="minutes for the whole run [90]")
    parser.add_argument("--tick-interval", type=float, default=1.0, help="seconds between ticks [1.0]")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds of rest between measurements [2]")
    group = parser.add_argument_group("broadcast")
    group.add_argument("--no-broadcast", dest="broadcast", action="store_false")
    group.add_argument(
        "--contestants", default=DEFAULT_BROADCAST, help=f"name[:workers],... [{DEFAULT_BROADCAST}]"
    )
    group.add_argument(
        "--steps",
        type=_ints,
        default=_ints("1000,2000,4000,6000,8000,10000,12000,14000,16000,18000"),
        help="client counts [1000,2000,4000,6000,...,18000]",
    )
    group.add_argument("--max-clients", type=int, default=None, help="drop steps above this")
    group.add_argument(
        "--hold", type=float, default=20, help="seconds every client is held once all opened [20]"
    )
    group.add_argument(
        "--rate", type=float, default=1000, help="new connections per second, all k6 together [1000]"
    )
    group.add_argument("--p95-limit-ms", type=float, default=500, help="the bound on the tick p95 [500]")
    group.add_argument("--sockets-per-k6", type=int, default=6000, help="clients per k6 process [6000]")
    group.add_argument("--sockets-per-vu", type=int, default=500, help="clients per k6 VU [500]")
    group.add_argument(
        "--no-local-ips",
        dest="local_ips",
        action="store_false",
        help="every k6 process from 127.0.0.1 (default: k6 process i from 127.0.0.<i+1>)",
    )
    group.add_argument("--keep-going", action="store_true", help="run every step, even after a failed one")
    group.add_argument("--k6-script", type=Path, default=K6_SCRIPT, help=argparse.SUPPRESS)
    group.add_argument(
        "--latency-metric",
        default="tick_latency_held",
        help="the k6 Trend whose p95 is bounded: tick_latency_held (ticks once every client is open) or "
        "tick_latency (every tick, the connect ramp's included) [tick_latency_held]",
    )
    group = parser.add_argument_group("HTTP")
    group.add_argument("--no-http", dest="http", action="store_false")
    group.add_argument("--http-contestants", default=DEFAULT_HTTP, help=f"names [{DEFAULT_HTTP}]")
    group.add_argument("--http-workers", type=int, default=1, help="workers of every HTTP contestant [1]")
    group.add_argument("--http-rounds", type=int, default=3, help="interleaved rounds [3]")
    group.add_argument("--http-seconds", type=int, default=8, help="seconds of each wrk run [8]")
    group.add_argument("--http-connections", type=int, default=50, help="wrk connections on /api/hello [50]")
    group.add_argument("--sleep-ms", type=int, default=100, help="the /api/sleep duration [100]")
    group.add_argument(
        "--sleep-concurrency", type=int, default=100, help="concurrent /api/sleep requests [100]"
    )
    group.add_argument("--wrk-threads", type=int, default=1, help="wrk threads [1]")
    group.add_argument("--wrk-timeout", type=float, default=5, help="wrk's per-request timeout, seconds [5]")
    args = parser.parse_args(argv)
    try:
        args.broadcast_contestants = (
            parse_contestants(args.contestants, "broadcast", 1) if args.broadcast else []
        )
        args.http_list = (
            parse_contestants(args.http_contestants, "http", args.http_workers) if args.http else []
        )
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if args.max_clients:
        args.steps = [n for n in args.steps if n <= args.max_clients]
    if args.broadcast and not args.steps:
        parser.error("no step left under --max-clients")
    if not (args.broadcast or args.http):
        parser.error("nothing to run: both --no-broadcast and --no-http")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = datetime.datetime.now(datetime.UTC)
    out: Path = args.out or REPORTS / f"shootout-{stamp.strftime('%Y%m%dT%H%M%SZ')}"
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget * 60

    def terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    settings = {
        key: value
        for key, value in vars(args).items()
        if key not in ("broadcast_contestants", "http_list", "out", "k6_script")
    }
    settings["k6_script"] = (
        str(Path(args.k6_script).resolve().relative_to(ROOT))
        if Path(args.k6_script).resolve().is_relative_to(ROOT)
        else str(args.k6_script)
    )
    record: dict[str, Any] = {
        "when": stamp.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(["python -m loadtests.shootout", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(),
        "settings": settings,
    }
    print(f"shootout -> {out}", flush=True)
    try:
        if args.broadcast:
            record["broadcast"] = broadcast_shootout(args.broadcast_contestants, args, out, deadline)
        if args.http:
            record["http"] = http_shootout(args.http_list, args, out, deadline)
    finally:
        stop_all()
    record["charts"] = write_charts(record, out)
    (out / "results.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    write_markdown(record, out)
    print(f"\n{(out / 'results.md').read_text()}\nreport: {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
