"""The whole stack on one machine, no containers: the service, Nginx in front, Prometheus behind.

With BROADCAST_URL set (in the environment, or `-- --broadcast-url URL`) to a Redis on this
machine's loopback, Debian's `redis-server` runs on that port too, first, for the rooms'
backplane (no persistence, its files in the working directory); unset, the rooms use the
embedded backplane and no Redis runs.

`make stack` runs this. Everything lives in a working directory of its own (`.stack/` by
default): rendered configuration, a self-signed TLS pair when none is given, Prometheus' data.
Each component is an ordinary child process; their output is followed here, one prefixed line
at a time. Ctrl-C or SIGTERM stops them all: the service drains (SHUTDOWN_GRACE), the others
stop at once; a second Ctrl-C kills what is left. A component that dies stops the stack.

    python -m deploy.stack [--http-port 8080] [--service-port 8888] ... [-- service flags]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from loadtests.harness.nginx import nginx_command, render_nginx, self_signed
from loadtests.harness.ports import port_open
from loadtests.harness.processes import spawn
from loadtests.harness.prometheus import prometheus_command, prometheus_config
from loadtests.harness.redis import redis_command
from nginx import render as nginx_render
from service.config import redis_address

ROOT = Path(__file__).resolve().parent.parent
# The same recording rules and alerts as deploy/compose.yaml's Prometheus (one source).
RULE_FILES = sorted((ROOT / "deploy" / "prometheus" / "rules").glob("*.yml"))


def broadcast_url(service_args: Sequence[str], environ: Mapping[str, str]) -> str:
    """BROADCAST_URL as the service will see it: its flag among the service's arguments, else the variable."""
    for index, arg in enumerate(service_args):
        if arg == "--broadcast-url" and index + 1 < len(service_args):
            return service_args[index + 1].strip()
        if arg.startswith("--broadcast-url="):
            return arg.split("=", 1)[1].strip()
    return environ.get("BROADCAST_URL", "").strip()


def local_redis_port(url: str) -> int | None:
    """The port of a Redis the stack should run itself: one on this machine's loopback; else None."""
    if not url:
        return None
    host, port, _ = redis_address(url)
    return port if host in ("127.0.0.1", "localhost", "::1") else None


@dataclass
class Component:
    name: str
    command: list[str]
    url: str = ""
    ready_port: int | None = None  # the next component starts once this port accepts connections
    stop_signal: int = signal.SIGTERM
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self, cwd: Path) -> None:
        self.proc = spawn(self.command, output=subprocess.PIPE, cwd=cwd, env={**os.environ, **self.env})
        threading.Thread(target=self._follow, daemon=True).start()

    def wait_ready(self, timeout: float = 30.0) -> bool:
        """True once `ready_port` accepts a connection; False if the process died or time ran out."""
        return self.ready_port is None or port_open(self.ready_port, timeout, alive=self.running)

    def _follow(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            sys.stdout.write(f"{self.name:>10} | {line.decode(errors='replace')}")
            sys.stdout.flush()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        if self.running():
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signum)


class Stack:
    def __init__(self, components: list[Component], workdir: Path, grace: float) -> None:
        self.components = components
        self.workdir = workdir
        self.grace = grace
        self.stopping = 0
        self.interrupts = 0

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        """Any signal stops the stack; only a repeated Ctrl-C (SIGINT) cuts the drain short.

        A SIGTERM may come twice for one stop: `kill -TERM -PGID` of `make stack` reaches this
        process, and make forwards one more (as for `make run`, see service/process/supervisor.py).
        """
        self.stopping += 1
        if signum == signal.SIGINT:
            self.interrupts += 1

    def run(self) -> int:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        for component in self.components:  # in order: each waits for what it depends on
            component.start(self.workdir)
            if not component.wait_ready():
                print(f"stack: {component.name} did not start; stopping the rest", flush=True)
                self.stop()
                return 1
        print("\n".join(["", "stack running (Ctrl-C stops it):",
                         *(f"  {c.name:>10}  {c.url}" for c in self.components if c.url), ""]), flush=True)
        code = 0
        while not self.stopping:
            dead = [c for c in self.components if not c.running()]
            if dead:
                print(f"stack: {', '.join(c.name for c in dead)} exited; stopping the rest", flush=True)
                code = 1
                break
            time.sleep(0.2)
        self.stop()
        return code

    def stop(self) -> None:
        """SIGTERM to everyone (the service drains), SIGKILL after the grace or a second Ctrl-C."""
        asked = self.interrupts
        for component in self.components:
            component.signal(component.stop_signal)
        deadline = time.monotonic() + self.grace + 5
        while any(c.running() for c in self.components):
            if time.monotonic() > deadline or self.interrupts > max(asked, 1):
                for component in self.components:
                    component.signal(signal.SIGKILL)
            time.sleep(0.1)
        for component in self.components:
            if component.proc is not None:  # a component after one that failed never started
                component.proc.wait()
        print("stack: stopped", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", type=Path, default=ROOT / ".stack", help="working directory")
    parser.add_argument("--service-port", type=int, default=8888)
    parser.add_argument("--http-port", type=int, default=8080, help="Nginx, plain HTTP")
    parser.add_argument("--tls-port", type=int, default=8443, help="Nginx, TLS with HTTP/2")
    parser.add_argument("--status-port", type=int, default=8081, help="Nginx stub_status (127.0.0.1 only)")
    parser.add_argument("--prometheus-port", type=int, default=9090)
    parser.add_argument("--exporter-port", type=int, default=9113, help="nginx-prometheus-exporter")
    parser.add_argument("--cert", type=Path, help="TLS certificate (default: a self-signed one)")
    parser.add_argument("--key", type=Path, help="TLS key, with --cert")
    parser.add_argument("--shutdown-grace", type=float, default=float(os.environ.get("SHUTDOWN_GRACE", 20)))
    parser.add_argument("--scrape-interval", default="5s", help="Prometheus' scrape and rule interval")
    parser.add_argument("--nginx", action="append", default=[], metavar="NAME=VALUE",
                        help="an nginx/render.py setting, e.g. WORKER_PROCESSES=4 (repeatable)")
    parser.add_argument("service_args", nargs="*", help="flags for the service, after --")
    args = parser.parse_args(argv)
    if bool(args.cert) != bool(args.key):
        parser.error("--cert and --key go together")
    nginx_settings = dict(item.partition("=")[::2] for item in args.nginx)
    if unknown := sorted(set(nginx_settings) - set(nginx_render.DEFAULTS)):
        parser.error(f"--nginx: unknown setting(s) {', '.join(unknown)}")
    try:
        redis_port = local_redis_port(broadcast_url(args.service_args, os.environ))
    except ValueError as exc:
        parser.error(f"BROADCAST_URL: {exc}")
    for tool in ("nginx", "prometheus", "openssl", *(["redis-server"] if redis_port else [])):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (`make stack` installs it)")

    workdir = args.dir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cert, key = (args.cert.resolve(), args.key.resolve()) if args.cert else self_signed(workdir / "tls")
    conf = render_nginx(workdir / "nginx" / "nginx.conf", workdir / "nginx" / "run", **{
        "UPSTREAM": f"127.0.0.1:{args.service_port}", "LISTEN_ADDRESS": "127.0.0.1",
        "HTTP_PORT": str(args.http_port), "TLS_PORT": str(args.tls_port),
        "STATUS_PORT": str(args.status_port), "TLS_CERT": str(cert), "TLS_KEY": str(key),
        **nginx_settings,  # --nginx NAME=VALUE, over the stack's own
    })
    exporter_bin = shutil.which("prometheus-nginx-exporter")
    exporter = f"127.0.0.1:{args.exporter_port}" if exporter_bin else None
    prom_yml = workdir / "prometheus" / "prometheus.yml"
    prom_yml.parent.mkdir(parents=True, exist_ok=True)
    jobs = {"tornado": f"127.0.0.1:{args.service_port}", "prometheus": f"127.0.0.1:{args.prometheus_port}"}
    if exporter:
        jobs["nginx"] = exporter
    prom_yml.write_text(prometheus_config(jobs, interval=args.scrape_interval, rule_files=RULE_FILES))

    components = []
    if redis_port:  # first: the service's workers connect to it at start (and retry until it is up)
        (workdir / "redis").mkdir(parents=True, exist_ok=True)
        components.append(Component("redis", redis_command(redis_port, workdir / "redis"),
                                    url=f"redis://127.0.0.1:{redis_port}  (the rooms' backplane)",
                                    ready_port=redis_port))
    components += [
        Component("service", [sys.executable, "-m", "service", "--address", "127.0.0.1",
                              "--port", str(args.service_port), "--shutdown-grace", str(args.shutdown_grace),
                              *args.service_args],
                  url=f"http://127.0.0.1:{args.service_port}  (direct; /metrics is scraped here)",
                  ready_port=args.service_port),
        Component("nginx", nginx_command(conf), stop_signal=signal.SIGQUIT,  # SIGQUIT: graceful
                  url=f"http://127.0.0.1:{args.http_port}  https://127.0.0.1:{args.tls_port} (HTTP/2)",
                  ready_port=args.status_port),
        Component(
            "prometheus",
            prometheus_command(prom_yml, workdir / "prometheus" / "data", jobs["prometheus"]),
            url=f"http://127.0.0.1:{args.prometheus_port}",
            ready_port=args.prometheus_port,
        ),
    ]
    if exporter_bin:
        components.append(Component(
            "exporter",
            [exporter_bin, f"-nginx.scrape-uri=http://127.0.0.1:{args.status_port}/stub_status",
             f"-web.listen-address={exporter}", "-nginx.retries=5", "-nginx.retry-interval=1s"],
            url=f"http://{exporter}/metrics",
        ))
    return Stack(components, ROOT, args.shutdown_grace).run()


if __name__ == "__main__":
    sys.exit(main())
