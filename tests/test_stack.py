"""`make stack`: the service, Nginx and Prometheus as local processes, stopped cleanly by a signal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, alive, require_tool
from proxy import wait_for_port, wait_for_query

from loadtests.harness import processes
from loadtests.harness.ports import free_port


def _start(
    workdir: Path, user: str | None = None, service_args: tuple[str, ...] = ()
) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    ports = {name: free_port() for name in ("service", "http", "tls", "status", "prometheus", "exporter")}
    command = [
        sys.executable, "-m", "deploy.stack", "--dir", str(workdir),
        "--service-port", str(ports["service"]), "--http-port", str(ports["http"]),
        "--tls-port", str(ports["tls"]), "--status-port", str(ports["status"]),
        "--prometheus-port", str(ports["prometheus"]), "--exporter-port", str(ports["exporter"]),
        "--shutdown-grace", "5", "--", "--workers", "2", *service_args,
    ]
    proc = processes.spawn(command, output=subprocess.PIPE, cwd=ROOT, env=_environment(workdir), user=user)
    return proc, ports


def _environment(workdir: Path) -> dict[str, str]:
    """The test's environment without a BROADCAST_URL of its own: the stack runs Redis only when asked."""
    return {**{k: v for k, v in os.environ.items() if k != "BROADCAST_URL"}, "HOME": str(workdir)}


def _stop(proc: subprocess.Popen[bytes], signum: int) -> tuple[int, str, list[int]]:
    children = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    proc.send_signal(signum)
    try:
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            processes.stop(proc, signal.SIGKILL)
    return proc.returncode, output.decode(errors="replace"), children


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_stack_serves_and_stops_cleanly(tmp_path: Path, signum: int) -> None:
    for tool in ("nginx", "prometheus", "openssl"):
        require_tool(tool)
    proc, ports = _start(tmp_path / "stack")
    failure: BaseException | None = None
    try:
        for name in ("http", "tls", "prometheus", "service"):
            wait_for_port(ports[name], timeout=30)
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['http']}/api/hello", timeout=10) as response:
            assert json.load(response) == {"message": "hello world"}
        wait_for_query(ports["prometheus"], 'up{job="tornado"} == 1')  # Prometheus scraped the service
    except BaseException as exc:
        failure = exc
    finally:
        code, output, children = _stop(proc, signum)
    if failure is not None:
        raise AssertionError(f"stack output:\n{output[-4000:]}") from failure
    assert code == 0, output[-3000:]
    assert "stack running" in output and f"http://127.0.0.1:{ports['http']}" in output
    assert '"event":"shutdown complete"' in output  # the service drained
    assert "stack: stopped" in output
    left = [pid for pid in children if alive(pid)]
    assert not left
    assert (tmp_path / "stack" / "tls" / "tls.crt").exists()  # a self-signed pair was made


def test_stack_runs_redis_when_broadcast_url_names_a_local_one(tmp_path: Path) -> None:
    for tool in ("nginx", "prometheus", "openssl", "redis-server"):
        require_tool(tool)
    redis_port = free_port()
    proc, ports = _start(tmp_path / "stack", service_args=("--broadcast-url", f"redis://127.0.0.1:{redis_port}/0"))
    failure: BaseException | None = None
    try:
        for name in ("http", "service"):
            wait_for_port(ports[name], timeout=30)
        wait_for_port(redis_port)
        statuses = []
        for _ in range(100):  # each worker publishes once its Redis connection is up (503 until then)
            request = urllib.request.Request(f"http://127.0.0.1:{ports['http']}/api/publish?room=stack",
                                             data=b'{"data": "hello"}', method="POST")
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    statuses.append(response.status)
            except urllib.error.HTTPError as error:
                statuses.append(error.code)
            if statuses[-3:] == [202, 202, 202]:
                break
            time.sleep(0.1)
        assert statuses[-3:] == [202, 202, 202], statuses
    except BaseException as exc:
        failure = exc
    finally:
        code, output, children = _stop(proc, signal.SIGTERM)
    if failure is not None:
        raise AssertionError(f"stack output:\n{output[-4000:]}") from failure
    assert code == 0, output[-3000:]
    assert f"redis://127.0.0.1:{redis_port}" in output and '"backplane":"redis"' in output
    left = [pid for pid in children if alive(pid)]
    assert not left  # redis-server included


def test_stack_stopped_twice_by_sigterm_still_drains(tmp_path: Path) -> None:
    """`kill -TERM -PGID` of `make stack`: the stack gets the group's SIGTERM and make's forward.
    Only a second Ctrl-C kills; a request in flight through Nginx is answered."""
    for tool in ("nginx", "prometheus", "openssl"):
        require_tool(tool)
    proc, ports = _start(tmp_path / "stack")
    answers: list[object] = []
    try:
        for name in ("http", "service"):
            wait_for_port(ports[name], timeout=30)
        url = f"http://127.0.0.1:{ports['http']}/api/sleep?ms=2500"

        def slow() -> None:
            try:
                with urllib.request.urlopen(url, timeout=20) as response:
                    answers.append(response.status)
            except Exception as exc:
                answers.append(exc)

        thread = threading.Thread(target=slow, daemon=True)
        thread.start()
        time.sleep(0.8)  # through Nginx and into the service's sleep
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
    finally:
        code, output, children = _stop(proc, signal.SIGTERM)
    thread.join(15)
    assert answers == [200], output[-3000:]
    assert code == 0 and '"event":"shutdown complete"' in output
    left = [pid for pid in children if alive(pid)]
    assert not left
