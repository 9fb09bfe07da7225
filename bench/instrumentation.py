"""What full instrumentation costs: bare Tornado vs this service, side by side, in one run.

Variants, all with the same worker count, on 127.0.0.1, measured by wrk in interleaved rounds
(A B C, A B C, ...) so that the machine's noise falls on every variant alike; the median round
of each is reported, with its ratio to the bare app. Results go to bench/results/.

    make bench                  # or: .venv/bin/python bench/instrumentation.py --rounds 3
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
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

VARIANTS: dict[str, tuple[list[str], dict[str, str]]] = {
    "bare tornado": ([sys.executable, str(ROOT / "bench" / "bare_app.py")], {}),
    "service, metrics + access log": ([sys.executable, "-m", "service", "--address", "127.0.0.1"], {}),
    "service, metrics, access log 1%": (
        [sys.executable, "-m", "service", "--address", "127.0.0.1"], {"ACCESS_LOG_SAMPLE": "0.01"},
    ),
    "service, metrics, access log off": (
        [sys.executable, "-m", "service", "--address", "127.0.0.1"], {"ACCESS_LOG": "false"},
    ),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def running(command: list[str], env: dict[str, str], workers: int, log: Path) -> Iterator[int]:
    port = free_port()
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [*command, "--port", str(port), "--workers", str(workers)],
            cwd=ROOT, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"{command} did not start; see {log}") from None
                time.sleep(0.1)
        yield port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _seconds(value: str, unit: str) -> float:
    return float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[unit]


def wrk(url: str, seconds: int, connections: int) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url],
        capture_output=True, text=True, check=True, timeout=seconds + 30,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p99_ms": _seconds(*p99.groups()) * 1000 if p99 else float("nan"),
        "non_2xx": float(errors.group(1)) if errors else 0.0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--path", default="/api/hello")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed (make bench installs it)", file=sys.stderr)
        return 2

    runs: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for round_no in range(1, args.rounds + 1):
            for name, (command, env) in VARIANTS.items():
                log = Path(tmp) / (re.sub(r"\W+", "-", name) + ".log")  # logs go to a file, as in production
                with running(command, env, args.workers, log) as port:
                    url = f"http://127.0.0.1:{port}{args.path}"
                    wrk(url, 2, args.connections)  # warm-up
                    result = wrk(url, args.seconds, args.connections)
                runs[name].append(result)
                rps, p99 = result["rps"], result["p99_ms"]
                print(f"round {round_no} {name:34s} {rps:10.0f} req/s  p99 {p99:.2f} ms", flush=True)

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    base = median("bare tornado", "rps")
    summary = {
        name: {"rps": median(name, "rps"), "p99_ms": median(name, "p99_ms"),
               "throughput_vs_bare": median(name, "rps") / base,
               "non_2xx": sum(r["non_2xx"] for r in runs[name])}
        for name in VARIANTS
    }
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    record = {"when": stamp, "settings": vars(args), "cpus": os.cpu_count(), "runs": runs, "summary": summary}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "instrumentation.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        f"# Instrumentation cost, {stamp}",
        "",
        f"`bench/instrumentation.py`: `GET {args.path}`, {args.workers} worker(s) each, wrk -t1 "
        f"-c{args.connections} for {args.seconds} s, {args.rounds} interleaved rounds, median round shown; "
        f"{os.cpu_count()} CPUs shared by server and load generator; logs written to a file.",
        "",
        "| variant | requests/s | p99 ms | throughput vs bare |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {name} | {s['rps']:.0f} | {s['p99_ms']:.2f} | {s['throughput_vs_bare']:.2f} |"
          for name, s in summary.items()),
        "",
    ]
    (RESULTS / "instrumentation.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
