"""Podman for the container tests: the images built from the project's own Dockerfiles.

No registry is reachable on the build machines, so every base image is a local stand-in made by
tests/containers/standin-base.sh (Debian bookworm from the machine's apt mirror, cached between
runs) and passed with `--build-arg`, exactly as a user would pass another base. Prometheus and
the Nginx exporter have no Dockerfile of the project's (compose uses their public images); the
tests build stand-ins for them from Debian's packages (tests/containers/*.Dockerfile).

The three podman settings these machines need (runc, cgroupfs, no default ulimits) live in
tests/containers/containers.conf, pointed at by CONTAINERS_CONF; a normal host needs none.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conftest import ROOT, require_tool

HERE = ROOT / "tests" / "containers"
STANDIN_BASE = "localhost/standin-bookworm:1"
ENV = {**os.environ, "CONTAINERS_CONF": str(HERE / "containers.conf")}


@dataclass(frozen=True)
class Images:
    service: str = "localhost/tornado-service:test"
    nginx: str = "localhost/tornado-nginx:test"
    prometheus: str = "localhost/standin-prometheus:test"
    nginx_exporter: str = "localhost/standin-nginx-exporter:test"
    redis: str = "localhost/standin-redis:test"


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["podman", *args], env=ENV, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def build(image: str, dockerfile: Path, context: Path, **build_args: str) -> None:
    args = [f"--build-arg={name}={value}" for name, value in build_args.items()]
    # docker format: OCI images drop HEALTHCHECK, and the health check is part of what is tested.
    podman("build", "--format", "docker", "--quiet", "-f", str(dockerfile), "-t", image, *args, str(context),
           timeout=600)


def build_all() -> Images:
    """Every image the tests run, built from the working tree (layers are cached between runs)."""
    require_tool("podman")
    require_tool("runc")
    require_tool("debootstrap")
    made = subprocess.run([str(HERE / "standin-base.sh"), STANDIN_BASE], env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert made.returncode == 0, made.stdout + made.stderr
    images = Images()
    build(images.service, ROOT / "deploy" / "Dockerfile", ROOT, BASE_IMAGE=STANDIN_BASE)
    build(images.nginx, ROOT / "deploy" / "nginx.Dockerfile", ROOT,
          BASE_IMAGE=STANDIN_BASE, PYTHON_IMAGE=STANDIN_BASE)
    build(images.prometheus, HERE / "prometheus.Dockerfile", HERE, BASE_IMAGE=STANDIN_BASE)
    build(images.nginx_exporter, HERE / "nginx-exporter.Dockerfile", HERE, BASE_IMAGE=STANDIN_BASE)
    build(images.redis, HERE / "redis.Dockerfile", HERE, BASE_IMAGE=STANDIN_BASE)
    return images


class Container:
    """One `podman run -d`, removed at the end whatever happened."""

    def __init__(self, image: str, *run_args: str, command: Sequence[str] = ()) -> None:
        self.id = podman("run", "-d", *run_args, image, *command).stdout.strip()

    def logs(self) -> str:
        result = podman("logs", self.id, check=False)
        return result.stdout + result.stderr

    def events(self) -> list[dict[str, Any]]:
        """The service's JSON log lines (podman's own stderr noise is skipped)."""
        found = []
        for line in podman("logs", self.id, check=False).stdout.splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    found.append(event)
        return found

    def wait_for_event(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events():
                if event.get("event") == name:
                    return event
            if time.monotonic() > deadline:
                raise AssertionError(f"no {name!r} event within {timeout}s:\n{self.logs()[-3000:]}")
            time.sleep(0.2)

    def inspect(self) -> dict[str, Any]:
        data: list[dict[str, Any]] = json.loads(podman("inspect", self.id).stdout)
        return data[0]

    def exec(self, *command: str) -> subprocess.CompletedProcess[str]:
        return podman("exec", self.id, *command, check=False)

    def remove(self) -> None:
        podman("rm", "-f", "-t", "0", self.id, check=False)


@contextlib.contextmanager
def running(image: str, *run_args: str, command: Sequence[str] = ()) -> Iterator[Container]:
    container = Container(image, *run_args, command=command)
    try:
        yield container
    finally:
        container.remove()


def wait_http(url: str, timeout: float = 30.0, status: int = 200) -> bytes:
    """The body of the first answer with `status`; fails after `timeout`."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == status:
                    body: bytes = response.read()
                    return body
                last = response.status
        except OSError as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} did not answer {status} within {timeout}s: {last}")
        time.sleep(0.25)


def compose_command() -> list[str]:
    return [require_tool("podman-compose")]
