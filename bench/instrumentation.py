"""What full instrumentation costs: bare Tornado vs this service, side by side, in one run.

Variants, all with the same worker count, on 127.0.0.1, `GET /api/hello` by wrk. Each service
variant is a pair of switches: the access log on (the default) or off, and the proxy headers
Nginx sends (X-Real-IP, X-Forwarded-For, X-Forwarded-Proto, X-Request-ID) present or not; metrics
are always on (they cannot be switched off). Bare Tornado runs once per header setting, because
parsing the extra headers costs Tornado itself something: each service variant is compared with
the bare run that got the same requests.

Rounds are interleaved (every variant once per round, the order reversed every other round) so
the machine's noise falls on every variant alike; runs are short and many, and every variant's
processes are started afresh every few rounds. A variant's figure is the median over the rounds
of its ratio to bare Tornado in the same round: a slow round slows both sides of a ratio, where a
ratio of medians would mix rounds. Results go to bench/results/instrumentation.{md,json}.

    make bench                  # or: .venv/bin/python bench/instrumentation.py --rounds 30 --seconds 1
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

from loadtests.harness import processes  # noqa: E402  (the tree's root, for a script run from bench/)
from loadtests.harness.ports import free_port  # noqa: E402

# What Nginx sends upstream for every request (nginx/nginx.conf.template, `proxy_set_header`), with
# the values a client at 203.0.113.7 gets over plain HTTP; the request id is one Nginx would make.
PROXY_HEADERS = {
    "X-Real-IP": "203.0.113.7",
    "X-Forwarded-For": "203.0.113.7",
    "X-Forwarded-Proto": "http",
    "X-Request-ID": "5f0c6e8d2a9b4b7c9e1d3f2a4b6c8d0e",
}
BARE = [sys.executable, str(ROOT / "bench" / "bare_app.py")]
SERVICE = [sys.executable, "-m", "service", "--address", "127.0.0.1"]


@dataclass(frozen=True)
class Variant:
    name: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    proxy_headers: bool = False
    access_log: bool | None = None  # None: not the service

    @property
    def bare(self) -> bool:
        return self.access_log is None


VARIANTS = (  # grouped by headers, so each service variant is measured close in time to its baseline
    Variant("bare tornado", BARE),
    Variant("service, defaults (metrics + access log)", SERVICE, access_log=True),
    Variant("service, access log off", SERVICE, {"ACCESS_LOG": "false"}, access_log=False),
    Variant("bare tornado, proxy headers", BARE, proxy_headers=True),
    Variant("service, defaults, proxy headers", SERVICE, proxy_headers=True, access_log=True),
    Variant("service, access log off, proxy headers", SERVICE, {"ACCESS_LOG": "false"},
            proxy_headers=True, access_log=False),
)


def baseline(variant: Variant) -> Variant:
    """The bare run a variant is compared with: the one that got the same headers."""
    return next(v for v in VARIANTS if v.bare and v.proxy_headers == variant.proxy_headers)


class Server:
    """One variant's server process, started in a session of its own so that stopping reaches its workers."""

    def __init__(self, variant: Variant, workers: int, log: Path) -> None:
        self.variant = variant
        self.log = log
        self.port = free_port()
        self.proc = processes.spawn(  # logs go to a file, as in production
            [*variant.command, "--port", str(self.port), "--workers", str(workers)],
            output=log, cwd=ROOT, env={**os.environ, **variant.env},
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(self.url + "/", timeout=1).read()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"{self.variant.name} did not start; see {self.log}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        processes.stop(self.proc, grace=20, whole_group=True)


@contextlib.contextmanager
def running(variants: list[Variant], workers: int, logs: Path) -> Iterator[dict[str, Server]]:
    """Every variant's server at once (started side by side, so a round does not wait for each)."""
    servers: dict[str, Server] = {}
    try:
        for variant in variants:
            log = logs / (re.sub(r"\W+", "-", variant.name) + ".log")
            servers[variant.name] = Server(variant, workers, log)
        for server in servers.values():
            server.wait_ready()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def _seconds(value: str, unit: str) -> float:
    return float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[unit]


def workers_cpu(server_pid: int) -> float:
    """CPU seconds (user + system) used so far by the server's worker processes."""
    total = 0.0
    for child in psutil.Process(server_pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            cpu = child.cpu_times()
            total += cpu.user + cpu.system
    return total


def wrk(url: str, seconds: int, connections: int, headers: dict[str, str]) -> dict[str, float]:
    """One wrk run (whole seconds: wrk takes no fractions)."""
    flags = [arg for name, value in headers.items() for arg in ("-H", f"{name}: {value}")]
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", *flags, url],
        capture_output=True, text=True, check=True, timeout=seconds + 30,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "requests": float(re.search(r"(\d+) requests in", out).group(1)),  # type: ignore[union-attr]
        "p99_ms": _seconds(*p99.groups()) * 1000 if p99 else float("nan"),
        "non_2xx": float(errors.group(1)) if errors else 0.0,
    }


def measure(server: Server, variant: Variant, args: argparse.Namespace) -> dict[str, float]:
    """One measured wrk run against a running server, with its workers' CPU time per request."""
    headers = PROXY_HEADERS if variant.proxy_headers else {}
    cpu = workers_cpu(server.proc.pid)
    result = wrk(server.url + args.path, args.seconds, args.connections, headers)
    cpu = workers_cpu(server.proc.pid) - cpu
    result["cpu_us_per_request"] = cpu / result["requests"] * 1e6
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--path", default="/api/hello")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seconds", type=int, default=1, help="measured seconds per run (default 1)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="unmeasured seconds for each fresh server (default 2)")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds (default 30)")
    parser.add_argument("--restart-every", type=int, default=10, metavar="N",
                        help="fresh server processes every N rounds (default 10)")
    parser.add_argument("--only", action="append", default=[], metavar="TEXT",
                        help="run only the service variants whose name contains TEXT (repeatable), "
                             "with their bare baselines; for development")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed (make bench installs it)", file=sys.stderr)
        return 2
    chosen = [v for v in VARIANTS if not v.bare and (not args.only or any(t in v.name for t in args.only))]
    variants = [v for v in VARIANTS if v in chosen or any(baseline(c) == v for c in chosen)]

    runs: dict[str, list[dict[str, float]]] = {v.name: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for first in range(1, args.rounds + 1, args.restart_every):
            # Short runs, close together: the machine's noise comes in bursts of seconds, which
            # then fall on both sides of a ratio. Fresh processes every block of rounds: one
            # process's luck (hash seed, memory layout) is not carried into every round, where
            # the median could not remove it.
            with running(variants, args.workers, Path(tmp)) as servers:
                for variant in variants:
                    if args.warmup > 0:
                        headers = PROXY_HEADERS if variant.proxy_headers else {}
                        wrk(servers[variant.name].url + args.path, args.warmup, args.connections, headers)
                for round_no in range(first, min(first + args.restart_every, args.rounds + 1)):
                    for variant in variants if round_no % 2 else variants[::-1]:
                        result = measure(servers[variant.name], variant, args)
                        runs[variant.name].append(result)
                        rps, p99, cpu_us = result["rps"], result["p99_ms"], result["cpu_us_per_request"]
                        print(f"round {round_no} {variant.name:42s} {rps:10.0f} req/s  p99 {p99:6.2f} ms  "
                              f"{cpu_us:6.1f} CPU us/request", flush=True)

    summary: dict[str, dict[str, object]] = {}
    for variant in variants:
        own = runs[variant.name]
        pairs = list(zip(own, runs[baseline(variant).name], strict=True))
        ratios = [mine["rps"] / bare["rps"] for mine, bare in pairs]
        cpu_ratios = [mine["cpu_us_per_request"] / bare["cpu_us_per_request"] for mine, bare in pairs]
        summary[variant.name] = {
            "proxy_headers": variant.proxy_headers,
            "access_log": variant.access_log,
            "rps": statistics.median(r["rps"] for r in own),
            "p99_ms": statistics.median(r["p99_ms"] for r in own),
            "round_ratios": [round(r, 4) for r in ratios],
            "throughput_vs_bare": statistics.median(ratios),
            "cpu_us_per_request": statistics.median(r["cpu_us_per_request"] for r in own),
            "cpu_vs_bare": statistics.median(cpu_ratios),
            "non_2xx": sum(r["non_2xx"] for r in own),
        }
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    record = {"when": stamp, "settings": vars(args), "cpus": os.cpu_count(), "proxy_headers": PROXY_HEADERS,
              "runs": runs, "summary": summary}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "instrumentation.json").write_text(json.dumps(record, indent=2) + "\n")

    def row(name: str, s: dict[str, object]) -> str:
        ratios = s["round_ratios"]
        assert isinstance(ratios, list)
        return (f"| {name} | {s['rps']:.0f} | {s['p99_ms']:.2f} | **{s['throughput_vs_bare']:.3f}** | "
                f"{min(ratios):.3f} to {max(ratios):.3f} | {s['cpu_us_per_request']:.1f} | "
                f"{s['cpu_vs_bare']:.3f} |")

    headers = ", ".join(f"`{name}: {value}`" for name, value in PROXY_HEADERS.items())
    lines = [
        f"# Instrumentation cost, {stamp}",
        "",
        f"`bench/instrumentation.py`: `GET {args.path}`, {args.workers} worker(s) each, wrk -t1 "
        f"-c{args.connections} for {args.seconds} s per run, {args.rounds} interleaved rounds, fresh "
        f"processes (warmed up {args.warmup} s) every {args.restart_every} rounds; {os.cpu_count()} CPUs "
        "shared by server and load generator; logs written to "
        "a file. Requests/s and p99: the median round. Throughput vs bare: the median of the per-round "
        "ratios to bare Tornado given the same headers, and the lowest and highest round. Worker CPU "
        "per request: the workers' user + system CPU time over the measured run divided by the requests "
        "answered (the median round, and the median per-round ratio to bare), a figure the machine's "
        f"other load shakes less than throughput. Proxy headers: {headers}.",
        "",
        "| variant | requests/s | p99 ms | throughput vs bare | rounds | CPU us/request | CPU vs bare |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *(row(name, s) for name, s in summary.items()),
        "",
    ]
    (RESULTS / "instrumentation.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
