"""Real Nginx and real Prometheus in front of and behind the real service, for tests.

Configuration comes from the same code `make stack` uses (deploy/stack.py, nginx/render.py),
so what is tested is what is shipped.
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from conftest import require_tool

from deploy import stack

_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port nothing listens on, for a server a test starts a moment later.

    Not a port the kernel picked (port 0): those come from the ephemeral range, where any
    outgoing connection (a load generator's, Nginx's to its upstream) may take it before the
    server binds it. Below that range only a listener can take a port, and none is handed out
    twice in one test run.
    """
    low = _ephemeral_low()
    for _ in range(2000):
        port = random.randrange(10_000, low)
        if port in _handed_out:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port between 10000 and {low}")


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    if not stack.port_open(port, timeout):
        raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class Nginx:
    def __init__(self, workdir: Path, upstream_port: int, **settings: str) -> None:
        require_tool("nginx")
        require_tool("openssl")
        self.workdir = workdir
        self.http_port, self.tls_port, self.status_port = free_port(), free_port(), free_port()
        self.access_log = workdir / "access.log"
        self.error_log = workdir / "error.log"
        cert, key = stack.self_signed(workdir / "tls")
        self.conf = stack.render_nginx(
            workdir / "nginx.conf", workdir / "run",
            UPSTREAM=settings.pop("UPSTREAM", f"127.0.0.1:{upstream_port}"), LISTEN_ADDRESS="127.0.0.1",
            HTTP_PORT=str(self.http_port), TLS_PORT=str(self.tls_port), STATUS_PORT=str(self.status_port),
            TLS_CERT=str(cert), TLS_KEY=str(key), ACCESS_LOG=str(self.access_log),
            ERROR_LOG=str(self.error_log), **settings,
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def check(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["nginx", "-t", "-p", str(self.workdir), "-c", str(self.conf), "-e", str(self.error_log)],
            capture_output=True, text=True, timeout=30,
        )

    def start(self) -> Nginx:
        self.proc = subprocess.Popen(
            stack.nginx_command(self.conf, self.error_log),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        wait_for_port(self.http_port)
        wait_for_port(self.tls_port)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def access_lines(self) -> list[dict[str, Any]]:
        if not self.access_log.exists():
            return []
        return [json.loads(line) for line in self.access_log.read_text().splitlines() if line.strip()]

    def log_line(self, request_id: str, timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for line in self.access_lines():
                if line["request_id"] == request_id:
                    return line
            if time.monotonic() > deadline:
                raise AssertionError(f"no Nginx access line for {request_id}")
            time.sleep(0.05)


class Prometheus:
    def __init__(
        self, workdir: Path, scrape: dict[str, str], rule_files: Sequence[Path] = (),
        scrape_interval: str = "1s",
    ) -> None:
        """`scrape`: job name -> target; `rule_files` are loaded as they are (recording and alerting)."""
        require_tool("prometheus")
        self.port = free_port()
        self.config = workdir / "prometheus.yml"
        config = stack.prometheus_config(scrape, interval=scrape_interval, rule_files=rule_files)
        self.config.write_text(config)
        self.data = workdir / "data"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Prometheus:
        self.proc = subprocess.Popen(
            stack.prometheus_command(self.config, self.data, f"127.0.0.1:{self.port}"),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        wait_for_port(self.port, timeout=30)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def query(self, promql: str) -> list[dict[str, Any]]:
        return query(self.port, promql)

    def wait_for(self, promql: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        return wait_for_query(self.port, promql, timeout)


def query(port: int, promql: str) -> list[dict[str, Any]]:
    """An instant query to the Prometheus on 127.0.0.1:port (any Prometheus: ours, the stack's, compose's)."""
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def wait_for_query(port: int, promql: str, timeout: float = 30.0) -> list[dict[str, Any]]:
    """The query's result once it is non-empty (Prometheus needs a scrape or two first, and
    answers 503 while it opens its storage)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            result = query(port, promql)
            if result:
                return result
        if time.monotonic() > deadline:
            raise AssertionError(f"no result for {promql!r} within {timeout}s")
        time.sleep(0.25)
