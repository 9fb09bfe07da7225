"""The processes a soak starts: the service, and Nginx in front of it unless --direct.

Each is the leader of a session of its own (loadtests/harness/processes.py), so that stopping it
stops what it forked too; what each ever ran as (`pids_seen`) is kept to prove nothing is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from loadtests.harness import nginx, ports, processes
from loadtests.soak.common import ROOT, WORKER_PREFIX


class Service:
    """`python -m service` in a session of its own; its JSON log read for events (not access lines)."""

    def __init__(self, workers: int, metrics_dir: Path, tick_interval: float) -> None:
        self.workers = workers
        self.metrics_dir = metrics_dir
        self.args = [
            "--address",
            "127.0.0.1",
            "--port",
            "0",
            "--workers",
            str(workers),
            "--tick-interval",
            f"{tick_interval:g}",
            "--shutdown-grace",
            "10",
        ]
        self.events: list[dict[str, Any]] = []
        self.access_lines = 0
        self.bad_lines: list[str] = []
        self.lock = threading.Lock()
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.pids_seen: set[int] = set()
        self.exit_code: int | None = None

    def start(self, timeout: float = 30.0) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir)}
        self.proc = processes.spawn(
            [sys.executable, "-m", "service", *self.args], output=subprocess.PIPE, cwd=ROOT, env=env
        )
        self.pids_seen.add(self.proc.pid)
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while len(self.live_workers()) < self.workers or not self.port:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the service did not start; last lines: {self.events[-5:]} {self.bad_lines[-5:]}"
                )
            time.sleep(0.1)

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            if b'"event":"request"' in raw or b'"event": "request"' in raw:
                self.access_lines += 1  # one per request: counted, not kept
                continue
            line = raw.decode(errors="replace").rstrip("\n")
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            with self.lock:
                if not isinstance(event, dict):
                    self.bad_lines.append(line[:500])
                    continue
                self.events.append(event)
                if event.get("event") == "listening":
                    self.port = int(event["port"])
                if event.get("event") == "worker started":
                    self.pids_seen.add(int(event["pid"]))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def named(self, name: str) -> list[dict[str, Any]]:
        with self.lock:
            return [e for e in self.events if e.get("event") == name]

    def live_workers(self) -> dict[int, int]:
        """worker id -> pid, for the workers running now (read from the process names they set)."""
        found: dict[int, int] = {}
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.pid).children():
                with contextlib.suppress(psutil.Error):
                    name = child.name()
                    if name.startswith(WORKER_PREFIX) and child.status() != psutil.STATUS_ZOMBIE:
                        found[int(name.removeprefix(WORKER_PREFIX))] = child.pid
        started = {int(e["pid"]) for e in self.named("worker started")}
        return {w: pid for w, pid in found.items() if pid in started}  # serving, not just forked

    def stop(self) -> int:
        if self.proc is None:
            return 0
        self.exit_code = processes.stop(self.proc, signal.SIGTERM, grace=30)
        return self.exit_code


class Nginx:
    """Nginx in front of the service, rendered from the shipped template as `make stack` renders it
    (loadtests/harness/nginx.py, nginx/render.py)."""

    def __init__(self, workdir: Path, upstream_port: int) -> None:
        for tool in ("nginx", "openssl"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} is not installed (make soak installs it; or --direct)")
        self.workdir = workdir
        self.port = ports.free_port()
        self.error_log = workdir / "error.log"
        cert, key = nginx.self_signed(workdir / "tls")
        self.conf = nginx.render_nginx(
            workdir / "nginx.conf",
            workdir / "run",
            UPSTREAM=f"127.0.0.1:{upstream_port}",
            LISTEN_ADDRESS="127.0.0.1",
            HTTP_PORT=str(self.port),
            TLS_PORT=str(ports.free_port()),
            STATUS_PORT=str(ports.free_port()),
            TLS_CERT=str(cert),
            TLS_KEY=str(key),
            ACCESS_LOG="/dev/null",
            ERROR_LOG=str(self.error_log),
            WORKER_PROCESSES="1",
        )
        self.command = nginx.nginx_command(self.conf, self.error_log)
        self.proc: subprocess.Popen[bytes] | None = None
        self.pids_seen: set[int] = set()
        self.exit_code: int | None = None

    def start(self) -> None:
        self.proc = processes.spawn(self.command)
        self.pids_seen.add(self.proc.pid)
        if not ports.port_open(
            self.port, 15, alive=lambda: self.proc is not None and self.proc.poll() is None
        ):
            raise RuntimeError(f"Nginx did not start: {self.errors()[-3:]}")
        with contextlib.suppress(psutil.Error):
            self.pids_seen |= {p.pid for p in psutil.Process(self.proc.pid).children()}

    def errors(self) -> list[str]:
        if not self.error_log.exists():
            return []
        return [
            line
            for line in self.error_log.read_text(errors="replace").splitlines()
            if "[emerg]" in line or "[alert]" in line or "[crit]" in line or "[error]" in line
        ]

    def stop(self) -> int:
        """SIGQUIT: Nginx closes its connections (the upstream keep-alive ones too) and leaves."""
        if self.proc is None:
            return 0
        self.exit_code = processes.stop(self.proc, signal.SIGQUIT, grace=15)
        return self.exit_code
