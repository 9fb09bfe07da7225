"""`/api/hello` through Nginx against direct, and 1 worker against 2: side by side, in one run.

Variants, each a fresh stack per round, measured by wrk in interleaved rounds (the order flips
every round) so that the machine's noise falls on every variant alike; the median round of each
is reported, with the ratios the issue asks for:

- direct, 1 worker and 2 workers: what a second worker adds (on a 2-core machine where wrk
  itself takes most of a core, expect little: the figure says so rather than hiding it);
- through Nginx (the project's template, the stack's sizing), 1 and 2 workers: what the proxy
  hop costs at the same worker count.

The service runs on its defaults (metrics and the JSON access log on, to a file), as deployed.
Results: bench/results/scaling.json and scaling.md.

    make bench                      # or: .venv/bin/python bench/scaling.py --rounds 5
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

from instrumentation import wrk  # noqa: E402  (bench/ is this script's own folder)

from loadtests.harness import processes  # noqa: E402
from loadtests.harness.nginx import nginx_command, render_nginx, self_signed  # noqa: E402
from loadtests.harness.ports import free_port  # noqa: E402


@dataclass(frozen=True)
class Variant:
    name: str
    workers: int
    nginx: bool


VARIANTS = (
    Variant("direct, 1 worker", 1, False),
    Variant("direct, 2 workers", 2, False),
    Variant("through Nginx, 1 worker", 1, True),
    Variant("through Nginx, 2 workers", 2, True),
)
RATIOS = (  # (what, numerator, denominator)
    ("2 workers / 1 worker, direct", "direct, 2 workers", "direct, 1 worker"),
    ("2 workers / 1 worker, through Nginx", "through Nginx, 2 workers", "through Nginx, 1 worker"),
    ("Nginx / direct, 1 worker", "through Nginx, 1 worker", "direct, 1 worker"),
    ("Nginx / direct, 2 workers", "through Nginx, 2 workers", "direct, 2 workers"),
)


def _wait_ready(url: str, procs: list[subprocess.Popen[bytes]], log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"{url} did not answer; see {log}") from None
            time.sleep(0.1)


@contextlib.contextmanager
def stack(variant: Variant, work: Path) -> Iterator[str]:
    """The service (and Nginx in front of it), in sessions of their own; yields the URL to load."""
    log = work / (re.sub(r"\W+", "-", variant.name) + ".log")
    port = free_port()
    procs: list[tuple[subprocess.Popen[bytes], int]] = []
    try:
        service = processes.spawn(
            [sys.executable, "-m", "service", "--address", "127.0.0.1", "--port", str(port),
             "--workers", str(variant.workers)],
            output=log, cwd=ROOT,
        )
        procs.append((service, signal.SIGTERM))
        url = f"http://127.0.0.1:{port}"
        if variant.nginx:
            cert, key = self_signed(work / "tls")
            http_port = free_port()
            folder = work / f"nginx-{variant.workers}"
            conf = render_nginx(
                folder / "nginx.conf", folder / "run",
                UPSTREAM=f"127.0.0.1:{port}", LISTEN_ADDRESS="127.0.0.1", HTTP_PORT=str(http_port),
                TLS_PORT=str(free_port()), STATUS_PORT=str(free_port()), TLS_CERT=str(cert),
                TLS_KEY=str(key), WORKER_PROCESSES=str(variant.workers),
                ACCESS_LOG=str(work / f"nginx-access-{variant.workers}.log"),
            )
            nginx = processes.spawn(nginx_command(conf, error_log=str(log)), output=log)
            procs.append((nginx, signal.SIGQUIT))
            url = f"http://127.0.0.1:{http_port}"
        _wait_ready(url + "/api/hello", [p for p, _ in procs], log)
        yield url
    finally:
        for proc, sig in reversed(procs):
            processes.stop(proc, sig, grace=20, whole_group=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--path", default="/api/hello")
    parser.add_argument("--seconds", type=int, default=5, help="measured seconds per run (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured seconds before each (default 1)")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    args = parser.parse_args(argv)
    for tool in ("wrk", "nginx", "openssl"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (make bench installs it)", file=sys.stderr)
            return 2

    runs: dict[str, list[dict[str, float]]] = {v.name: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        for round_no in range(1, args.rounds + 1):
            for variant in VARIANTS if round_no % 2 else VARIANTS[::-1]:
                with stack(variant, Path(tmp)) as url:
                    if args.warmup > 0:
                        wrk(url + args.path, args.warmup, args.connections, {})
                    result = wrk(url + args.path, args.seconds, args.connections, {})
                runs[variant.name].append(result)
                print(f"round {round_no} {variant.name:26s} {result['rps']:9.0f} req/s  "
                      f"p99 {result['p99_ms']:7.2f} ms  non-2xx {result['non_2xx']:.0f}", flush=True)

    summary = {
        name: {"rps": statistics.median(r["rps"] for r in own),
               "p99_ms": statistics.median(r["p99_ms"] for r in own),
               "non_2xx": sum(r["non_2xx"] for r in own)}
        for name, own in runs.items()
    }
    ratios = {}
    for what, top, bottom in RATIOS:
        per_round = [a["rps"] / b["rps"] for a, b in zip(runs[top], runs[bottom], strict=True)]
        ratios[what] = {"median": statistics.median(per_round), "rounds": [round(r, 3) for r in per_round]}
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scaling.json").write_text(json.dumps(
        {"when": stamp, "settings": vars(args), "cpus": os.cpu_count(), "runs": runs, "summary": summary,
         "ratios": ratios}, indent=2) + "\n")
    lines = [
        f"# /api/hello: Nginx against direct, 1 worker against 2, {stamp}",
        "",
        f"`bench/scaling.py`: `GET {args.path}`, the service on its defaults (metrics and access log on), "
        f"wrk -t1 -c{args.connections} for {args.seconds:g} s after {args.warmup:g} s of warm-up, "
        f"{args.rounds} interleaved rounds, a fresh stack per run; {os.cpu_count()} CPUs shared by wrk, "
        "Nginx and the service. Requests/s and p99: the median round; ratios: the median of the "
        "per-round ratios.",
        "",
        "| variant | requests/s | p99 ms | non-2xx |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {name} | {s['rps']:.0f} | {s['p99_ms']:.2f} | {s['non_2xx']:.0f} |"
          for name, s in summary.items()),
        "",
        "| ratio | median | rounds |",
        "| --- | ---: | --- |",
        *(f"| {what} | **{r['median']:.2f}** | {', '.join(f'{x:.2f}' for x in r['rounds'])} |"
          for what, r in ratios.items()),
        "",
    ]
    (RESULTS / "scaling.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
