"""The rendered Kubernetes Deployment, run for real as a pod with `podman kube play`.

No cluster is reachable here; podman runs a Deployment's pod (its containers, ConfigMap volumes,
emptyDirs, resources, security contexts) from the same YAML `kubectl kustomize` renders. What
changes before the play, and only that: the images point at the ones built from this tree
(tests/podman.py) and the Nginx and metrics ports get a hostPort on 127.0.0.1. Through the pod's
Nginx the test proves hello, a WebSocket, readiness and the metrics; then it stops the pod the
way a kubelet does (each container's stop signal, then the grace) and checks that requests in
flight were answered and WebSockets closed with 1001 before `podman kube down` removes it.

podman 4.3 does not run `preStop` hooks or probes on its own (no systemd), and `kube down`
alone removes a pod at once. So the stop is done in the order a kubelet's stop amounts to: the
service gets SIGTERM with terminationGracePeriodSeconds to go (`podman stop -t`) and drains
while the pod's Nginx and network stay up; then Nginx gets its image's STOPSIGNAL, SIGQUIT (a
graceful quit; containerd and CRI-O honour it too); then `kube down`. Not `podman pod stop`,
which stops the infra container (the network, and the answers on their way back) at the same
time; and not concurrent `podman stop`s of the containers, after which podman 4.3 signalled the
service a second time (a repeated SIGTERM no longer cuts the drain, but the order above is still
the kubelet's).
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import wsclient
import yaml
from conftest import http_request
from k8s_render import render
from podman import Images, podman, wait_http
from proxy import free_port

pytestmark = pytest.mark.timeout(600)

OVERLAY = "dev"


Documents = list[dict[str, Any]]


def for_podman(documents: Documents, images: Images, ports: dict[str, int]) -> Documents:
    """The Deployment and its ConfigMaps, with local images and hostPorts for the test."""
    local = {"tornado-service": images.service, "tornado-nginx": images.nginx,
             "nginx-prometheus-exporter": images.nginx_exporter}
    kept = [d for d in documents if d["kind"] in ("Deployment", "ConfigMap")]
    for doc in kept:
        if doc["kind"] != "Deployment":
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            name = container["image"].rsplit("/", 1)[-1].split(":", 1)[0].split("@", 1)[0]
            container["image"] = local[name]
            for port in container.get("ports", []):
                if port.get("name") in ports:
                    port["hostPort"] = ports[port["name"]]
                    port["hostIP"] = "127.0.0.1"
    return kept


@pytest.fixture(scope="module")
def pod(container_images: Images, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    documents = render(OVERLAY)
    ports = {"http": free_port(), "metrics": free_port()}
    played = for_podman(documents, container_images, ports)
    path = tmp_path_factory.mktemp("kube") / "play.yaml"
    path.write_text(yaml.safe_dump_all(played, sort_keys=False))
    deployment = next(d for d in played if d["kind"] == "Deployment")
    podman("kube", "play", str(path), timeout=180)
    pod_name = f"{deployment['metadata']['name']}-pod-0"
    info = {"ports": ports, "path": path, "pod": pod_name, "deployment": deployment}
    try:
        yield info
    finally:
        podman("kube", "down", str(path), check=False, timeout=120)
        podman("pod", "rm", "-f", "-t", "0", pod_name, check=False)


def test_pod_serves_through_its_nginx(pod: dict[str, Any]) -> None:
    http = pod["ports"]["http"]
    assert json.loads(wait_http(f"http://127.0.0.1:{http}/readyz", timeout=90))["status"] == "ready"
    assert json.loads(wait_http(f"http://127.0.0.1:{http}/api/hello")) == {"message": "hello world"}

    async def ticker() -> dict[str, Any]:
        conn = await wsclient.connect(f"ws://127.0.0.1:{http}/ws/ticker")
        tick = await conn.read_message()
        conn.close()
        assert isinstance(tick, str)
        result: dict[str, Any] = json.loads(tick)
        return result

    assert wsclient.run(ticker())["type"] == "tick"
    metrics = wait_http(f"http://127.0.0.1:{pod['ports']['metrics']}/metrics").decode()
    assert "tornado_workers_alive" in metrics
    # the dev overlay's CPU limit is what the service sized its pool by
    limit = next(c for c in pod["deployment"]["spec"]["template"]["spec"]["containers"]
                 if c["name"] == "service")["resources"]["limits"]["cpu"]
    expected = -(-_cpus(limit) // 1)
    alive = [line for line in metrics.splitlines() if line.startswith("tornado_workers_alive{")]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in alive) == expected, alive
    # the Nginx of the pod never serves /metrics publicly
    status = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                             f"http://127.0.0.1:{http}/metrics"], capture_output=True, text=True, timeout=30)
    assert status.stdout == "404"


def test_pod_stop_drains_without_a_failed_request(pod: dict[str, Any]) -> None:
    http = pod["ports"]["http"]
    wait_http(f"http://127.0.0.1:{http}/readyz", timeout=90)
    results: list[tuple[int, bytes]] = []

    def slow_request() -> None:
        try:
            status, _, body = http_request(http, "/api/sleep?ms=2000", timeout=30)
        except OSError as exc:
            status, body = 0, str(exc).encode()
        results.append((status, body))

    async def held_socket() -> int | None:
        conn = await wsclient.connect(f"ws://127.0.0.1:{http}/ws/ticker")
        await conn.read_message()
        started.set()
        await wsclient.read_until_closed(conn, timeout=40)
        return conn.close_code

    started = threading.Event()
    close_codes: list[int | None] = []
    socket_thread = threading.Thread(target=lambda: close_codes.append(wsclient.run(held_socket())))
    socket_thread.start()
    assert started.wait(30), "the WebSocket never got a tick"
    threads = [threading.Thread(target=slow_request) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # let the three requests reach the service before the stop (no event to await)
    grace = pod["deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    podman("stop", "-t", str(grace), f"{pod['pod']}-service", timeout=grace + 30)
    for thread in threads:
        thread.join(30)
    socket_thread.join(30)
    assert [status for status, _ in results] == [200, 200, 200], results
    assert close_codes == [1001], close_codes
    sidecars = [f"{pod['pod']}-nginx", f"{pod['pod']}-nginx-exporter"]
    podman("stop", "-t", str(grace), *sidecars, timeout=grace + 30)
    # exit 0 for both: no SIGKILL at the end of the grace (137), no grace run out in the service (1)
    for name in ("service", "nginx"):  # the exporter has nothing to drain
        state = json.loads(podman("inspect", f"{pod['pod']}-{name}").stdout)[0]["State"]
        assert (state["Status"], state["ExitCode"]) == ("exited", 0), (name, state)
    podman("kube", "down", str(pod["path"]), timeout=120)
    assert podman("ps", "-aq", "--filter", f"pod={pod['pod']}", check=False).stdout.strip() == ""


def _cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)

