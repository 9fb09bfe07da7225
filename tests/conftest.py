"""Fixtures that start the real service as a subprocess and read what an operator would read.

`ServiceProcess` runs `python -m service` in a session of its own (so cleanup can reach every
process it forked), on an OS-chosen free port of 127.0.0.1, and collects its stdout: every
line must be a JSON object, and tests wait on those events ("listening", "worker started"...)
rather than on sleeps.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from loadtests.harness import processes

ROOT = Path(__file__).resolve().parent.parent
Event = dict[str, Any]


class ServiceProcess:
    def __init__(
        self, *args: str, workers: int = 2, env: dict[str, str] | None = None, prefix: list[str] | None = None
    ) -> None:
        self.prefix = prefix or []
        self.args = ["--port", "0", "--address", "127.0.0.1", "--workers", str(workers), *args]
        self.workers = workers
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.events: list[Event] = []
        self.bad_lines: list[str] = []
        self._changed = threading.Condition()
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    # -- process ---------------------------------------------------------------------------
    def start(self, timeout: float = 20.0) -> ServiceProcess:
        self.proc = processes.spawn(self.command(), output=subprocess.PIPE, cwd=ROOT, env=self.env)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        listening = self.wait_for(lambda e: e.get("event") == "listening", timeout)
        self.port = int(listening["port"])
        self.wait_for(lambda _: len({e["worker"] for e in self.named("worker started")}) >= self.workers,
                      timeout)
        return self

    def command(self) -> list[str]:
        """How the service is started (a test of another start method, `make run`, overrides it)."""
        return [*self.prefix, sys.executable, "-m", "service", *self.args]

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            try:
                event = json.loads(line)
                if not isinstance(event, dict):
                    raise ValueError
            except ValueError:
                with self._changed:
                    self.bad_lines.append(line)
                    self._changed.notify_all()
                continue
            with self._changed:
                self.events.append(event)
                self._changed.notify_all()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float) -> int:
        """The exit code, once the process has exited and every line it wrote has been read."""
        assert self.proc is not None
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def tree(self) -> list[int]:
        """PIDs of every process the service has forked (workers), still alive or zombie."""
        try:
            return [p.pid for p in psutil.Process(self.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        """Cleanup: SIGTERM, then SIGKILL the whole session if it lingers."""
        if self.proc is not None:
            processes.stop(self.proc, grace=15)

    # -- log events ------------------------------------------------------------------------
    def wait_for(self, predicate: Callable[[Event], bool], timeout: float = 10.0, after: int = 0) -> Event:
        """The first event (from index `after` on) matching `predicate`; fails after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for event in self.events[after:]:
                    if predicate(event):
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    tail = "\n".join(json.dumps(e) for e in self.events[-15:])
                    raise AssertionError(f"no matching log event within {timeout}s; last events:\n{tail}")
                self._changed.wait(remaining)

    def named(self, name: str) -> list[Event]:
        with self._changed:
            return [e for e in self.events if e.get("event") == name]

    def live_workers(self) -> dict[int, int]:
        """worker id -> pid of its latest start, for workers whose process is still running."""
        latest: dict[int, int] = {}
        for event in self.named("worker started"):
            latest[int(event["worker"])] = int(event["pid"])
        return {w: pid for w, pid in latest.items() if psutil.pid_exists(pid) and pid in self.tree()}

    # -- HTTP ------------------------------------------------------------------------------
    def url(self, path: str, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def request(
        self, path: str, method: str = "GET", body: bytes | None = None, timeout: float = 10.0,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        return http_request(self.port, path, method, body, timeout, headers)

    def get_json(self, path: str, timeout: float = 10.0) -> tuple[int, Any]:
        status, _, body = self.request(path, timeout=timeout)
        return status, json.loads(body) if body else None


def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Whether `check()` came true within `timeout` seconds (polled every 50 ms)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def alive(pid: int) -> bool:
    """Whether the process runs (a zombie, dead but not yet reaped by its parent, does not)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    return False


def gone(pids: list[int], timeout: float) -> bool:
    """Whether every one of `pids` has stopped running within `timeout` seconds."""
    return wait_until(lambda: not any(alive(pid) for pid in pids), timeout)


def refused(port: int) -> bool:
    """Whether a connection to 127.0.0.1:port is refused now (nothing listens: not a hang, not a 503)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def http_request(
    port: int, path: str, method: str = "GET", body: bytes | None = None, timeout: float = 10.0,
    headers: dict[str, str] | None = None, source: str | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request on a new connection to 127.0.0.1:port (from `source`, another loopback address)."""
    conn = http.client.HTTPConnection(
        "127.0.0.1", port, timeout=timeout, source_address=(source, 0) if source else None
    )
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def require_tool(name: str) -> str:
    """The tool's path (on PATH or beside this Python, as PyPI tools are); a missing tool skips
    the test on a laptop but fails it in CI (CI=true or CI=1)."""
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        message = f"{name} is not installed (make test installs it)"
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def start_service() -> Iterator[Callable[..., ServiceProcess]]:
    """Start a fresh service per test (for lifecycle tests that end it); always cleaned up."""
    started: list[ServiceProcess] = []

    def start(
        *args: str, workers: int = 2, env: dict[str, str] | None = None, prefix: list[str] | None = None
    ) -> ServiceProcess:
        service = ServiceProcess(*args, workers=workers, env=env, prefix=prefix)
        started.append(service)
        return service.start()

    yield start
    for service in started:
        service.stop()
        assert not service.bad_lines, f"non-JSON lines on stdout: {service.bad_lines[:5]}"


@pytest.fixture(scope="module")
def service() -> Iterator[ServiceProcess]:
    """One 2-worker service shared by a module's read-only tests."""
    svc = ServiceProcess("--tick-interval", "0.2", "--max-body-size", "4096", "--ws-max-message-size", "1024")
    svc.start()
    yield svc
    svc.stop()
    assert not svc.bad_lines, f"non-JSON lines on stdout: {svc.bad_lines[:5]}"


@pytest.fixture(scope="session")
def container_images() -> Any:
    """The images built from this tree with podman (tests/podman.py), once per test session."""
    from podman import build_all

    return build_all()
