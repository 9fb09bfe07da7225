"""The container image and the compose stack, built and run for real with podman.

What an operator relies on: the image serves through a published port as a non-root user on a
read-only root filesystem, runs one worker per CPU of its limit, and `podman stop` is a drain
(exit 0, a request in flight answered) well inside the grace; deploy/compose.yaml brings up the
service, Nginx, the exporter and Prometheus, which scrapes the service inside the network, and
`down` leaves nothing behind. Images are built from the working tree on a local stand-in base
(see tests/podman.py); the first build on a machine takes a few minutes, later ones are cached.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
import wsclient
import yaml
from conftest import ROOT, require_tool
from podman import ENV as PODMAN_ENV
from podman import Images, compose_command, podman, running, wait_http
from proxy import free_port, wait_for_query

pytestmark = pytest.mark.timeout(900)

COMPOSE_FILE = ROOT / "deploy" / "compose.yaml"


@pytest.fixture(scope="module")
def images(container_images: Images) -> Images:
    return container_images


# -- the image ---------------------------------------------------------------------------------
def test_image_serves_as_non_root_on_a_read_only_root(images: Images) -> None:
    port = free_port()
    with running(images.service, "--read-only", "--cpus", "2", "-p", f"127.0.0.1:{port}:8888") as box:
        box.wait_for_event("listening")
        body = wait_http(f"http://127.0.0.1:{port}/api/hello")
        assert json.loads(body) == {"message": "hello world"}
        # every worker writes its metric files to the tmpfs, and any worker sums them all
        deadline = time.monotonic() + 15
        while b"tornado_workers_alive" not in wait_http(f"http://127.0.0.1:{port}/metrics"):
            assert time.monotonic() < deadline, "no tornado_workers_alive in /metrics"
            time.sleep(0.2)
        assert box.exec("id", "-u").stdout.strip() == "10001"
        assert box.exec("touch", "/opt/venv/x").returncode != 0  # read-only root
        state = box.inspect()
        assert state["HostConfig"]["ReadonlyRootfs"] is True
        assert state["Config"]["User"] == "10001:10001"
        assert podman("healthcheck", "run", box.id, check=False).returncode == 0


def test_image_metadata_and_contents(images: Images) -> None:
    image = json.loads(podman("image", "inspect", images.service).stdout)[0]
    config = image["Config"]
    labels = config["Labels"]
    for key in ("version", "revision", "source"):
        assert labels.get(f"org.opencontainers.image.{key}"), f"OCI label {key} missing"
    assert config["User"] == "10001:10001"
    assert "8888/tcp" in config["ExposedPorts"]
    assert image["Healthcheck"]["Test"] == ["CMD", "python3", "-m", "service.healthcheck"]
    assert config["StopSignal"] in ("SIGTERM", "15")
    # no compilers, no pip, no caches, no tests in the final stage
    listing = podman(
        "run", "--rm", "--entrypoint", "sh", images.service, "-c",
        "command -v gcc cc pip pip3 || true;"
        " ls -d /src /tests /root/.cache /opt/venv/bin/pip* /opt/venv/lib/*/site-packages/tests 2>/dev/null"
        " || true",
    ).stdout.strip()
    assert listing == "", listing


@pytest.mark.parametrize(("cpus", "workers"), [("1", 1), ("2", 2), ("1.5", 2)])
def test_worker_count_follows_the_cpu_limit(images: Images, cpus: str, workers: int) -> None:
    with running(images.service, "--read-only", "--cpus", cpus) as box:
        counted = box.wait_for_event("worker count")
        assert counted["workers"] == workers, counted
        assert counted["cgroup_quota"] == float(cpus), counted
        deadline = time.monotonic() + 20
        while len({e["worker"] for e in box.events() if e.get("event") == "worker started"}) < workers:
            assert time.monotonic() < deadline, box.logs()[-2000:]
            time.sleep(0.2)


def test_podman_stop_drains_a_request_in_flight_and_exits_0(images: Images) -> None:
    port = free_port()
    box_id = podman("run", "-d", "--read-only", "--cpus", "2", "-p", f"127.0.0.1:{port}:8888",
                    images.service).stdout.strip()
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz")
        with socket.create_connection(("127.0.0.1", port), timeout=15) as conn:
            # a first request proves a worker accepted this connection before the stop
            conn.sendall(b"GET /api/hello HTTP/1.1\r\nHost: x\r\n\r\n")
            assert conn.recv(4096).startswith(b"HTTP/1.1 200")
            conn.sendall(b"GET /api/sleep?ms=2000 HTTP/1.1\r\nHost: x\r\n\r\n")
            stop = subprocess.run(["podman", "stop", "-t", "10", box_id], env=dict(PODMAN_ENV),
                                  capture_output=True, text=True, timeout=30)
            answer = read_http_response(conn)
        assert stop.returncode == 0, stop.stderr
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert b'"slept_ms":2000' in answer
        state = json.loads(podman("inspect", box_id).stdout)[0]["State"]
        # 0, not 137: the drain ended within the image's SHUTDOWN_GRACE (8 s), before podman's
        # 10 s ran out and SIGKILLed; the supervisor itself exits 1 when its grace runs out
        assert state["ExitCode"] == 0, state
        logs = podman("logs", box_id).stdout
        assert '"shutdown complete"' in logs
    finally:
        podman("rm", "-f", "-t", "0", box_id, check=False)


def test_dockerfiles_pass_hadolint() -> None:
    hadolint = require_tool("hadolint")
    files = [ROOT / "deploy" / "Dockerfile", ROOT / "deploy" / "nginx.Dockerfile",
             *sorted((ROOT / "tests" / "containers").glob("*.Dockerfile"))]
    result = subprocess.run([hadolint, "--no-color", *map(str, files)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# -- the compose stack ----------------------------------------------------------------------------
def compose_services() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    return services


def test_every_file_the_compose_file_mounts_exists() -> None:
    for name, service in compose_services().items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (COMPOSE_FILE.parent / source).exists(), f"{name} mounts missing {source}"
        build = service.get("build")
        if build:
            context = COMPOSE_FILE.parent / build["context"]
            assert (context / build["dockerfile"]).is_file(), f"{name}: no {build['dockerfile']}"


def test_compose_publishes_only_the_public_ports() -> None:
    services = compose_services()
    assert "ports" not in services["service"], "the service's port must stay inside the network"
    assert "ports" not in services["nginx-exporter"]
    for name in ("prometheus", "grafana"):
        assert all(p.startswith("127.0.0.1:") for p in services[name]["ports"]), name
    assert services["grafana"]["profiles"] == ["grafana"]
    for name, service in services.items():
        if name != "nginx-exporter":  # its public image has no shell: Prometheus watches it
            assert "healthcheck" in service, f"{name} has no health check"


@pytest.fixture(scope="module")
def stack(images: Images) -> Iterator[dict[str, Any]]:
    project = f"tornadotest{free_port()}"
    ports = {"http": free_port(), "https": free_port(), "prometheus": free_port()}
    env = {
        **dict(PODMAN_ENV),
        "SERVICE_IMAGE": images.service, "NGINX_IMAGE": images.nginx,
        "PROMETHEUS_IMAGE": images.prometheus, "NGINX_EXPORTER_IMAGE": images.nginx_exporter,
        "HTTP_PORT": str(ports["http"]), "HTTPS_PORT": str(ports["https"]),
        "PROMETHEUS_PORT": str(ports["prometheus"]), "PUBLISH_ADDRESS": "127.0.0.1",
    }
    base = [*compose_command(), "-f", str(COMPOSE_FILE), "-p", project]
    up = subprocess.run([*base, "up", "-d", "--no-build"], env=env, capture_output=True, text=True,
                        timeout=300, stdin=subprocess.DEVNULL)
    info = {"project": project, "ports": ports, "base": base, "env": env}
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        yield info
    finally:
        down = subprocess.run([*base, "down", "-v", "-t", "10"], env=env, capture_output=True, text=True,
                              timeout=300, stdin=subprocess.DEVNULL)
        info["down"] = down
        with contextlib.suppress(Exception):  # never leave containers behind, even if `down` failed
            ids = podman("ps", "-aq", "--filter", f"label=io.podman.compose.project={project}").stdout.split()
            if ids:
                podman("rm", "-f", "-t", "0", *ids, check=False)


def test_compose_stack_serves_through_nginx(stack: dict[str, Any]) -> None:
    http = stack["ports"]["http"]
    body = wait_http(f"http://127.0.0.1:{http}/api/hello", timeout=60)
    assert json.loads(body) == {"message": "hello world"}

    async def websocket() -> dict[str, Any]:
        echo = await wsclient.connect(f"ws://127.0.0.1:{http}/ws/echo")
        await echo.write_message("through the compose stack")
        assert await echo.read_message() == "through the compose stack"
        ticker = await wsclient.connect(f"ws://127.0.0.1:{http}/ws/ticker")
        tick = await ticker.read_message()
        echo.close()
        ticker.close()
        assert isinstance(tick, str)
        result: dict[str, Any] = json.loads(tick)
        return result

    assert wsclient.run(websocket())["type"] == "tick"
    # /metrics is not public through Nginx
    status = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                             f"http://127.0.0.1:{http}/metrics"], capture_output=True, text=True, timeout=30)
    assert status.stdout == "404"


def test_compose_health_checks_pass(stack: dict[str, Any]) -> None:
    """podman 4.3 has no systemd timer to run them here, so run each once, as Docker would."""
    project = stack["project"]
    for name in ("service", "nginx", "prometheus"):
        container = f"{project}_{name}_1"
        deadline = time.monotonic() + 60
        while podman("healthcheck", "run", container, check=False).returncode != 0:
            assert time.monotonic() < deadline, f"{name} never became healthy"
            time.sleep(1)


def test_compose_prometheus_scrapes_the_service_inside_the_network(stack: dict[str, Any]) -> None:
    prometheus = stack["ports"]["prometheus"]
    for _ in range(5):
        wait_http(f"http://127.0.0.1:{stack['ports']['http']}/api/hello", timeout=60)

    def eventually(promql: str) -> list[dict[str, Any]]:
        return wait_for_query(prometheus, promql, timeout=60)

    up = eventually('up{job="tornado"} == 1')
    assert up[0]["metric"]["instance"] == "service:8888"
    assert float(eventually("sum(tornado_workers_alive)")[0]["value"][1]) == 2
    assert float(eventually('sum(http_requests_total{handler="api_hello"})')[0]["value"][1]) >= 5
    eventually('up{job="nginx"} == 1')
    eventually("nginx_up == 1")
    rules = json.loads(wait_http(f"http://127.0.0.1:{prometheus}/api/v1/rules"))["data"]["groups"]
    assert rules, "Prometheus loaded no rule groups from deploy/prometheus/rules"


def test_compose_redis_profile_carries_rooms_and_down_leaves_nothing(images: Images) -> None:
    """A stack of its own, so this holds whatever order the tests run in: the `redis` profile
    with BROADCAST_URL set (docs/rooms.md, "Running Redis"), a room message through Nginx over Redis,
    then `down` removes every container of the project, the profile's Redis included."""
    project = f"tornadodown{free_port()}"
    env = {**dict(PODMAN_ENV), "SERVICE_IMAGE": images.service, "NGINX_IMAGE": images.nginx,
           "PROMETHEUS_IMAGE": images.prometheus, "NGINX_EXPORTER_IMAGE": images.nginx_exporter,
           "REDIS_IMAGE": images.redis, "BROADCAST_URL": "redis://redis:6379/0",
           "HTTP_PORT": str(free_port()), "HTTPS_PORT": str(free_port()), "PROMETHEUS_PORT": str(free_port())}
    base = [*compose_command(), "-f", str(COMPOSE_FILE), "-p", project, "--profile", "redis"]
    try:
        up = subprocess.run([*base, "up", "-d", "--no-build"], env=env, capture_output=True, text=True,
                            timeout=300, stdin=subprocess.DEVNULL)
        assert up.returncode == 0, up.stderr[-3000:]
        http = env["HTTP_PORT"]
        wait_http(f"http://127.0.0.1:{http}/api/hello", timeout=60)
        assert f"{project}_redis_1" in podman("ps", "--format", "{{.Names}}").stdout
        redis_up = 'min(tornado_backplane_up{backplane="redis"}) == 1'  # every worker connected
        wait_for_query(int(env["PROMETHEUS_PORT"]), redis_up, timeout=90)

        async def room_message() -> dict[str, Any]:
            member = await wsclient.connect(f"ws://127.0.0.1:{http}/ws/chat?room=compose.redis")
            await asyncio.sleep(0.5)  # the 101 reaches the client before the server's open() joins
            status = subprocess.run(
                ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", "-H",
                 "Content-Type: application/json", "--data", '{"data": "over redis"}',
                 f"http://127.0.0.1:{http}/api/publish?room=compose.redis"],
                capture_output=True, text=True, timeout=30,
            ).stdout
            assert status == "202", status
            message = await asyncio.wait_for(member.read_message(), 15)
            member.close()
            assert isinstance(message, str)
            result: dict[str, Any] = json.loads(message)
            return result

        message = wsclient.run(room_message())
        assert (message["type"], message["room"]) == ("message", "compose.redis")
        assert message["data"] == "over redis"
        down = subprocess.run([*base, "down", "-v", "-t", "25"], env=env, capture_output=True, text=True,
                              timeout=300, stdin=subprocess.DEVNULL)
        assert down.returncode == 0, down.stderr[-3000:]
        label = f"label=io.podman.compose.project={project}"
        assert podman("ps", "-aq", "--filter", label).stdout.strip() == ""
        assert project not in podman("volume", "ls", "-q").stdout
        assert project not in podman("network", "ls", "--format", "{{.Name}}").stdout
    finally:
        ids = podman("ps", "-aq", "--filter", f"label=io.podman.compose.project={project}",
                     check=False).stdout.split()
        if ids:
            podman("rm", "-f", "-t", "0", *ids, check=False)


# -- helpers ------------------------------------------------------------------------------------
def read_http_response(conn: socket.socket, timeout: float = 15) -> bytes:
    """One whole HTTP/1.1 response with a Content-Length body, or what came before the close."""
    conn.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body

