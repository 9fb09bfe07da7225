"""Real Nginx and real Prometheus in front of and behind the real service, for tests.

Configuration comes from the same code `make stack` uses (loadtests/harness, nginx/render.py),
so what is tested is what is shipped.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from conftest import require_tool

from loadtests.harness import processes
from loadtests.harness.nginx import nginx_command, render_nginx, self_signed
from loadtests.harness.ports import free_port, port_open
from loadtests.harness.prometheus import prometheus_command, prometheus_config

__all__ = ["Nginx", "Prometheus", "free_port", "query", "wait_for_port", "wait_for_query"]

def wait_for_port(port: int, timeout: float = 15.0) -> None:
    if not port_open(port, timeout):
        raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class Nginx:
    def __init__(self, workdir: Path, upstream_port: int, **settings: str) -> None:
        require_tool("nginx")
        require_tool("openssl")
        self.workdir = workdir
        self.http_port, self.tls_port, self.status_port = free_port(), free_port(), free_port()
        self.access_log = workdir / "access.log"
        self.error_log = workdir / "error.log"
        cert, key = self_signed(workdir / "tls")
        self.conf = render_nginx(
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
        self.proc = processes.spawn(nginx_command(self.conf, self.error_log))
        wait_for_port(self.http_port)
        wait_for_port(self.tls_port)
        return self

    def stop(self) -> None:
        """SIGQUIT: Nginx's graceful stop (its workers finish what they serve)."""
        if self.proc is not None:
            processes.stop(self.proc, signal.SIGQUIT, grace=10)

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
        config = prometheus_config(scrape, interval=scrape_interval, rule_files=rule_files)
        self.config.write_text(config)
        self.data = workdir / "data"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Prometheus:
        self.proc = processes.spawn(prometheus_command(self.config, self.data, f"127.0.0.1:{self.port}"))
        wait_for_port(self.port, timeout=30)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            processes.stop(self.proc, grace=15)

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
