"""A real `redis-server` (Debian's package) for tests: a free loopback port, a temporary directory,
no persistence, and stop/kill/restart on the same port for outage tests."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from conftest import require_tool
from proxy import wait_for_port

from loadtests.harness import processes
from loadtests.harness.ports import free_port
from loadtests.harness.redis import redis_command


class RedisServer:
    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.binary = require_tool("redis-server")
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        log = ["--logfile", str(self.workdir / "redis.log")]
        self.proc = processes.spawn([*redis_command(self.port, self.workdir, self.binary), *log])
        wait_for_port(self.port)
        return self

    def kill(self) -> None:
        """SIGKILL: Redis gone at once, its connections reset (an outage, not a shutdown)."""
        if self.proc is not None:
            processes.stop(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        if self.proc is not None:
            processes.stop(self.proc, grace=10)
